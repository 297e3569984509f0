"""Training throughput of hebtron's HybridModel vs transformers' NemotronHForCausalLM.

Same ~5M-parameter configuration and the same weights for both; one training step is forward,
next-token loss, backward and an AdamW step, fp32 on CPU. The two models alternate step by
step so that machine noise hits both alike; the ratio is the figure to quote. Also reports
hebtron on packed rows (seq_idx), which transformers cannot compute exactly. hebtron's step is
its training path: hidden states out of the model, head + loss chunk by chunk.

A second table times one MoE layer alone (forward + backward): the routed experts through
``grouped_mm`` vs the per-expert loop (the reference), at the benchmark's widths and with
Nemotron 3 Nano's routing (128 experts, top-6).

    OMP_NUM_THREADS=2 .venv/bin/python bench/model_throughput.py [--steps 6] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hebtron.model import HybridConfig, HybridModel
from hebtron.model.hf import save_hf
from hebtron.model.moe import MoE
from hebtron.train.loss import token_loss_sum_from_hidden

BENCH_CONFIG = dict(
    vocab_size=4096, hidden_size=256, hybrid_override_pattern="MEM*ME", mamba_num_heads=8, mamba_head_dim=64,
    ssm_state_size=64, n_groups=1, conv_kernel=4, chunk_size=64, num_attention_heads=8, num_key_value_heads=2,
    head_dim=32, intermediate_size=512, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
    moe_shared_expert_intermediate_size=256, n_group=1, topk_group=1, routed_scaling_factor=1.0,
)


# MoE layer cases: (label, experts, top-k, expert FFN width)
MOE_CASES = [("bench config: 8 experts top-2", 8, 2, 256), ("Nano routing: 128 experts top-6", 128, 6, 64)]


def _step(model, optimizer, ids, **kwargs) -> float:
    start = time.perf_counter()
    if isinstance(model, HybridModel):  # the training path: no full logits
        hidden = model(ids, **kwargs, return_hidden=True).hidden
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        mask = (labels != -100).float()
        loss = token_loss_sum_from_hidden(hidden, model.lm_head.weight, labels, mask) / mask.sum()
    else:
        logits = model(ids, **kwargs).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(threads: int, steps: int, batch: int, seqlen: int) -> dict:
    from transformers import NemotronHForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = HybridConfig(**BENCH_CONFIG)
    ours = HybridModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, Path(tmp) / "m")
        theirs = NemotronHForCausalLM.from_pretrained(Path(tmp) / "m", local_files_only=True, dtype=torch.float32)
    ours.train()
    theirs.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    # packed rows: documents of 16..128 tokens
    gen = torch.Generator().manual_seed(1)
    seq_idx = torch.zeros_like(ids)
    for row in range(batch):
        pos, doc = 0, 0
        while pos < seqlen:
            n = int(torch.randint(16, 129, (1,), generator=gen))
            seq_idx[row, pos : pos + n] = doc
            pos, doc = pos + n, doc + 1
    times: dict[str, list[float]] = {"hebtron": [], "transformers": [], "hebtron_packed": []}
    for i in range(steps + 1):  # first step is warm-up
        t_ours = _step(ours, opt_ours, ids)
        t_theirs = _step(theirs, opt_theirs, ids)
        t_packed = _step(ours, opt_ours, ids, seq_idx=seq_idx)
        if i:
            times["hebtron"].append(t_ours)
            times["transformers"].append(t_theirs)
            times["hebtron_packed"].append(t_packed)
    tokens = batch * seqlen
    result = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    return {
        "threads": threads,
        "params_m": round(config.num_parameters() / 1e6, 2),
        "tokens_per_s": {k: round(v, 1) for k, v in result.items()},
        "ratio_vs_transformers": round(result["hebtron"] / result["transformers"], 2),
        "packed_ratio_vs_transformers": round(result["hebtron_packed"] / result["transformers"], 2),
    }


def run_moe(threads: int, steps: int, tokens: int) -> list[dict]:
    """One MoE layer, forward + backward, grouped_mm vs the loop, alternating call by call."""
    torch.set_num_threads(threads)
    rows = []
    for label, experts, top_k, width in MOE_CASES:
        config = HybridConfig(**{**BENCH_CONFIG, "n_routed_experts": experts, "num_experts_per_tok": top_k,
                                 "moe_intermediate_size": width})
        torch.manual_seed(0)
        layer = next(m for m in HybridModel(config).modules() if isinstance(m, MoE))
        x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(steps + 1):  # first round is warm-up
            for grouped in (True, False):
                layer.experts.grouped = grouped
                start = time.perf_counter()
                out, _ = layer(x)
                out.square().mean().backward()
                if i:
                    times[grouped].append(time.perf_counter() - start)
        grouped_ms, loop_ms = (1e3 * statistics.median(times[g]) for g in (True, False))
        rows.append({"threads": threads, "case": label, "tokens": tokens, "grouped_ms": round(grouped_ms, 2),
                     "loop_ms": round(loop_ms, 2), "loop_over_grouped": round(loop_ms / grouped_ms, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_throughput.json"))
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rows = [run(t, args.steps, args.batch, args.seqlen) for t in args.threads]
    moe_rows = [r for t in args.threads for r in run_moe(t, 3 * args.steps, args.batch * args.seqlen)]
    print(f"\nTraining tokens/s, batch {args.batch} x {args.seqlen}, fp32, fwd+bwd+AdamW, {rows[0]['params_m']}M params")
    print(f"{'threads':>7} | {'transformers':>12} | {'hebtron':>9} | {'hebtron packed':>14} | {'ratio':>5} | {'packed ratio':>12}")
    for r in rows:
        t = r["tokens_per_s"]
        print(
            f"{r['threads']:>7} | {t['transformers']:>12.0f} | {t['hebtron']:>9.0f} | {t['hebtron_packed']:>14.0f} | "
            f"{r['ratio_vs_transformers']:>4.2f}x | {r['packed_ratio_vs_transformers']:>11.2f}x"
        )
    print(f"\nOne MoE layer, forward + backward, {args.batch * args.seqlen} tokens, fp32 (median ms)")
    print(f"{'threads':>7} | {'case':<32} | {'grouped_mm':>10} | {'loop':>8} | {'loop / grouped':>14}")
    for r in moe_rows:
        print(f"{r['threads']:>7} | {r['case']:<32} | {r['grouped_ms']:>10.2f} | {r['loop_ms']:>8.2f} | "
              f"{r['loop_over_grouped']:>13.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": BENCH_CONFIG, "batch": args.batch, "seqlen": args.seqlen, "rows": rows,
                                    "moe_layer": moe_rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
