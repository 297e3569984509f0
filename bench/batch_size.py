"""Adaptive (noise-scale driven) vs fixed global batch on the demo corpus, side by side.

Both runs start at the same global batch and learning rate on the same data order; the
adaptive run grows its batch toward the measured critical batch (B_simple) with the LR scaled
by sqrt(B / B_start). Reported: optimizer steps and tokens each run needs to reach the fixed
run's final Hebrew validation loss, and how the noise-scale estimate moved during training.
Figures are steps and tokens, not seconds, so machine load does not change them.

    OMP_NUM_THREADS=2 .venv/bin/python bench/batch_size.py [--tokens 80k]
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
    "model.init.max_position_embeddings=64", "model.init.ssm_state_size=32", "data.seq_len=64", "data.phases=[]", "train.schedule=constant", "train.warmup_tokens=8k", "train.min_lr=0",
    "train.lr=2e-3", "train.decay_tokens=null", "train.global_batch=4", "train.micro_batch=2", "train.eval_interval=10",
    "train.eval_batches=2", "checkpoint.interval=0", "logging.progress=false", "logging.tensorboard=false",
]


def run(name: str, tokens: str, extra: list[str]) -> list[dict]:
    from hebtron.recipe import load_recipe
    from hebtron.train.loop import Trainer
    from hebtron.train.metrics import read_metrics

    run_dir = RUNS / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = COMMON + [f"train.total_tokens={tokens}", f"logging.run_dir={run_dir}",
                          f"checkpoint.dir={run_dir}/checkpoints"] + extra
    trainer = Trainer(load_recipe("recipes/demo/cpt.yaml", overrides))
    trainer.run()
    trainer.close()
    return read_metrics(run_dir / "metrics.jsonl")


def first_reaching(records: list[dict], target: float) -> dict | None:
    return next((r for r in records if "val_loss/he_valid" in r and r["val_loss/he_valid"] <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="80k", help="token budget of each run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch_size.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from hebtron.demo import build_inputs

    build_inputs()
    fixed = run("fixed", args.tokens, [])
    adaptive = run("adaptive", args.tokens, [
        "batch_size={policy: adaptive, max: 32, k: 1.0, interval: 10, warmup_updates: 5, ema: 0.9}",
    ])
    target = fixed[-1]["val_loss/he_valid"]
    rows = []
    for name, records in (("fixed", fixed), ("adaptive", adaptive)):
        hit = first_reaching(records, target)
        noise = [r["noise/b_simple_seqs"] for r in records if "noise/b_simple_seqs" in r]
        rows.append({
            "run": name,
            "steps_to_target": hit["step"] if hit else None,
            "tokens_to_target": hit["tokens"] if hit else None,
            "final_val_loss": records[-1]["val_loss/he_valid"],
            "final_global_batch": records[-1]["global_batch"],
            "b_noise_seqs_first": noise[0] if noise else None,
            "b_noise_seqs_last": noise[-1] if noise else None,
            "steps": records[-1]["step"],
        })
    print(f"\nTarget: Hebrew validation loss {target:.4f} (the fixed run's final value), budget {args.tokens} tokens")
    print(f"{'run':>9} | {'steps to target':>15} | {'tokens to target':>16} | {'final val':>9} | "
          f"{'final batch':>11} | {'B_noise first -> last (seqs)':>28}")
    for r in rows:
        noise = (f"{r['b_noise_seqs_first']:.1f} -> {r['b_noise_seqs_last']:.1f}"
                 if r["b_noise_seqs_first"] is not None else "-")
        steps = f"{r['steps_to_target']:,}" if r["steps_to_target"] else "-"
        tokens = f"{r['tokens_to_target']:,}" if r["tokens_to_target"] else "-"
        print(f"{r['run']:>9} | {steps:>15} | {tokens:>16} | "
              f"{r['final_val_loss']:>9.4f} | {r['final_global_batch']:>11} | {noise:>28}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"target": target, "tokens": args.tokens, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
