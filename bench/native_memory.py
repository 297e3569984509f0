"""Peak memory of the native backend's attention and loss, old way against new, on CPU.

Each case runs forward + backward in a fresh subprocess and reports that process's peak
resident memory (``ru_maxrss``) above its own baseline (after imports and inputs, before the
measured call), so cases never share an allocator:

- one attention layer on one packed row of 16 documents at T = 8,192 and 32,768: the dense
  (b, 1, T, T) document mask (the reference) against the path training takes (``auto``: on CPU
  causal SDPA per document; FlexAttention or varlen on CUDA). Judged by the growth from 8k to
  32k: the new path's must be at most 1/4 of the dense path's;
- the loss at (1, 8192, 131072): full fp32 logits and ``F.cross_entropy`` against the chunked
  head + cross-entropy (``kernels/chunked_ce.py``); the chunked peak must be at most 1/4 of the
  plain one.

    OMP_NUM_THREADS=2 .venv/bin/python bench/native_memory.py [--out bench/native_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTENTION = dict(heads=4, kv_heads=2, head_dim=32)
DOCUMENTS = 16
LOSS = dict(tokens=8192, hidden=1024, vocab=131072)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _case_attention(path: str, seq_len: int) -> float:
    import torch

    from hebtron.model import HybridConfig
    from hebtron.model import attention as attn

    heads, kv, hd = ATTENTION["heads"], ATTENTION["kv_heads"], ATTENTION["head_dim"]
    config = HybridConfig(vocab_size=64, hidden_size=heads * hd, hybrid_override_pattern="*",
                          num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd)
    torch.manual_seed(0)
    layer = attn.Attention(config)
    cut = torch.linspace(0, seq_len, DOCUMENTS + 1).long()
    seq_idx = torch.zeros(1, seq_len, dtype=torch.long)
    for i in range(DOCUMENTS):
        seq_idx[0, cut[i]:cut[i + 1]] = i
    hidden = torch.randn(1, seq_len, config.hidden_size, requires_grad=True)
    chosen = attn.attention_path(hidden.device, hidden.dtype, hd, True) if path == "auto" else path
    base = _rss_gb()
    out = layer(hidden, attn.prepare_documents(seq_idx, chosen))
    out.square().mean().backward()
    return _rss_gb() - base


def _case_loss(kind: str) -> float:
    import torch

    from hebtron.kernels.chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_reference

    gen = torch.Generator().manual_seed(0)
    n, h, v = LOSS["tokens"], LOSS["hidden"], LOSS["vocab"]
    hidden = torch.randn(1, n, h, generator=gen).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) * 0.02).requires_grad_(True)
    labels = torch.randint(0, v, (1, n), generator=gen)
    mask = torch.ones(1, n)
    base = _rss_gb()
    fn = chunked_linear_cross_entropy if kind == "chunked" else linear_cross_entropy_reference
    fn(hidden, weight, labels, mask).backward()
    return _rss_gb() - base


def _measure(*case: str) -> float:
    """One case in its own process: its peak RSS above its baseline, in GB."""
    proc = subprocess.run([sys.executable, __file__, "--case", *case], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"case {' '.join(case)} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "native_memory.json")
    args = parser.parse_args(argv)
    if args.case:
        kind, *rest = args.case
        value = _case_attention(rest[0], int(rest[1])) if kind == "attention" else _case_loss(rest[0])
        print(f"{value:.6f}")
        return 0

    rows = []
    for path in ("dense", "auto"):
        for seq_len in (8192, 32768):
            rows.append({"case": f"attention {path}", "T": seq_len, "peak_gb": _measure("attention", path, str(seq_len))})
    for kind in ("plain", "chunked"):
        rows.append({"case": f"loss {kind}", "T": LOSS["tokens"], "peak_gb": _measure("loss", kind)})
    peak = {(r["case"], r["T"]): r["peak_gb"] for r in rows}
    dense_growth = peak[("attention dense", 32768)] - peak[("attention dense", 8192)]
    new_growth = peak[("attention auto", 32768)] - peak[("attention auto", 8192)]
    loss_ratio = peak[("loss chunked", LOSS["tokens"])] / peak[("loss plain", LOSS["tokens"])]
    summary = {
        "attention growth 8k->32k, dense GB": dense_growth,
        "attention growth 8k->32k, new GB": new_growth,
        "attention growth ratio (new / dense, target <= 0.25)": new_growth / dense_growth,
        "loss peak ratio (chunked / plain, target <= 0.25)": loss_ratio,
    }
    ok = new_growth <= 0.25 * dense_growth and loss_ratio <= 0.25
    print(f"{'case':<20} {'T':>6} {'peak GB above baseline':>24}")
    for r in rows:
        print(f"{r['case']:<20} {r['T']:>6} {r['peak_gb']:>24.3f}")
    for name, value in summary.items():
        print(f"{name}: {value:.3f}")
    print("targets met" if ok else "TARGETS MISSED")
    config = {"attention": ATTENTION | {"documents": DOCUMENTS}, "loss": LOSS}
    args.out.write_text(json.dumps({"config": config, "rows": rows, "summary": summary, "ok": ok}, indent=2),
                        encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
