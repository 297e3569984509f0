"""SFT batching side by side: hebtron's best-fit-decreasing packing, padding per batch, and
TRL's best-fit-decreasing packing (``trl.data_utils.pack_dataset(strategy="bfd")``), on the
same encoded conversations.

Two data sets: the demo's English->Hebrew UI translation conversations (real, short;
needs ``runs/demo/data`` from ``make demo`` or ``hebtron data demo``) and a synthetic
long-tailed one (log-normal lengths, as in instruction data with some long answers).
For each layout: rows, padding waste (% of batch tokens that are padding when each batch
is padded to its longest row, and, for packed rows, when every row is padded to seq_len,
the fixed shape hebtron uses), the packer's throughput (examples/s, median of repeated
runs, the layouts interleaved), and, on the
demo data, SFT training throughput on the demo model (real tokens/s: fwd + bwd + AdamW,
steps interleaved across layouts, median). TRL rows carry only ``position_ids``; hebtron's
model rebuilds document boundaries from them, transformers' NemotronH does not.

    OMP_NUM_THREADS=2 .venv/bin/python bench/packing.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hebtron.data.packing import Encoded, collate, pack_stream  # noqa: E402

RESULTS = REPO / "bench" / "results" / "packing.json"


# ------------------------------------------------------------------------------ data
def demo_examples(data_dir: Path, tokenizer_dir: Path, seq_len: int) -> list[Encoded]:
    from hebtron.data.chat import ChatReader, ChatTemplate
    from hebtron.data.tokenizer import load_hf_tokenizer
    from hebtron.demo.sft_data import build_sft_demo

    build_sft_demo(data_dir)
    reader = ChatReader(ChatTemplate(load_hf_tokenizer(tokenizer_dir)), seq_len, overlong="truncate")
    return list(reader.read(data_dir / "sft_train.jsonl"))


def synthetic_examples(n: int, seq_len: int, seed: int = 0) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=5.3, sigma=0.8, size=n), 24, seq_len).astype(int)  # median ~200
    out = []
    for n_tok in lengths:
        mask = np.zeros(n_tok, dtype=bool)
        mask[int(n_tok * rng.uniform(0.2, 0.7)) :] = True
        out.append(Encoded(rng.integers(6, 8000, n_tok).astype(np.int32), mask, 0))
    return out


# --------------------------------------------------------------------------- layouts
def hebtron_rows(examples: list[Encoded], seq_len: int, buffer: int) -> list:
    return list(pack_stream(examples, seq_len, pad_id=3, buffer_size=buffer))


def trl_dataset(examples: list[Encoded]):
    import datasets

    return datasets.Dataset.from_dict({
        "input_ids": [e.input_ids.tolist() for e in examples],
        "assistant_masks": [e.assistant_mask.astype(np.int8).tolist() for e in examples],
    })


def trl_rows(dataset, seq_len: int) -> list[dict]:
    from trl.data_utils import pack_dataset

    packed = pack_dataset(dataset, seq_len, strategy="bfd")
    return packed.to_list()


def batch_waste(lengths: list[int], batch: int, width: int | None = None) -> tuple[int, int]:
    """(real tokens, batch tokens) when consecutive ``batch`` rows are padded to the longest
    (or to ``width``)."""
    real = total = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        real += sum(chunk)
        total += len(chunk) * (width or max(chunk))
    return real, total


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- training
def padded_batch(examples: list[Encoded], pad_id: int = 3) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros(ids.shape, dtype=torch.float32)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.from_numpy(e.input_ids.astype(np.int64))
        tgt = torch.from_numpy(e.assistant_mask[1:])
        labels[r, : n - 1] = torch.where(tgt, ids[r, 1:n], -100)
        mask[r, : n - 1] = tgt.float()
    return {"input_ids": ids, "labels": labels, "loss_mask": mask}


def trl_batch(rows: list[dict], seq_len: int, pad_id: int = 3) -> dict[str, torch.Tensor]:
    """TRL's packed rows as its padding-free collator would give them: position_ids only."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros(ids.shape, dtype=torch.float32)
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[k, :n] = torch.tensor(r["input_ids"])
        pos[k, :n] = torch.cat([torch.arange(s) for s in r["seq_lengths"]])
        pos[k, n:] = torch.arange(width - n)
        am = torch.tensor(r["assistant_masks"], dtype=torch.bool)
        same = pos[k, 1:n] != 0
        tgt = am[1:] & same
        labels[k, : n - 1] = torch.where(tgt, ids[k, 1:n], -100)
        mask[k, : n - 1] = tgt.float()
    return {"input_ids": ids, "labels": labels, "loss_mask": mask, "position_ids": pos}


