"""``hebtron arena``: answers of several checkpoints to the same prompts, voted on side by side.

``generate`` writes each model's answers into the arena's SQLite database
(:mod:`hebtron.eval.arena_store`), ``serve`` shows a prompt and two anonymized answers and records
votes, ``results`` fits Bradley-Terry ratings (:mod:`hebtron.eval.arena_ratings`), and the gate
reads the same votes (:mod:`hebtron.eval.arena_gate`). This package sits above eval: it loads
models the way ``hebtron eval run`` does.
"""
