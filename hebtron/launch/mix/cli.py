"""``hebtron data mix-search``: the parser and handler, added to the ``data`` group by
:mod:`hebtron.data.commands` (the search trains, so its code lives here, above ``train``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(data_sub: argparse._SubParsersAction) -> None:
    ms = data_sub.add_parser("mix-search", help="RegMix-style mixture search: proxy runs, regression, proposed weights")
    ms.add_argument("spec", type=Path, help="mix-search YAML: proxy recipe, sources with bounds, targets, search")
    ms.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="plan.json, runs/, proposal.yaml (recipe fragment), report.md/.json; rerun to resume")
    ms.add_argument("--parallel", type=int, default=1, help="proxy runs trained at the same time (processes)")
    ms.add_argument("--threads", type=int, default=1, help="torch threads per proxy run")
    ms.add_argument("--slurm", default=None, metavar="PROFILE",
                    help="submit the unfinished proxy runs as one job array with this cluster profile (slurm/NAME.yaml)")
    ms.set_defaults(func=_mix_search)


def _mix_search(args: argparse.Namespace) -> int:
    from hebtron.launch.mix.search import mix_search

    r = mix_search(args.spec, args.out, parallel=args.parallel, threads=args.threads, slurm=args.slurm)
    if "submitted" in r:
        return 0
    reg, p = r["regression"], r["proposal"]
    print(f"{args.out}: {len(r['runs'])} proxy runs; ridge on {reg['chosen']} features, held-out Spearman "
          f"{reg['held_out_spearman']}")
    print("  proposal: " + ", ".join(f"{k} {v:.3f}" for k, v in p["weights"].items())
          + f" (predicted {p['predicted_objective']:.4f}; natural {r['natural']['predicted_objective']:.4f}, "
          f"uniform {r['uniform']['predicted_objective']:.4f})")
    print(f"  fragment {r['fragment']}; report {args.out / 'report.md'}")
    return 0
