"""Mixture search on the demo corpus: ~16 tiny proxies, then the proposal checked against the
natural (size-proportional) and uniform mixtures at equal tokens on Hebrew validation loss.

Sources: the demo corpus split by origin — Hebrew news (UD Hebrew-HTB), Hebrew Bible, Hebrew UI
strings, and the English slice: English Bible (JPS 1917) and English UI strings. Targets: Hebrew
news and Hebrew UI validation documents (the objective is their mean loss). Proxies:
``recipes/demo/mix_proxy.yaml`` (~1M parameters, 300k tokens, ~293 steps), run by
``hebtron data mix-search`` two at a time with one thread each. The check runs use the same
recipe and token budget, with ``--seeds`` seeds each.

    .venv/bin/python bench/mix_search.py            # ~8 minutes on 2 cores
Prints a table and writes bench/results/mix_search.json. Needs the demo corpus and tokenizer
(built here when missing: `hebtron data demo` downloads the packages once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "runs" / "demo" / "data"
TOKENIZER = ROOT / "runs" / "demo" / "tokenizer"
WORK = ROOT / "runs" / "bench_mix"
PROXY_RECIPE = ROOT / "recipes" / "demo" / "mix_proxy.yaml"
# output name -> (demo file, demo source)
SPLITS = {
    "he_news": ("he_train", "ud-hebrew-htb"),
    "he_bible": ("he_train", "wlc-bible"),
    "he_ui": ("he_train", "jupyterlab-he-ui"),
    "en_bible": ("en_train", "jps1917-bible"),
    "en_ui": ("en_train", "jupyterlab-en-ui"),
    "he_news_valid": ("he_valid", "ud-hebrew-htb"),
    "he_ui_valid": ("he_valid", "jupyterlab-he-ui"),
}
SOURCES = ["he_news", "he_bible", "he_ui", "en_bible", "en_ui"]
TARGETS = ["he_news_valid", "he_ui_valid"]
BOUNDS = (0.02, 0.8)  # every source keeps at least 2% and at most 80% of the proposal


def build_data() -> dict[str, Path]:
    """Per-source indexed datasets from the demo corpus (skipped when already made)."""
    if not (DATA / "he_train.jsonl").is_file() or not (TOKENIZER / "tokenizer.json").is_file():
        os.chdir(ROOT)
        from hebtron.demo.run import build_inputs

        build_inputs()
    from hebtron.data.indexed import prepare

    out = WORK / "data"
    out.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    for name, (split, source) in SPLITS.items():
        prefix = out / name
        prefixes[name] = prefix
        if Path(f"{prefix}.idx").is_file():
            continue
        lines = [ln for ln in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
                 if json.loads(ln)["source"] == source]
        jsonl = out / f"{name}.jsonl"
        jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prepare([jsonl], str(TOKENIZER), prefix)
    return prefixes


def write_spec(prefixes: dict[str, Path], runs: int) -> Path:
    spec = {
        "proxy": {"recipe": str(PROXY_RECIPE), "overrides": []},
        "sources": [{"name": n, "path": str(prefixes[n]), "lang": n[:2], "min": BOUNDS[0], "max": BOUNDS[1]}
                    for n in SOURCES],
        "targets": [{"name": t, "path": str(prefixes[t]), "lang": "he", "weight": 1.0} for t in TARGETS],
        "search": {"runs": runs, "alpha": 1.0, "seed": 0, "model": "auto"},
        "fragment": {"extends": None},
    }
    path = WORK / "mix_search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=16, help="proxy runs")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per check run")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="delete earlier proxy and check runs first")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "mix_search.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    from hebtron.launch.mix.proxies import ProxyRun, run_all
    from hebtron.launch.mix.search import mix_search
    from hebtron.launch.mix.spec import load_spec

    t0 = time.perf_counter()
    if args.fresh:
        import shutil

        for sub in ("search", "checks"):
            shutil.rmtree(WORK / sub, ignore_errors=True)
    prefixes = build_data()
    spec_path = write_spec(prefixes, args.runs)
    t_search = time.perf_counter()
    report = mix_search(spec_path, WORK / "search", parallel=args.parallel, threads=1)
    search_s = time.perf_counter() - t_search

    spec = load_spec(spec_path)
    mixtures = {label: report[label]["weights"] for label in ("proposal", "natural", "uniform")}
    checks = [ProxyRun(f"{label}_seed{k}", weights, WORK / "checks" / f"{label}_seed{k}", (f"train.seed={1234 + k}",))
              for label, weights in mixtures.items() for k in range(args.seeds)]
    t_check = time.perf_counter()
    run_all(spec, checks, args.parallel, 1, print)
    check_s = time.perf_counter() - t_check

    rows = {}
    for label, weights in mixtures.items():
        results = [json.loads(r.result.read_text()) for r in checks if r.name.startswith(f"{label}_seed")]
        rows[label] = {
            "weights": weights,
            "predicted": report[label]["predicted_objective"],
            "objective": sum(r["objective"] for r in results) / len(results),
            "objective_per_seed": [round(r["objective"], 4) for r in results],
            **{t: sum(r["val_loss"][t] for r in results) / len(results) for t in TARGETS},
        }
    best_baseline = min(rows["natural"]["objective"], rows["uniform"]["objective"])
    verdict = "no worse" if rows["proposal"]["objective"] <= best_baseline else "worse"
    header = f"{'mixture':<9}" + "".join(f"{n:>9}" for n in SOURCES) + f"{'predicted':>10}{'real':>8}" \
        + "".join(f"{t:>15}" for t in TARGETS) + "   per seed"
    print()
    print(f"regression: ridge on {report['regression']['chosen']} features; held-out (leave-one-out) Spearman "
          f"{report['regression']['held_out_spearman']} over {len(report['runs'])} proxies")
    for f in report["regression"]["fits"]:
        print(f"  {f['features']:<9} LOO RMSE {f['loo_rmse']:.4f}  Spearman {f['loo_spearman']:.3f}  "
              f"alpha {f['ridge_alpha']:.2g}")
    print(header)
    for label, r in rows.items():
        print(f"{label:<9}" + "".join(f"{r['weights'][n]:>9.3f}" for n in SOURCES)
              + f"{r['predicted']:>10.4f}{r['objective']:>8.4f}" + "".join(f"{r[t]:>15.4f}" for t in TARGETS)
              + "   " + ", ".join(f"{v:.4f}" for v in r["objective_per_seed"]))
    best_proxy = report["best_proxy"]
    print(f"best proxy: {best_proxy['name']} objective {best_proxy['objective']:.4f}")
    print(f"proposal vs the better of natural and uniform: {rows['proposal']['objective'] - best_baseline:+.4f} "
          f"({verdict}); search {search_s:.0f} s, checks {check_s:.0f} s, total {time.perf_counter() - t0:.0f} s")
    payload = {
        "sources": SOURCES, "targets": TARGETS, "bounds": BOUNDS, "proxies": len(report["runs"]),
        "proxy_recipe": str(PROXY_RECIPE.relative_to(ROOT)), "seeds_per_check": args.seeds,
        "regression": report["regression"], "runs": report["runs"], "checks": rows,
        "proposal_minus_best_baseline": rows["proposal"]["objective"] - best_baseline, "verdict": verdict,
        "seconds": {"search": round(search_s, 1), "checks": round(check_s, 1), "total": round(time.perf_counter() - t0, 1)},
        "threads": {"parallel": args.parallel, "per_run": 1}, "cpus": os.cpu_count(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
