"""The routing-collapse scenario side by side: no balancing vs each balancing method.

A tiny hybrid (M*EME, 8 experts top-2) whose deep MoE layer 4 sends Hebrew tokens to experts
0 and 1 from the start (``hebtron.monitor.skew``) trains 40 steps on the test fixture's
Hebrew/English data (tests/collapse_scenario.py), once per balancing setting, with the router
monitor every step and the rule "Hebrew load entropy < 0.6 for 3 records". Prints a table,
writes bench/results/router_collapse.json, the comparison plot router_collapse.png and each
run's ``hebtron report`` plots under bench/results/router_collapse/.

    OMP_NUM_THREADS=1 .venv/bin/python bench/router_collapse.py
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.collapse_scenario import SKEWED_LAYER, THRESHOLD, alarms, he_entropy, run_collapse  # noqa: E402
from tests.train_fixtures import build_training_fixture  # noqa: E402

OUT = REPO / "bench" / "results" / "router_collapse"
VARIANTS = {  # name: (run directory, moe recipe section)
    "no balancing": ("none", {}),
    "sequence aux 1e-2": ("sequence", {"aux_loss": {"sequence": 1e-2}}),
    "global-batch aux 1e-2": ("global_batch", {"aux_loss": {"global_batch": 1e-2}}),
    "micro-batch aux 1e-2": ("micro_batch", {"aux_loss": {"micro_batch": 1e-2}}),
    "expert bias 1e-2": ("expert_bias", {"bias_rate": 1e-2}),
}


def main() -> None:
    import contextlib
    import io

    from hebtron.monitor.plots import entropy_lines
    from hebtron.train.report import write_report

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    shutil.rmtree(OUT, ignore_errors=True)
    fixture = build_training_fixture(OUT / "fixture")
    runs, rows = {}, []
    for name, (slug, moe) in VARIANTS.items():
        run_dir = OUT / slug
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            records = run_collapse(fixture, run_dir, moe)
        runs[name] = records
        he = he_entropy(records)
        fired = alarms(records)
        write_report(run_dir)
        rows.append({"variant": name, "he_entropy_step1": he[0], "he_entropy_last10": statistics.mean(he[-10:]),
                     "en_entropy_last10": statistics.mean(
                         r["router"][f"layer_{SKEWED_LAYER}"]["en"]["load_entropy"] for r in records[-10:]),
                     "alarms": len(fired), "first_alarm_step": fired[0][0] if fired else None,
                     "loss_last": records[-1]["loss"], "wall_s": time.perf_counter() - start})
    fig = entropy_lines(runs, SKEWED_LAYER, "he", THRESHOLD)
    fig.savefig(OUT / "router_collapse.png", dpi=110, bbox_inches="tight")
    print(f"Hebrew load entropy in MoE layer {SKEWED_LAYER} (skewed at init), 40 steps, alarm below {THRESHOLD}")
    print(f"{'variant':<24} {'he step 1':>9} {'he last 10':>10} {'en last 10':>10} {'alarms':>6} {'1st':>4} "
          f"{'loss':>6} {'wall s':>6}")
    for r in rows:
        first = "-" if r["first_alarm_step"] is None else str(r["first_alarm_step"])
        print(f"{r['variant']:<24} {r['he_entropy_step1']:>9.3f} {r['he_entropy_last10']:>10.3f} "
              f"{r['en_entropy_last10']:>10.3f} {r['alarms']:>6} {first:>4} {r['loss_last']:>6.3f} {r['wall_s']:>6.1f}")
    shutil.rmtree(OUT / "fixture", ignore_errors=True)
    (OUT.parent / "router_collapse.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(f"plots: {OUT}/router_collapse.png and {OUT}/<variant>/report/*.png")


if __name__ == "__main__":
    main()
