"""``hebtron data dedup`` and ``hebtron data cluster``: the parsers and handlers (added to the
``data`` group by :mod:`hebtron.data.commands`; ``data mix-search`` comes from
:mod:`hebtron.mix.commands`, which sits above training)."""

from __future__ import annotations

import argparse
from pathlib import Path

INPUT_HELP = ".jsonl (field text; optional source), .parquet, or a save_to_disk directory; in order"


def register(data_sub: argparse._SubParsersAction) -> None:
    dd = data_sub.add_parser("dedup", help="remove exact and near-duplicate documents (Hebrew-aware, MinHash LSH)")
    dd.add_argument("--input", nargs="+", required=True, metavar="FILE", help=INPUT_HELP)
    dd.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="kept.jsonl, duplicates.jsonl, report.json, report.md")
    dd.add_argument("--threshold", type=float, default=0.8, help="Jaccard of shingle sets for a near duplicate")
    dd.add_argument("--shingle", choices=["word", "char"], default="word", help="n-grams of words or characters")
    dd.add_argument("--ngram", type=int, default=3, help="shingle length (words or characters)")
    dd.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    dd.add_argument("--seed", type=int, default=1, help="MinHash seed")
    dd.add_argument("--exact-only", action="store_true", help="only the normalized-text hash, no MinHash")
    dd.add_argument("--skip-empty", action="store_true", help="list empty documents instead of failing")
    dd.set_defaults(func=_dedup)

    cl = data_sub.add_parser("cluster", help="content clusters: hashing TF-IDF + LSA + MiniBatchKMeans, with a report")
    cl.add_argument("--input", nargs="+", required=True, metavar="FILE", help=INPUT_HELP)
    cl.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="clusters/cluster_NN.jsonl, assignments.jsonl, tails.jsonl, report.md/.png/.json")
    cl.add_argument("--k", type=int, required=True, help="number of clusters")
    cl.add_argument("--sample", type=int, default=20_000, help="documents the model is fitted on (reservoir sample)")
    cl.add_argument("--dims", type=int, default=100, help="LSA dimensions")
    cl.add_argument("--restarts", type=int, default=8, help="k-means seeds; the lowest inertia wins")
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--tail-sigma", type=float, default=2.0, help="tail: distance > mean + this many sigma")
    cl.add_argument("--label-field", default=None,
                    help="a field with known content types: the report adds purity and a label x cluster table")
    cl.add_argument("--tokenizer", default=None,
                    help="also tokenize every cluster into an indexed dataset (data prepare) and write sources.yaml")
    cl.add_argument("--skip-empty", action="store_true", help="drop empty documents instead of failing")
    cl.set_defaults(func=_cluster)


def _dedup(args: argparse.Namespace) -> int:
    from hebtron.data.dedup import DedupConfig, dedup_corpus

    config = DedupConfig(threshold=args.threshold, shingle=args.shingle, ngram=args.ngram, num_perm=args.num_perm,
                         seed=args.seed, near=not args.exact_only, skip_empty=args.skip_empty)
    r = dedup_corpus(args.input, args.out, config)
    saved = sum(s["bytes_saved"] for s in r["per_source"].values())
    print(f"{args.out}: {r['input_lines']:,} lines, {r['documents']:,} documents: kept {r['kept']:,}, "
          f"exact duplicates {r['exact_duplicates']:,}, near duplicates {r['near_duplicates']:,} "
          f"({saved:,} bytes saved) in {r['seconds']:.1f} s; report {args.out / 'report.md'}")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from hebtron.data.cluster import ClusterConfig, cluster_corpus

    config = ClusterConfig(k=args.k, sample=args.sample, seed=args.seed, dims=args.dims, restarts=args.restarts,
                           tail_sigma=args.tail_sigma, label_field=args.label_field, skip_empty=args.skip_empty)
    r = cluster_corpus(args.input, args.out, config, tokenizer=args.tokenizer)
    sizes = ", ".join(f"c{c['cluster']} {c['documents']:,}" for c in r["clusters"])
    print(f"{args.out}: {r['documents']:,} documents in {len(r['clusters'])} clusters ({sizes}) "
          f"in {r['seconds']['total']:.1f} s" + (f"; purity {r['purity']:.3f}" if "purity" in r else ""))
    print(f"  report {args.out / 'report.md'}, {args.out / 'report.png'}")
    return 0
