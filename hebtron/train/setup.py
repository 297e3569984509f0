"""Turn a recipe's model, tokenizer and data sections into objects the loop runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hebtron.data.cpt import CPTBatches, Phase, Source, ValidationBatches
from hebtron.errors import UserError
from hebtron.model import HybridConfig, HybridModel
from hebtron.model.hf import load_hf
from hebtron.recipe import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hebtron.data.sft import SFTBatches, SFTValidationBatches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> HybridConfig:
    """The architecture: ``model.hf_path``'s config.json, or ``model.init`` completed from the
    tokenizer (vocabulary size and special token ids)."""
    if recipe.model.hf_path is not None:
        return HybridConfig.from_json_file(Path(recipe.model.hf_path) / "config.json")
    raw = dict(recipe.model.init or {})
    raw.setdefault("vocab_size", len(tokenizer))
    raw.setdefault("pad_token_id", tokenizer.pad_token_id)
    raw.setdefault("bos_token_id", tokenizer.bos_token_id)
    raw.setdefault("eos_token_id", tokenizer.eos_token_id)
    return HybridConfig.from_dict(raw, source="recipe: model.init")


def master_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype of the weights the optimizer updates (and of its state)."""
    return torch.bfloat16 if recipe.train.master_weights == "bf16" else torch.float32


def build_model(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> HybridModel:
    """From a HF checkpoint (``model.hf_path``) or from scratch (``model.init``), seeded, in the
    master-weight dtype (``train.master_weights``): ``model.dtype`` is how the weights are read,
    never by itself the dtype AdamW updates."""
    section = recipe.model
    torch.manual_seed(recipe.train.seed)
    if section.hf_path is not None:
        model = load_hf(section.hf_path, dtype=DTYPES[section.dtype or "float32"])
    else:
        model = HybridModel(model_config(recipe, tokenizer))
        if section.dtype:
            model.to(DTYPES[section.dtype])
    model.to(master_dtype(recipe))
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"recipe: model: vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens ({recipe.tokenizer.path})"
        )
    return model


def _indexed_prefix(source, what: str) -> str:
    if source.format != "indexed":
        raise UserError(
            f"recipe: {what} {source.name!r}: {source.path} is a {source.format} file; CPT reads indexed "
            f"datasets: run `hebtron data prepare --input {source.path} --out PREFIX` and point path at PREFIX"
        )
    return str(source.path)


def build_train_data(recipe: Recipe) -> CPTBatches | SFTBatches:
    if recipe.sft is not None:  # packed chat data
        from hebtron.data.sft import build_sft_train_data

        return build_sft_train_data(recipe)
    data = recipe.data
    sources = [Source(_indexed_prefix(s, "data.sources"), s.weight, s.name) for s in data.sources]
    phases = [Phase(p.name, p.tokens, data.phase_weights(p)) for p in data.phases]
    if phases:  # after the last budget the run continues with the last mixture
        phases[-1] = Phase(phases[-1].name, None, phases[-1].weights)
    return CPTBatches(sources, data.seq_len, seed=recipe.train.seed, phases=phases or None,
                      shuffle_windows=data.shuffle_windows)


def build_valid_data(recipe: Recipe) -> dict[str, ValidationBatches] | dict[str, SFTValidationBatches]:
    if recipe.sft is not None:
        from hebtron.data.sft import build_sft_valid_data

        return build_sft_valid_data(recipe)
    data = recipe.data
    return {
        s.name: ValidationBatches(
            _indexed_prefix(s, "data.valid"), data.seq_len, recipe.train.micro_batch, recipe.train.eval_batches
        )
        for s in data.valid
    }
