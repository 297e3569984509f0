"""The native backend's GPU path in one run: every fast kernel against its PyTorch reference at
Nemotron 3 Nano shapes, then bf16 training steps of a Nano-width 6-layer model, save and resume.

    python bench/gpu_smoke.py [--out gpu_smoke.json]        # one H200 / B300, under 8 minutes
    python bench/gpu_smoke.py --cpu-tiny [--out FILE]       # the same stages at toy sizes on CPU

Stages (each reports ``ok``, what it measured and, on failure, the one-line error; the exit
code is 1 when any stage fails):

- ``env``: versions, device, which GPU kernel packages import;
- ``mamba kernels``: the SSD scan and causal conv1d on packed rows (documents of 1, 37, 128,
  129, 3000+ tokens at T = 8192; 64 heads x 64, 8 groups, state 128, chunk 128) against the
  reference run on each document alone, forward and gradients;
- ``attention``: every attention path the device offers against the dense-mask reference,
  forward and gradients (flex forward only on CPU, where FlexAttention has no backward);
- ``experts``: grouped-GEMM experts against the per-expert loop at 128 experts top-6, forward,
  gradients and the time of each;
- ``loss``: the chunked head + cross-entropy against the plain one at vocabulary 131,072, with
  each one's peak memory on GPU;
- ``train``: bf16 steps (fp32 master weights, autocast) of a Nano-width 6-layer model (32
  experts) on packed rows: the loss falls; tokens/s and peak memory;
- ``resume``: a checkpoint saved mid-run and loaded into a fresh model and optimizer replays the
  next step with the same loss.

On CUDA a missing mamba-ssm or causal-conv1d is a failure of its stage, not a silent fallback.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hebtron.backends.native import NativeBackend  # noqa: E402
from hebtron.backends.native_engine import accumulate_gradients  # noqa: E402
from hebtron.kernels import dispatch  # noqa: E402
from hebtron.kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref  # noqa: E402
from hebtron.kernels.chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from hebtron.kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref  # noqa: E402
from hebtron.model import HybridConfig, HybridModel  # noqa: E402
from hebtron.model import attention as attn  # noqa: E402
from hebtron.model.hf import hf_tensors_from_state, load_hf_state_dict  # noqa: E402
from hebtron.model.implementations import implementations  # noqa: E402
from hebtron.model.moe import grouped_experts, looped_experts  # noqa: E402
from hebtron.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from hebtron.train.optim import build_adamw, clip_grad_norm  # noqa: E402

NANO_CONFIG = REPO / "recipes" / "nemotron3-nano" / "config.json"


@dataclass(frozen=True)
class Sizes:
    """Shapes per stage: Nemotron 3 Nano's on a GPU, toy ones for ``--cpu-tiny``."""

    seq_len: int
    documents: tuple[int, ...]  # packed into one row of seq_len (the last one takes the rest)
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    state: int
    chunk: int
    attn_heads: int
    kv_heads: int
    attn_head_dim: int
    experts: int
    top_k: int
    hidden: int
    expert_inner: int
    expert_tokens: int
    vocab: int
    loss_tokens: int
    train_layers: str
    train_seq_len: int
    train_rows: int
    train_steps: int
    tolerance: float  # relative error allowed between a kernel and its reference


GPU = Sizes(8192, (1, 37, 128, 129, 3000), 64, 64, 8, 128, 128, 32, 2, 128, 128, 6, 2688, 1856, 4096, 131072, 8192,
            "MEM*EM", 4096, 2, 30, 2e-2)
CPU_TINY = Sizes(160, (1, 37, 13, 29, 50), 4, 8, 2, 16, 16, 4, 2, 16, 16, 6, 64, 32, 64, 512, 96,
                 "MEM*EM", 64, 2, 8, 1e-4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in fp32): one figure per tensor, insensitive to its scale."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _seq_idx(sizes: Sizes, device: torch.device) -> torch.Tensor:
    lengths = [*sizes.documents, sizes.seq_len - sum(sizes.documents)]
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(device)[None]


def _runs(seq_idx: torch.Tensor) -> list[tuple[int, int]]:
    change = torch.nonzero(seq_idx[0, 1:] != seq_idx[0, :-1]).flatten().add(1).tolist()
    bounds = [0, *change, seq_idx.shape[1]]
    return list(zip(bounds, bounds[1:]))


def _grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [t.grad.detach().clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _peak(device: torch.device) -> float | None:
    """Peak GPU memory allocated, in GB (None off CUDA: the allocator keeps no such figure)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- stages
def stage_env(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    packages = {}
    for kernel in dispatch.GPU_KERNELS:
        fn, error = dispatch._load(kernel) if device.type == "cuda" else (None, "not tried off CUDA")
        packages[kernel.package] = "ok" if fn is not None else error
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "kernel packages": packages,
    }


def stage_mamba(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_(True)

    T, h, p, g, n = sizes.seq_len, sizes.mamba_heads, sizes.mamba_head_dim, sizes.mamba_groups, sizes.state
    x, dt, B, C = rand(1, T, h, p), rand(1, T, h, scale=0.5), rand(1, T, g, n), rand(1, T, g, n)
    A = (-torch.rand(h, generator=gen) - 0.5).to(device).requires_grad_(True)
    D, dt_bias = rand(h), rand(h, scale=0.1)
    seq_idx = _seq_idx(sizes, device)
    leaves = [x, dt, A, B, C, D, dt_bias]
    y = ssd_chunk_scan(x, dt, A, B, C, sizes.chunk, D=D, dt_bias=dt_bias, seq_idx=seq_idx)
    probe = torch.randn(y.shape, generator=gen).to(device)
    (y.float() * probe).sum().backward()
    fast = _grads(leaves)
    pieces = [ssd_chunk_scan_ref(x[:, a:b], dt[:, a:b], A, B[:, a:b], C[:, a:b], sizes.chunk, D=D, dt_bias=dt_bias)
              for a, b in _runs(seq_idx)]
    ref = torch.cat(pieces, dim=1)
    (ref.float() * probe).sum().backward()
    slow = _grads(leaves)
    ssd_worst = max([_rel(y, ref)] + [_rel(a, b) for a, b in zip(fast, slow, strict=True)])

    channels = h * p
    tokens_first = rand(1, T, channels)  # channel-last, as the mixer passes it (the kernel's seq_idx needs it)
    xc = tokens_first.transpose(1, 2)
    w, bias = rand(channels, 4, scale=0.5), rand(channels, scale=0.1)
    out = causal_conv1d(xc, w, bias, seq_idx=seq_idx)
    cprobe = torch.randn(out.shape, generator=gen).to(device)
    (out.float() * cprobe).sum().backward()
    fast = _grads([tokens_first, w, bias])
    ref = torch.cat([causal_conv1d_ref(xc[:, :, a:b], w, bias) for a, b in _runs(seq_idx)], dim=2)
    (ref.float() * cprobe).sum().backward()
    slow = _grads([tokens_first, w, bias])
    conv_worst = max([_rel(out, ref)] + [_rel(a, b) for a, b in zip(fast, slow, strict=True)])
    return {"ssd": dispatch.describe(dispatch.SSD_SCAN, device), "conv1d": dispatch.describe(dispatch.CAUSAL_CONV1D, device),
            "documents": [b - a for a, b in _runs(seq_idx)], "ssd max rel error": ssd_worst,
            "conv1d max rel error": conv_worst, "ok": max(ssd_worst, conv_worst) <= sizes.tolerance}


def stage_attention(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    config = HybridConfig(vocab_size=128, hidden_size=sizes.attn_heads * sizes.attn_head_dim,
                          hybrid_override_pattern="*", num_attention_heads=sizes.attn_heads,
                          num_key_value_heads=sizes.kv_heads, head_dim=sizes.attn_head_dim)
    torch.manual_seed(0)
    layer = attn.Attention(config).to(device)
    seq_idx = _seq_idx(sizes, device)
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    results: dict[str, Any] = {}
    worst = 0.0
    for dtype in dtypes:
        layer.to(dtype)
        hidden = torch.randn(1, sizes.seq_len, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
        leaves = [hidden, *layer.parameters()]

        def run(path: str, backward: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
            if not backward:
                with torch.no_grad():
                    return layer(hidden, attn.prepare_documents(seq_idx, path)), []
            out = layer(hidden, attn.prepare_documents(seq_idx, path))
            out.float().square().mean().backward()
            return out.detach(), _grads(leaves)

        ref_out, ref_grads = run("dense", True)
        paths = {attn.attention_path(device, dtype, sizes.attn_head_dim, True), "flex"}
        for path in sorted(paths):
            backward = not (path == "flex" and device.type == "cpu")
            out, grads = run(path, backward)
            errors = [_rel(out, ref_out)] + [_rel(a, b) for a, b in zip(grads, ref_grads)]
            tolerance = sizes.tolerance if dtype == torch.float32 else 5e-2
            results[f"{path} {str(dtype).removeprefix('torch.')}"] = max(errors)
            worst = max(worst, max(errors) / tolerance)
    results["ok"] = worst <= 1.0
    return results


def _time(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (allocations, kernel selection)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def stage_experts(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    choice = torch.rand(sizes.expert_tokens, sizes.experts, generator=gen).topk(sizes.top_k, dim=1).indices
    counts = torch.bincount(choice.flatten(), minlength=sizes.experts).to(device)
    rows = int(counts.sum())
    x = (torch.randn(rows, sizes.hidden, generator=gen) * 0.5).to(device, dtype).requires_grad_(True)
    up = (torch.randn(sizes.experts, sizes.expert_inner, sizes.hidden, generator=gen) * 0.02).to(device, dtype)
    down = (torch.randn(sizes.experts, sizes.hidden, sizes.expert_inner, generator=gen) * 0.02).to(device, dtype)
    up.requires_grad_(True)
    down.requires_grad_(True)
    leaves = [x, up, down]

    def step(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = fn(x, up, down, counts)
        out.float().square().mean().backward()
        return out.detach(), _grads(leaves)

    fast_out, fast = step(grouped_experts)
    slow_out, slow = step(looped_experts)
    worst = max([_rel(fast_out, slow_out)] + [_rel(a, b) for a, b in zip(fast, slow, strict=True)])
    grouped_s = _time(lambda: step(grouped_experts), device)
    looped_s = _time(lambda: step(looped_experts), device)
    tolerance = sizes.tolerance if dtype == torch.float32 else 2e-2
    return {"experts": sizes.experts, "top_k": sizes.top_k, "tokens": sizes.expert_tokens, "dtype": str(dtype),
            "max rel error": worst, "grouped s": grouped_s, "loop s": looped_s,
            "loop / grouped": looped_s / grouped_s, "ok": worst <= tolerance}


def stage_loss(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(1, sizes.loss_tokens, sizes.hidden, generator=gen).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(sizes.vocab, sizes.hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, sizes.vocab, (1, sizes.loss_tokens), generator=gen).to(device)
    mask = (torch.rand(1, sizes.loss_tokens, generator=gen) > 0.2).to(device, torch.float32)
    results: dict[str, Any] = {"vocab": sizes.vocab, "tokens": sizes.loss_tokens}
    outputs = {}
    for name, fn in (("chunked", chunked_linear_cross_entropy), ("plain", linear_cross_entropy_reference)):
        _reset_peak(device)
        base = _peak(device)
        loss = fn(hidden, weight, labels, mask)
        loss.backward()
        _sync(device)
        peak = _peak(device)
        if peak is not None:
            results[f"{name} peak GB"] = peak - base
        outputs[name] = (loss.detach(), _grads([hidden, weight]))
    (a, ga), (b, gb) = outputs["chunked"], outputs["plain"]
    worst = max([_rel(a, b)] + [_rel(x, y) for x, y in zip(ga, gb, strict=True)])
    tolerance = sizes.tolerance if dtype == torch.float32 else 2e-2
    results.update({"max rel error": worst, "ok": worst <= tolerance})
    return results


def _train_config(sizes: Sizes) -> HybridConfig:
    if sizes is GPU:  # Nemotron 3 Nano's widths, six layers; 32 of its 128 experts (1.5B parameters, so the
        # checkpoint of the resume stage, 18 GB with Adam state, fits the machine's disk; the experts stage has 128)
        raw = json.loads(NANO_CONFIG.read_text(encoding="utf-8"))
        raw.pop("layers_block_type", None)
        raw.update(hybrid_override_pattern=sizes.train_layers, num_hidden_layers=len(sizes.train_layers),
                   n_routed_experts=32)
        return HybridConfig.from_dict(raw, source=str(NANO_CONFIG))
    return HybridConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, hybrid_override_pattern=sizes.train_layers,
        mamba_num_heads=sizes.mamba_heads, mamba_head_dim=sizes.mamba_head_dim, ssm_state_size=sizes.state,
        n_groups=sizes.mamba_groups, chunk_size=sizes.chunk, num_attention_heads=sizes.attn_heads,
        num_key_value_heads=sizes.kv_heads, head_dim=sizes.attn_head_dim, n_routed_experts=sizes.experts,
        num_experts_per_tok=sizes.top_k, moe_intermediate_size=sizes.expert_inner,
        moe_shared_expert_intermediate_size=2 * sizes.expert_inner, n_group=1, topk_group=1)


def _train_batch(config: HybridConfig, sizes: Sizes) -> dict[str, torch.Tensor]:
    """Packed rows of three documents each, every token in the loss: fixed, so the loss falls."""
    gen = torch.Generator().manual_seed(1)
    T = sizes.train_seq_len
    ids = torch.randint(3, config.vocab_size, (sizes.train_rows, T + 1), generator=gen)
    cuts = (T // 5, T // 2)
    seq_idx = (torch.arange(T) >= cuts[0]).long() + (torch.arange(T) >= cuts[1]).long()
    seq_idx = seq_idx.expand(sizes.train_rows, T).contiguous()
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(sizes.train_rows, T, dtype=torch.long),
            "seq_idx": seq_idx}


class _Run:
    """One process's native training step: bf16 autocast over fp32 master weights, AdamW."""

    def __init__(self, config: HybridConfig, backend: NativeBackend, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.backend = backend
        self.model = backend.wrap(HybridModel(config), precision="bf16")
        self.optimizer = build_adamw(self.model, 3e-4 if config.hidden_size > 1000 else 3e-3)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        tokens = float(batch["loss_mask"].sum())
        loss = accumulate_gradients(self.model, [batch], tokens, self.backend, precision="bf16")
        clip_grad_norm(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss) / tokens


def stage_train_and_resume(sizes: Sizes, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    config = _train_config(sizes)
    backend = NativeBackend(1)
    _reset_peak(device)
    run = _Run(config, backend)
    kernels = implementations(run.model, device, torch.bfloat16)
    batch = _train_batch(config, sizes)
    tokens = int(batch["loss_mask"].sum())
    losses, times = [], []
    save_at = sizes.train_steps - 1
    with tempfile.TemporaryDirectory(prefix="hebtron-smoke-") as tmp:
        for step in range(sizes.train_steps):
            if step == save_at:  # the state before the last step, to replay it from disk
                save_checkpoint(Path(tmp), step, dict(hf_tensors_from_state(run.model.state_dict())),
                                run.optimizer.state_dict(), {}, extra_files={"config.json": json.dumps(config.to_hf_dict())})
            _sync(device)
            start = time.perf_counter()
            losses.append(run.step(batch))
            _sync(device)
            times.append(time.perf_counter() - start)
        peak = _peak(device)
        steady = times[3:] or times
        train = {"layers": config.hybrid_override_pattern, "hidden": config.hidden_size,
                 "parameters (B)": config.num_parameters() / 1e9, "kernels": kernels,
                 "rows x seq_len": [sizes.train_rows, sizes.train_seq_len], "first loss": losses[0],
                 "last loss": losses[-1], "tokens/s": tokens / (sum(steady) / len(steady)),
                 **({"peak GB": peak} if peak is not None else {"peak RSS GB (process)": _peak_rss_gb()}),
                 "ok": all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1}

        fresh = _Run(config, backend, seed=1)  # other initial weights: the checkpoint must replace them
        path = Path(tmp) / f"step_{save_at:08d}"
        _, optim_state, _ = load_checkpoint(path, device=device)
        fresh.model.load_state_dict(load_hf_state_dict(path, config))
        fresh.optimizer.load_state_dict(optim_state)
        replay = fresh.step(batch)
    exact = device.type == "cpu"
    same = replay == losses[-1] if exact else abs(replay - losses[-1]) <= 1e-4 * abs(losses[-1])
    resume = {"saved before step": save_at + 1, "replayed loss": replay, "original loss": losses[-1],
              "compared": "bitwise" if exact else "within 1e-4 relative (GPU kernels use atomics)", "ok": same}
    return train, resume


# ----------------------------------------------------------------------------- driver
def run_stages(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - a stage's failure is reported, the others still run
            stages.append({"stage": name, "ok": False, "error": f"{type(err).__name__}: {err}".splitlines()[0][:400],
                           "where": traceback.format_exc().strip().splitlines()[-3:], "s": time.perf_counter() - start})
            return None
        items = result if isinstance(result, tuple) else (result,)
        names = name.split("+")
        for stage_name, values in zip(names, items, strict=True):
            stages.append({"stage": stage_name, "ok": bool(values.pop("ok", True)), **values,
                           "s": time.perf_counter() - start})
        return result

    attempt("env", lambda: stage_env(sizes, device))
    attempt("mamba kernels", lambda: stage_mamba(sizes, device))
    attempt("attention", lambda: stage_attention(sizes, device))
    attempt("experts", lambda: stage_experts(sizes, device))
    attempt("loss", lambda: stage_loss(sizes, device))
    attempt("train+resume", lambda: stage_train_and_resume(sizes, device))
    return stages


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="toy sizes on CPU (the test suite runs this)")
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"))
    args = parser.parse_args(argv)
    if args.cpu_tiny:
        device, sizes = torch.device("cpu"), CPU_TINY
        attn.flex_compiled = False  # forward only on CPU: the uncompiled flex gives the same numbers, no 20 s compile
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", 0), GPU
    else:
        print("error: no CUDA device; run with --cpu-tiny for the toy-size version", file=sys.stderr)
        return 2
    started = time.perf_counter()
    stages = run_stages(sizes, device)
    report = {"mode": "cpu-tiny" if args.cpu_tiny else "gpu", "ok": all(s["ok"] for s in stages),
              "seconds": time.perf_counter() - started, "stages": stages}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"{'stage':<14} {'ok':<4} {'s':>6}  measured")
    for s in stages:
        details = {k: v for k, v in s.items() if k not in ("stage", "ok", "s")}
        print(f"{s['stage']:<14} {'yes' if s['ok'] else 'NO':<4} {s['s']:>6.1f}  {_show(details)}")
    print(f"{'all ok' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s; wrote {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
