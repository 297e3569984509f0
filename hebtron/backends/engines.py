"""Pick the engine a recipe asks for and put the one :class:`Trainer` around it.

``backend: native`` is hebtron's own model (plain PyTorch, FSDP2 under torchrun);
``backend: megatron`` is Megatron-Core, imported only when asked for (it is heavy and patches
itself for CPU runs).
"""

from __future__ import annotations

from typing import Any

from hebtron.backends.hf_dirs import hf_directory
from hebtron.checkpoints import is_megatron_checkpoint, locate_checkpoint
from hebtron.data.tokenizer import load_hf_tokenizer
from hebtron.recipe import Recipe
from hebtron.train.engine import TrainEngine
from hebtron.train.loop import Trainer


def make_engine(recipe: Recipe, tokenizer: Any) -> TrainEngine:
    """The recipe's engine, model built (and ``model.hf_path`` read on native)."""
    if recipe.backend == "megatron":
        from hebtron.backends.megatron.train_engine import MegatronTrainEngine

        return MegatronTrainEngine(recipe, tokenizer)
    from hebtron.backends.native_engine import NativeEngine

    return NativeEngine(recipe, tokenizer)


def with_hf_weights(recipe: Recipe) -> Recipe:
    """``recipe`` with ``model.hf_path`` naming HF weights: a Megatron ``step_N`` (a checkpoints
    directory was already resolved to its latest by the recipe schema) becomes its cached HF
    conversion, so both engines start from it (SFT from a Megatron CPT run). The tokenizer path
    stays: a checkpoint directory names the tokenizer its run recorded."""
    found = locate_checkpoint(recipe.model.hf_path) if recipe.model.hf_path is not None else None
    if found is None or not is_megatron_checkpoint(found):
        return recipe  # a HF directory or a native step_N: read as it is
    hf_dir = hf_directory(found)
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"hf_path": hf_dir})})


def make_trainer(recipe: Recipe, resume: str | None = None) -> Trainer:
    """The run of ``recipe`` on its backend, resumed from ``resume`` (auto, none or a checkpoint)."""
    recipe = with_hf_weights(recipe)
    tokenizer = load_hf_tokenizer(recipe.tokenizer.path)
    return Trainer(recipe, make_engine(recipe, tokenizer), tokenizer, resume)
