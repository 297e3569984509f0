"""Peak memory and time of `hebtron data dedup` on synthetic Hebrew corpora of growing size.

The corpus (tests/corpus_fixtures.py, 20% planted duplicates) is written in chunks of 20k
documents (~28 MB each) so this script itself stays small; each size is then deduplicated by a
`hebtron data dedup` process, whose peak RSS is read from getrusage of the children.

    .venv/bin/python bench/dedup_memory.py              # 50 MB and 200 MB, ~3 minutes on 2 cores
Prints a table and writes bench/results/dedup_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.corpus_fixtures import synthetic_corpus  # noqa: E402


def write_corpus(path: Path, megabytes: float) -> dict[str, int]:
    """Chunks of 20k documents (own seed each) until the file holds ``megabytes`` MB."""
    docs = planted = 0
    with open(path, "w", encoding="utf-8") as f:
        seed = 0
        while f.tell() < megabytes * 1e6:
            records, plants = synthetic_corpus(20_000, seed=seed)
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            docs += len(records)
            planted += len(plants)
            seed += 1
    return {"documents": docs, "planted": planted, "bytes": path.stat().st_size}


def run_dedup(path: Path, out: Path) -> dict[str, float]:
    """One `hebtron data dedup` process; its wall time and peak RSS (this is its only child)."""
    hebtron = shutil.which("hebtron", path=os.path.dirname(sys.executable)) or "hebtron"
    t0 = time.perf_counter()
    subprocess.run([hebtron, "data", "dedup", "--input", str(path), "--out", str(out)], check=True)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[50, 200], help="corpus sizes in MB")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "dedup_memory.json")
    args = parser.parse_args()
    rows = []
    for mb in sorted(args.sizes):
        with tempfile.TemporaryDirectory(prefix="hebtron-dedup-bench-") as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            info = write_corpus(corpus, mb)
            # a fresh interpreter per size: RUSAGE_CHILDREN's peak is the largest child so far
            code = ("import json,sys; sys.path.insert(0, %r); from bench.dedup_memory import run_dedup; "
                    "from pathlib import Path; print(json.dumps(run_dedup(Path(%r), Path(%r))))"
                    % (str(ROOT), str(corpus), str(Path(tmp) / "out")))
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            report = json.loads((Path(tmp) / "out" / "report.json").read_text())
            rows.append({"target_mb": mb, **info, **measured, "kept": report["kept"],
                         "exact": report["exact_duplicates"], "near": report["near_duplicates"],
                         "accounted": report["accounted"]})
    print(f"{'MB':>6}{'documents':>11}{'planted':>9}{'found':>8}{'kept':>9}{'seconds':>9}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['bytes'] / 1e6:>6.0f}{r['documents']:>11,}{r['planted']:>9,}{r['exact'] + r['near']:>8,}"
              f"{r['kept']:>9,}{r['seconds']:>9.1f}{r['peak_rss_mib']:>14.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
