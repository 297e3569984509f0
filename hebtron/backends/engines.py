"""Pick the engine a recipe asks for and put the one :class:`Trainer` around it.

``backend: native`` is hebtron's own model (plain PyTorch, FSDP2 under torchrun);
``backend: megatron`` is Megatron-Core, imported only when asked for (it is heavy and patches
itself for CPU runs).
"""

from __future__ import annotations

from typing import Any

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


def make_trainer(recipe: Recipe, resume: str | None = None) -> Trainer:
    """The run of ``recipe`` on its backend, resumed from ``resume`` (auto, none or a checkpoint)."""
    tokenizer = load_hf_tokenizer(recipe.tokenizer.path)
    return Trainer(recipe, make_engine(recipe, tokenizer), tokenizer, resume)
