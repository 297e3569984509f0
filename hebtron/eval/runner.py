"""Run a suite on one checkpoint through lm-eval and write its results JSON.

The file keeps lm-eval's layout (``results`` -> task -> ``metric,filter`` and
``metric_stderr,filter``, plus ``versions``, ``n-shot``, ``higher_is_better``, ...) and adds a
``hebtron`` block: status, suite, checkpoint, step, backend, timings. A run that fails still
writes the file, with ``status: crashed`` and the error, so a gate chained after it rejects
the checkpoint and says why (fail closed).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from hebtron.errors import UserError

BACKENDS = ("hebtron", "hf", "vllm")
KEPT_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples",
             "config", "lm_eval_version", "date", "max_length")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: a reader sees the old file or the whole new one."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=handle_non_serializable) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def _model(backend: str, checkpoint: str | Path, tokenizer: str | Path | None, device: str, dtype: str | None,
           scratch: Path, extra: dict[str, Any]) -> tuple[str, dict[str, Any], Any]:
    """lm-eval model name and arguments; the hf backend exports native training checkpoints first
    (a Megatron checkpoint's cached conversion already is a plain HF directory with its tokenizer)."""
    import torch

    from hebtron.checkpoints import STATE_FILE
    from hebtron.data.tokenizer import remote_code_allowed
    from hebtron.eval.source import resolve_source

    source = resolve_source(checkpoint, tokenizer)
    if backend == "hebtron":
        import hebtron.eval.lm  # noqa: F401  (registers the "hebtron" model with lm-eval)

        args = {"pretrained": str(source.model_dir), "tokenizer": str(source.tokenizer_dir),
                "device": device, "dtype": dtype or "auto"}
        return "hebtron", args | extra, source
    model_dir = source.model_dir
    if (model_dir / STATE_FILE).is_file() or source.tokenizer_dir != model_dir:
        # lm-eval's hf and vllm models want one plain HF directory holding the tokenizer: write one
        from hebtron.model.hf import load_hf, save_hf
        from hebtron.data.tokenizer import load_hf_tokenizer

        model_dir = save_hf(load_hf(source.model_dir, dtype=None), scratch / "hf")
        load_hf_tokenizer(source.tokenizer_dir).save_pretrained(str(model_dir))
    # only --trust-remote-code lets the model directory run its own code; a suite file cannot
    # (hebtron.eval.config refuses the key, and it is set last here in any case)
    trust = {"trust_remote_code": remote_code_allowed()}
    if backend == "vllm":  # vLLM picks its GPUs itself; the suite's model_args may set tensor_parallel_size
        args = {"pretrained": str(model_dir), "dtype": dtype or "auto"}
        return "vllm", args | extra | trust, source
    if device in ("auto", "", None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    args = {"pretrained": str(model_dir), "device": device, "dtype": dtype or "auto"}
    return "hf", args | extra | trust, source


def require_backend(backend: str) -> None:
    """One line, before any work, when a backend's package is missing (vLLM is an optional
    GPU extra, imported lazily by lm-eval)."""
    import importlib.util

    if backend not in BACKENDS:
        raise UserError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm: the vllm package is not installed; on a GPU node install hebtron's "
                        "vllm extra (pip install 'hebtron[vllm]'), or use --backend hf")


def run_suite(
    suite_ref: str | Path,
    checkpoint: str | Path,
    backend: str = "hebtron",
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int | None = None,
    limit: float | None = None,
    tokenizer: str | Path | None = None,
    include: list[str | Path] = (),
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on a suite; return the results payload (not written)."""
    from hebtron.eval.config import load_suite, task_dirs

    require_backend(backend)
    suite, suite_file = load_suite(suite_ref)
    dirs = task_dirs(suite, suite_file, list(include))
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # single-process, seeded bootstrap: reproducible stderr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if suite.offline:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[var] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hebtron-eval-") as scratch:
        model, model_args, source = _model(backend, checkpoint, tokenizer, device, dtype, Path(scratch),
                                           suite.model_args)
        output = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=list(suite.tasks),
            num_fewshot=suite.num_fewshot, batch_size=batch_size or suite.batch_size,
            limit=limit if limit is not None else suite.limit, bootstrap_iters=suite.bootstrap_iters,
            apply_chat_template=suite.apply_chat_template, gen_kwargs=suite.gen_kwargs,
            task_manager=TaskManager(include_path=[str(d) for d in dirs], include_defaults=suite.builtin_tasks),
            log_samples=log_samples,
        )
    if output is None:
        raise RuntimeError("lm-eval returned no results (not the main rank?)")
    payload = {k: output[k] for k in KEPT_KEYS if k in output}
    if log_samples:
        payload["samples"] = output.get("samples", {})
    payload["hebtron"] = {
        "status": "ok" if payload.get("results") else "empty",
        "error": None,
        "suite": suite.name,
        "suite_file": str(suite_file.resolve()),
        "tasks": list(suite.tasks),
        "checkpoint": str(source.checkpoint),
        "weights": str(source.model_dir),
        "tokenizer": str(source.tokenizer_dir),
        "step": source.step,
        "backend": backend,
        "device": model_args.get("device"),
        "wall_s": round(time.perf_counter() - started, 2),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return payload


def crashed_payload(err: BaseException, suite_ref: str | Path, checkpoint: str | Path, backend: str) -> dict[str, Any]:
    """What a failed run leaves behind: no results, the error on one line, the traceback."""
    return {
        "results": {},
        "hebtron": {
            "status": "crashed",
            "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": "),
            "traceback": traceback.format_exception(err)[-5:],
            "suite": str(suite_ref),
            "checkpoint": str(checkpoint),
            "backend": backend,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }
