"""Build Megatron-Core's hybrid language model for a HybridConfig, whatever the installed version.

megatron-core 0.16 has ``megatron.core.models.mamba.mamba_model.MambaModel(mamba_stack_spec=...,
hybrid_override_pattern=...)``; 0.17 keeps that class and renames the pattern argument to
``hybrid_layer_pattern``; 0.18 and 0.19 have ``megatron.core.models.hybrid.hybrid_model.HybridModel(
hybrid_stack_spec=..., hybrid_layer_pattern=...)``, with ``MambaModel`` a deprecated wrapper
(checked against the core_v0.16.1 to core_v0.19.0 tags and the 0.19.2 wheel). The class is found
by import and the argument names are read from its signature, not guessed from version numbers.
"""

from __future__ import annotations

import inspect
from typing import Any

from hebtron.backends.megatron.specs import stack_spec
from hebtron.model.config import HybridConfig


def model_class() -> tuple[type, str, str]:
    """(class, spec argument, pattern argument) of the installed megatron-core's hybrid model."""
    try:
        from megatron.core.models.hybrid.hybrid_model import HybridModel as cls

        spec_arg = "hybrid_stack_spec"
    except ImportError:
        from megatron.core.models.mamba.mamba_model import MambaModel as cls

        spec_arg = "mamba_stack_spec"
    params = inspect.signature(cls.__init__).parameters
    pattern_arg = "hybrid_layer_pattern" if "hybrid_layer_pattern" in params else "hybrid_override_pattern"
    return cls, spec_arg, pattern_arg


def build_model(
    cfg: HybridConfig,
    transformer_config: Any,
    pre_process: bool = True,
    post_process: bool = True,
    use_te: bool = False,
    pg_collection: Any = None,
):
    """One pipeline stage of the hybrid model (the whole model at pp=1); ``use_te`` is
    :func:`.specs.choose_layer_spec`'s decision."""
    cls, spec_arg, pattern_arg = model_class()
    kwargs: dict[str, Any] = {
        "config": transformer_config,
        spec_arg: stack_spec(cfg, transformer_config.num_moe_experts, use_te),
        "vocab_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_position_embeddings,
        pattern_arg: cfg.hybrid_override_pattern,
        "pre_process": pre_process,
        "post_process": post_process,
        "share_embeddings_and_output_weights": cfg.tie_word_embeddings,
        "position_embedding_type": "none",
        "parallel_output": True,
    }
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    return cls(**kwargs)
