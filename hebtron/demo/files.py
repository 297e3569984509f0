"""Reading and writing the demo's own files: JSONL inputs, atomic outputs, one-line summaries.

Every builder in the demo writes its outputs atomically (a reader sees the old file or the
whole new one) and its manifest last, so an interrupted build is redone, never half-used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hebtron.errors import UserError


def require(path: Path) -> Path:
    """``path``, which an earlier demo step must have built; a UserError naming the step if not."""
    if not path.is_file():
        raise UserError(f"{path}: missing; build the demo corpus first (hebtron data demo)")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file the demo built earlier; a missing or broken one is a UserError."""
    rows = []
    require(path)
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{n}: broken JSON ({err.msg})") from None
    return rows


def write_text(path: Path, text: str) -> None:
    """Atomic, via a per-process temporary file next to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest as indented JSON (Hebrew unescaped), atomically."""
    write_text(path, json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")


def file_lines(files: dict[str, dict[str, int]]) -> list[str]:
    """A manifest's ``files`` as ``  name: 1,234 docs, 5,678 chars`` lines."""
    return [f"  {name}: " + ", ".join(f"{v:,} {k}" for k, v in info.items()) for name, info in files.items()]
