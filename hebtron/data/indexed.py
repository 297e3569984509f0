"""Tokenize documents into Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``).

The files are written by Megatron-Core's own ``IndexedDatasetBuilder`` so either backend
(native or megatron) reads the same data. Two sidecars travel with them:
``PREFIX.lang.npy`` (int16, one language id per document, see :mod:`hebtron.lang`)
so batches carry per-token language ids, and ``PREFIX.meta.json`` (tokenizer, ``</s>`` id,
pad id, counts). Every document ends with ``</s>``: Nemotron's CPT convention, and the
embedding of the checkpoint's own ``eos`` (``<|im_end|>``) is untrained, so the token is
looked up by name rather than taken from ``tokenizer.eos_token``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from hebtron.data.documents import ReadStats, iter_documents
from hebtron.lang import LANG_IDS, lang_name
from hebtron.errors import UserError

EOS_TOKEN = "</s>"


def megatron_indexed():
    """Import megatron.core's indexed dataset module without its CPU-only warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def open_indexed(prefix: str | Path) -> Any:
    """Megatron's ``IndexedDataset`` for ``prefix`` (mmap), with a clear error if absent."""
    mod = megatron_indexed()
    if not mod.IndexedDataset.exists(str(prefix)):
        raise UserError(f"{prefix}: no indexed dataset ({prefix}.bin and {prefix}.idx expected)")
    return mod.IndexedDataset(str(prefix))


def read_meta(prefix: str | Path) -> dict[str, Any]:
    """The ``PREFIX.meta.json`` sidecar (empty dict when the dataset came from elsewhere)."""
    path = Path(f"{prefix}.meta.json")
    return json.loads(path.read_text()) if path.exists() else {}


def read_langs(prefix: str | Path, n_docs: int) -> np.ndarray:
    """Per-document language ids; all -1 (unknown) when the sidecar is missing."""
    path = Path(f"{prefix}.lang.npy")
    if not path.exists():
        return np.full(n_docs, -1, dtype=np.int16)
    langs = np.load(path, allow_pickle=False)
    if langs.shape != (n_docs,):
        raise UserError(f"{path}: holds {langs.shape[0]} language ids for {n_docs} documents")
    return langs


def _tokenize_batch(batch: dict[str, list], spec: str) -> dict[str, list]:
    from hebtron.data.tokenizer import load_tokenizer

    return {"input_ids": load_tokenizer(spec).encode_batch(batch["text"])}


def prepare(
    inputs: Sequence[str | Path],
    tokenizer: str,
    out_prefix: str | Path,
    workers: int = 1,
    append_eos: bool = True,
    skip_empty: bool = False,
    default_lang: str | None = None,
    eos_token: str = EOS_TOKEN,
) -> dict[str, Any]:
    """Validate, tokenize (``datasets.map(num_proc=workers)``) and write one indexed dataset.

    Inputs are concatenated in the order given. Returns the metadata also written to
    ``PREFIX.meta.json``. Nothing appears at ``out_prefix`` unless the whole run succeeds.
    """
    import pyarrow as pa

    from hebtron.data.tokenizer import check_tokenizer_spec, load_tokenizer

    check_tokenizer_spec(tokenizer)  # cheap; the full load waits until the data is known good
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    stats = ReadStats()

    with tempfile.TemporaryDirectory(dir=out_prefix.parent, prefix=f".{out_prefix.name}.") as tmpdir:
        tmp = Path(tmpdir)
        # 1. validate every record and stream it into an Arrow file (constant memory).
        schema = pa.schema([("text", pa.string()), ("lang", pa.int16())])
        raw_path = tmp / "raw.arrow"
        with pa.OSFile(str(raw_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            texts: list[str] = []
            langs: list[int] = []

            def flush() -> None:
                if texts:
                    writer.write_batch(pa.record_batch([texts, langs], schema=schema))
                    texts.clear()
                    langs.clear()

            for path in inputs:
                for text, lid in iter_documents(path, stats, skip_empty, default_lang):
                    texts.append(text)
                    langs.append(lid)
                    if len(texts) >= 4096:
                        flush()
            flush()
        if stats.documents == 0:
            raise UserError(f"no documents in {', '.join(map(str, inputs))}")

        # 2. tokenize in parallel; map keeps document order.
        import datasets

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        datasets.disable_progress_bars()
        tok = load_tokenizer(tokenizer)
        eos_id = tok.token_id(eos_token)
        if append_eos and eos_id is None:
            raise UserError(f"tokenizer {tokenizer}: has no {eos_token!r} token to end documents with")
        indexed = megatron_indexed()
        dtype = indexed.DType.optimal_dtype(tok.vocab_size)
        raw = datasets.Dataset.from_file(str(raw_path))
        tokenized = raw.map(
            _tokenize_batch, batched=True, batch_size=256, fn_kwargs={"spec": str(tokenizer)},
            num_proc=workers if workers > 1 else None, remove_columns=["text"],
            cache_file_name=str(tmp / "tokens.arrow"), new_fingerprint=f"hebtron-{os.getpid()}",
            features=datasets.Features({"lang": datasets.Value("int16"),
                                        "input_ids": datasets.Sequence(datasets.Value("int32"))}),
        )

        # 3. write .bin/.idx with Megatron's builder, the language sidecar and the metadata.
        bin_tmp, idx_tmp = tmp / "data.bin", tmp / "data.idx"
        builder = indexed.IndexedDatasetBuilder(str(bin_tmp), dtype=dtype)
        lang_out = np.empty(len(tokenized), dtype=np.int16)
        n_tokens, row = 0, 0
        tail = np.array([eos_id], dtype=np.int64) if append_eos else np.zeros(0, dtype=np.int64)
        for batch in tokenized.data.table.to_batches():
            ids = batch.column("input_ids")
            offsets = ids.offsets.to_numpy()
            values = ids.values.to_numpy()
            for i, lid in enumerate(batch.column("lang").to_numpy()):
                doc = np.concatenate([values[offsets[i] : offsets[i + 1]], tail])
                if doc.size == 0:
                    raise UserError(f"document {row + 1} tokenizes to nothing and --no-append-eos was given")
                builder.add_document(doc, [doc.size])
                lang_out[row] = lid
                n_tokens += doc.size
                row += 1
        builder.finalize(str(idx_tmp))
        del raw, tokenized

        counts: dict[str, int] = {}
        for lid, n in zip(*np.unique(lang_out, return_counts=True), strict=True):
            counts[lang_name(int(lid))] = int(n)
        meta = {
            **asdict(stats),
            "format": "megatron-indexed (megatron.core IndexedDatasetBuilder)",
            "tokenizer": str(tokenizer),
            "tokenizer_name": tok.name,
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "eos_token": eos_token,
            "eos_id": eos_id,
            "pad_id": tok.token_id("<pad>"),
            "append_eos": append_eos,
            "documents": row,
            "tokens": n_tokens,
            "docs_per_lang": counts,
            "lang_ids": LANG_IDS,
            "inputs": [str(p) for p in inputs],
        }
        np.save(tmp / "lang.npy", lang_out, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n")
        for src, suffix in ((bin_tmp, ".bin"), (idx_tmp, ".idx"), (tmp / "lang.npy", ".lang.npy"),
                            (tmp / "meta.json", ".meta.json")):
            shutil.move(str(src), f"{out_prefix}{suffix}")
    return meta
