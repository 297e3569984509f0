"""The Megatron-Core backend: tensor, expert, pipeline and context parallelism from a hebtron recipe.

Every module imports megatron.core lazily, so ``import hebtron`` never needs it:

- ``config_map``  HybridConfig + recipe -> TransformerConfig (router, aux losses, parallel sizes,
  distributed optimizer, precision / FP8);
- ``specs``       layer specs: Transformer Engine on GPU, hebtron's seq_idx-aware Mamba mixer and
  packed attention on CPU; ``model`` builds MambaModel / HybridModel for the installed version;
- ``batches``     hebtron micro-batches -> Megatron inputs (THD packing with cu_seqlens);
- ``convert``     HF NemotronH <-> Megatron weights (bit-exact), fill / gather any parallel layout;
  ``checkpoint_io`` whole-checkpoint conversion on disk (``hebtron convert``);
- ``runtime``     process groups and parallel-size checks; ``step`` the engine (DDP, optimizer,
  forward-backward, distributed checkpoints); ``checkpoint`` training checkpoints in hebtron's layout;
- ``trainer``     ``backend: megatron`` through hebtron's loop; ``routers`` the router monitor on
  Megatron's routers;
- ``compat``      the CPU compatibility layer (preflight, tests, CPU runs only);
- ``preflight`` / ``preflight_worker``  ``hebtron preflight RECIPE``.
"""