def train_throughput(layouts: dict[str, list[dict[str, torch.Tensor]]], steps: int, tokenizer_len: int) -> dict:
    import yaml

    from hebtron.model import HybridConfig, HybridModel
    from hebtron.train.loss import token_loss_sum

    init = yaml.safe_load((REPO / "recipes/demo/base.yaml").read_text())["model"]["init"]
    torch.manual_seed(0)
    model = HybridModel(HybridConfig.from_dict({**init, "vocab_size": max(init["vocab_size"], tokenizer_len)}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates: dict[str, list[float]] = {k: [] for k in layouts}
    for step in range(steps + 1):  # step 0 warms up
        for name, batches in layouts.items():
            batch = batches[step % len(batches)]
            real = int((batch["input_ids"] != 3).sum()) if "seq_idx" not in batch else int((batch["lang"] >= 0).sum())
            t0 = time.perf_counter()
            inputs = {k: batch[k] for k in ("input_ids", "position_ids", "seq_idx") if k in batch}
            logits = model(**inputs).logits
            loss = token_loss_sum(logits, batch["labels"], batch["loss_mask"]) / batch["loss_mask"].sum().clamp(min=1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                rates[name].append(real / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    parser.add_argument("--repeats", type=int, default=5, help="packer timings per layout (median)")
    parser.add_argument("--train-steps", type=int, default=6, help="timed training steps per layout (median)")
    parser.add_argument("--batch", type=int, default=8, help="rows (or padded examples) per batch")
    parser.add_argument("--synthetic", type=int, default=20_000, help="synthetic conversations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    data_sets: dict[str, tuple[list[Encoded], int]] = {}
    data_dir, tok_dir = REPO / "runs/demo/data", REPO / "runs/demo/tokenizer"
    if (data_dir / "ui_pairs.jsonl").is_file() and (tok_dir / "tokenizer.json").is_file():
        data_sets["demo UI translation"] = (demo_examples(data_dir, tok_dir, 256), 256)
    else:
        print("runs/demo/data missing: run `make demo` for the real data set; synthetic only")
    data_sets["synthetic log-normal"] = (synthetic_examples(args.synthetic, 2048), 2048)

    results: dict = {"threads": args.threads, "batch": args.batch, "trl": trl_version, "data": {}}
    for data_name, (examples, seq_len) in data_sets.items():
        lengths = [len(e.input_ids) for e in examples]
        layouts: dict[str, dict] = {}
        runners = {
            "hebtron BFD (buffer 20k)": lambda: hebtron_rows(examples, seq_len, 20_000),
            "hebtron BFD (buffer 1k)": lambda: hebtron_rows(examples, seq_len, 1_000),
        }
        if trl_version:
            dataset = trl_dataset(examples)
            runners["TRL BFD (pack_dataset)"] = lambda: trl_rows(dataset, seq_len)
        times: dict[str, list[float]] = {k: [] for k in runners}
        outputs: dict[str, list] = {}
        for _ in range(args.repeats):  # interleaved
            for name, fn in runners.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - t0)
        for name, rows in outputs.items():
            row_lens = [r.used for r in rows] if name.startswith("hebtron") else [len(r["input_ids"]) for r in rows]
            real, total = batch_waste(row_lens, args.batch)  # each batch padded to its longest row
            layouts[name] = {"rows": len(rows), "real_tokens": real, "batch_tokens": total,
                             "fixed_waste_pct": 100 * (1 - real / (len(rows) * seq_len)),
                             "examples_per_s": len(examples) / statistics.median(times[name])}
        real, total = batch_waste(lengths, args.batch)
        layouts["padded per batch"] = {"rows": len(examples), "real_tokens": real, "batch_tokens": total,
                                       "fixed_waste_pct": None, "examples_per_s": None}
        for v in layouts.values():
            v["padding_waste_pct"] = 100 * (1 - v["real_tokens"] / v["batch_tokens"])
        if data_name.startswith("demo"):
            b = args.batch
            heb = outputs["hebtron BFD (buffer 20k)"]
            train_layouts = {
                "hebtron BFD (buffer 20k)": [collate(heb[i : i + b]) for i in range(0, len(heb) - b + 1, b)],
                "padded per batch": [padded_batch(examples[i : i + b]) for i in range(0, len(examples) - b + 1, b)],
            }
            if trl_version:
                rows = outputs["TRL BFD (pack_dataset)"]
                train_layouts["TRL BFD (pack_dataset)"] = [trl_batch(rows[i : i + b], seq_len)
                                                          for i in range(0, len(rows) - b + 1, b)]
            rates = train_throughput(train_layouts, args.train_steps, 8192)
            for name, rate in rates.items():
                layouts[name]["train_tokens_per_s"] = rate
        results["data"][data_name] = {"examples": len(examples), "seq_len": seq_len,
                                      "mean_length": float(np.mean(lengths)), "layouts": layouts}

    for data_name, d in results["data"].items():
        print(f"\n{data_name}: {d['examples']:,} conversations, mean {d['mean_length']:.0f} tokens, "
              f"rows of {d['seq_len']} (batches of {args.batch}; OMP_NUM_THREADS={args.threads})")
        base = d["layouts"]["hebtron BFD (buffer 20k)"]
        print(f"{'layout':26} {'rows':>7} {'pad waste':>10} {'at seq_len':>10} {'packer ex/s':>12} {'vs hebtron':>10} "
              f"{'SFT real tok/s':>15} {'vs hebtron':>10}")
        for name, v in d["layouts"].items():
            eps = f"{v['examples_per_s']:,.0f}" if v["examples_per_s"] else "-"
            eps_ratio = f"{v['examples_per_s'] / base['examples_per_s']:.2f}x" if v["examples_per_s"] else "-"
            tps = v.get("train_tokens_per_s")
            tps_s = f"{tps:,.0f}" if tps else "-"
            tps_ratio = f"{tps / base['train_tokens_per_s']:.2f}x" if tps and base.get("train_tokens_per_s") else "-"
            fixed = f"{v['fixed_waste_pct']:.2f}%" if v["fixed_waste_pct"] is not None else "-"
            print(f"{name:26} {v['rows']:>7,} {v['padding_waste_pct']:>9.2f}% {fixed:>10} {eps:>12} {eps_ratio:>10} "
                  f"{tps_s:>15} {tps_ratio:>10}")
    if not trl_version:
        print("\nTRL not installed (pip install trl): its column is missing")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
