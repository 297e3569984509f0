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
from hebtron.jsonio import read_json_object

EOS_TOKEN = "</s>"


def megatron_indexed():
    """Import megatron.core's indexed dataset module without its CPU-only warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


_INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py)
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


class IndexedTokens:
    """A read-only, memory-mapped Megatron indexed dataset (``PREFIX.idx`` + ``PREFIX.bin``).

    The data loaders read the files themselves rather than through megatron.core's
    ``IndexedDataset``: importing that module imports all of megatron-core (3 to 4 s per process on
    CPU), which every native training process, rank and test would pay for four numpy arrays.
    Files are still written by Megatron's builder (:func:`prepare`), and the megatron backend's
    own readers see the same bytes; tests/test_data_prepare.py checks both readers agree."""

    def __init__(self, prefix: str | Path) -> None:
        prefix = str(prefix)
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        if not (idx.is_file() and bin_.is_file()):
            raise UserError(f"{prefix}: no indexed dataset ({prefix}.bin and {prefix}.idx expected)")
        index = np.memmap(idx, dtype=np.uint8, mode="r") if idx.stat().st_size else np.zeros(0, np.uint8)
        head = bytes(index[:34])
        if len(head) < 34 or head[:9] != _INDEX_HEADER:
            raise UserError(f"{idx}: not a Megatron indexed dataset index (bad header)")
        version, = np.frombuffer(head, "<u8", 1, 9)
        code = head[17]
        if version != 1 or code not in _DTYPES:
            raise UserError(f"{idx}: unsupported index (version {version}, dtype code {code}; expected version 1)")
        n_seq, n_doc = (int(v) for v in np.frombuffer(head, "<u8", 2, 18))
        need = 34 + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if index.size < need:
            raise UserError(f"{idx}: truncated ({index.size} bytes, the header promises {need})")
        self.dtype = np.dtype(_DTYPES[code])
        self.sequence_lengths = np.frombuffer(index, "<i4", n_seq, 34)
        self.sequence_pointers = np.frombuffer(index, "<i8", n_seq, 34 + 4 * n_seq)
        self.document_indices = np.frombuffer(index, "<i8", n_doc, 34 + 12 * n_seq)
        size = bin_.stat().st_size
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if size < end:
            raise UserError(f"{bin_}: truncated ({size} bytes, the index points to {end})")
        self._tokens = np.memmap(bin_, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (a view of the mapped file)."""
        count = int(self.sequence_lengths[idx]) - offset if length is None else length
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._tokens, self.dtype, count, start)


def open_indexed(prefix: str | Path) -> IndexedTokens:
    """The indexed dataset at ``prefix`` (mmap), with a one-line error if absent or damaged."""
    return IndexedTokens(prefix)


def read_meta(prefix: str | Path) -> dict[str, Any]:
    """The ``PREFIX.meta.json`` sidecar (empty dict when the dataset came from elsewhere)."""
    path = Path(f"{prefix}.meta.json")
    if not path.exists():
        return {}
    return read_json_object(path, "dataset metadata sidecar (PREFIX.meta.json)")


def read_langs(prefix: str | Path, n_docs: int) -> np.ndarray:
    """Per-document language ids; all -1 (unknown) when the sidecar is missing."""
    path = Path(f"{prefix}.lang.npy")
    if not path.exists():
        return np.full(n_docs, -1, dtype=np.int16)
    try:
        langs = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # damaged, or an object array (a pickle): never loaded
        raise UserError(f"{path}: not a language-id array (.npy of int16 written by hebtron data prepare: "
                        f"{' '.join(str(err).split())[:200]})") from None
    if not isinstance(langs, np.ndarray) or langs.dtype.kind not in "iu":
        raise UserError(f"{path}: expected an integer array of language ids, got {getattr(langs, 'dtype', type(langs))}")
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
    blocker = next((p for p in (out_prefix.parent, *out_prefix.parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--out {out_prefix}: {blocker} is a file, not a directory; expected an output prefix "
                        "in a directory (PREFIX.bin, PREFIX.idx)")
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
