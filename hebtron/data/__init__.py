"""Data: corpora, tokenizers, tokenized datasets and batches.

- ``tokenizer``: byte-level BPE training, loading (local dirs, ``tekken``, Hugging Face tokenizers of
  checkpoints), compression report;
- ``documents`` / ``indexed``: validated JSONL/Parquet/HF input -> Megatron ``.bin/.idx`` + ``.lang.npy``;
- ``cpt``: blended, phased, resumable CPT windows and fixed validation batches.

Submodules are imported on use, so ``import hebtron.data`` stays cheap.
"""
