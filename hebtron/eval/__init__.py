"""Benchmarks decide which checkpoint is kept: lm-eval suites, the gate, the run table.

``lm`` registers hebtron's decoder with lm-eval as the model ``hebtron``; ``runner`` runs a
suite (``eval/suites/*.yaml``) on a checkpoint and writes lm-eval's results JSON; ``gate``
accepts or rejects a candidate against a baseline under a policy, failing closed; ``table``
tabulates a run's verdicts; ``commands`` is ``hebtron eval run|gate|table``. The offline Hebrew
mini suite is built by :mod:`hebtron.demo.minisuite`.
"""
