"""Adaptive (noise-scale driven) vs fixed global batch on the demo corpus, side by side.

All runs start at the same global batch (4 sequences of 64 tokens, one per micro-batch) and
learning rate, on the same data order and cosine schedule (in tokens). The adaptive runs grow
their batch toward the measured critical batch (B_simple), at most 2x per decision, with the
LR scaled by sqrt(B / B_start). Reported: for several Hebrew validation-loss targets, the
optimizer steps and tokens each run needs to reach them, and how the noise-scale estimate
moves during training. Figures are steps and tokens, not seconds, so machine load does not
change them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batch_size.py [--tokens 160k] [--max 16 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

RUNS = Path("runs/bench/batch_size")
COMMON = [
    "model.init.hidden_size=64", "model.init.mamba_num_heads=2", "model.init.num_attention_heads=2",
    "model.init.num_key_value_heads=1", "model.init.head_dim=32", "model.init.intermediate_size=128",
    "model.init.moe_intermediate_size=64", "model.init.moe_shared_expert_intermediate_size=64",
    "model.init.max_position_embeddings=64", "model.init.ssm_state_size=32", "data.seq_len=64", "data.phases=[]",
    "train.schedule=cosine", "train.warmup_tokens=8k", "train.min_lr=0", "train.lr=2e-3", "train.decay_tokens=null",
    "train.global_batch=4", "train.micro_batch=1", "train.eval_interval=5", "train.eval_batches=2",
    "checkpoint.interval=0", "logging.progress=false", "logging.tensorboard=false",
]
ESTIMATE = "ema: 0.98"
ADAPTIVE = "policy: adaptive, k: 1.0, interval: 20, warmup_updates: 40, max_growth: 2.0"
VAL = "val_loss/he_valid"


def run(name: str, tokens: str, extra: list[str]) -> list[dict]:
    from hebtron.recipe import load_recipe
    from hebtron.backends.engines import make_trainer
    from hebtron.train.metrics import read_metrics

    run_dir = RUNS / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = COMMON + [f"train.total_tokens={tokens}", f"logging.run_dir={run_dir}",
                          f"checkpoint.dir={run_dir}/checkpoints"] + extra
    trainer = make_trainer(load_recipe("recipes/demo/cpt.yaml", overrides))
    trainer.run()
    trainer.close()
    return read_metrics(run_dir / "metrics.jsonl")


def first_reaching(records: list[dict], target: float) -> dict | None:
    return next((r for r in records if VAL in r and r[VAL] <= target), None)


def quarter_means(records: list[dict]) -> list[float]:
    """Mean B_simple (sequences) over each quarter of the run's measured steps."""
    values = [r["noise/b_simple_seqs"] for r in records if r.get("noise/b_simple_seqs") is not None]
    q = max(1, len(values) // 4)
    return [sum(values[i * q:(i + 1) * q]) / len(values[i * q:(i + 1) * q]) for i in range(4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="160k", help="token budget of each run")
    parser.add_argument("--max", type=int, nargs="+", default=[16, 32], help="largest batch of each adaptive run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch_size.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from hebtron.demo.run import build_inputs

    build_inputs()
    runs = {"fixed 4": run("fixed", args.tokens, [f"batch_size={{policy: fixed, {ESTIMATE}}}"])}
    for top in args.max:
        runs[f"adaptive 4-{top}"] = run(f"adaptive_{top}", args.tokens,
                                        [f"batch_size={{{ADAPTIVE}, max: {top}, {ESTIMATE}}}"])

    fixed_vals = [r for r in runs["fixed 4"] if VAL in r]
    targets = sorted({round(fixed_vals[min(len(fixed_vals) - 1, len(fixed_vals) * i // 4)][VAL], 3)
                      for i in (1, 2, 3, 4)}, reverse=True)
    table = []
    print(f"\nHebrew validation-loss targets (the fixed run's at 1/4, 1/2, 3/4 and all of {args.tokens} tokens)")
    print(f"{'target':>7} | " + " | ".join(f"{name:>24}" for name in runs) + " | fewest steps vs fixed")
    for target in targets:
        cells, row = [], {"target": target}
        for name, records in runs.items():
            hit = first_reaching(records, target)
            row[name] = {"steps": hit["step"], "tokens": hit["tokens"]} if hit else None
            cells.append(f"{hit['step']:>5} steps {hit['tokens']:>8,} tok" if hit else f"{'not reached':>24}")
        fixed_steps = row["fixed 4"]["steps"] if row["fixed 4"] else None
        best = min((v["steps"] for k, v in row.items() if k.startswith("adaptive") and v), default=None)
        ratio = f"{fixed_steps / best:.2f}x fewer" if fixed_steps and best else "-"
        print(f"{target:>7.3f} | " + " | ".join(f"{c:>24}" for c in cells) + f" | {ratio}")
        table.append(row)

    print(f"\n{'run':>16} | {'steps':>5} | {'final batch':>11} | {'final val':>9} | {'spikes':>6} | "
          f"B_simple (seqs), mean per quarter of the run")
    summary = {}
    for name, records in runs.items():
        last, quarters = records[-1], quarter_means(records)
        final_val = [r for r in records if VAL in r][-1][VAL]
        summary[name] = {"steps": last["step"], "tokens": last["tokens"], "final_batch": last["global_batch"],
                         "final_val_loss": final_val, "noise_spikes": last.get("noise/spikes", 0),
                         "b_simple_seqs_quarters": quarters}
        print(f"{name:>16} | {last['step']:>5} | {last['global_batch']:>11} | {final_val:>9.4f} | "
              f"{last.get('noise/spikes', 0):>6} | " + " -> ".join(f"{q:.0f}" for q in quarters))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "targets": table, "runs": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
