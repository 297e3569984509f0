"""``HybridConfig``: the Nemotron-H configuration, field for field.

The field names are those of Hugging Face ``NemotronHConfig`` so that a real Nemotron-H /
Nemotron 3 Nano ``config.json`` loads as is and an exported one loads in transformers, vLLM
and lm-eval. Validation raises :class:`hebtron.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hebtron.errors import ConfigError
from hebtron.jsonio import read_json_object

# Layer symbols of ``hybrid_override_pattern`` and the HF ``layers_block_type`` names.
LAYER_SYMBOLS: dict[str, str] = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
HF_BLOCK_TYPES: dict[str, str] = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
# Older checkpoints spell the block types differently.
_LEGACY_BLOCK_TYPES: dict[str, str] = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}

# HF config keys that are aliases of ours (older Nemotron-H checkpoints use the mamba_* spellings).
_ALIASES: dict[str, str] = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "num_local_experts": "n_routed_experts",
}


# Integer fields that may be 0 (token ids, counts of optional parts); every other one is a size > 0.
_MAY_BE_ZERO = frozenset({"pad_token_id", "bos_token_id", "eos_token_id", "n_shared_experts"})
_MAX_INT = 2**31 - 1  # far above any real size or token id; far below what would exhaust memory


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class HybridConfig:
    """Architecture of a hybrid Mamba2 / attention / MLP / MoE decoder (Nemotron-H compatible)."""

    vocab_size: int = 131072
    hidden_size: int = 2688
    hybrid_override_pattern: str = "M*-E"
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    use_bias: bool = False
    # Mamba2 mixer
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    mamba_hidden_act: str = "silu"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int | None = 128
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    # MLP and MoE (squared ReLU everywhere)
    intermediate_size: int = 1856
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    n_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int = 3712
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # hebtron extension: "sigmoid" (Nemotron 3 router with expert bias) or "softmax" top-k.
    router_score_function: str = "sigmoid"
    # tokens
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # HF keys we do not model but carry through an export unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def layer_types(self) -> list[str]:
        """``mamba`` / ``attention`` / ``mlp`` / ``moe`` per layer."""
        return [LAYER_SYMBOLS[s] for s in self.hybrid_override_pattern]

    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Reject configurations that cannot build a model, naming the field."""

        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model config: {fld}: {msg}")

        self._check_types(need)
        pattern = self.hybrid_override_pattern
        need(isinstance(pattern, str) and len(pattern) > 0, "hybrid_override_pattern", "expected a non-empty string")
        for i, sym in enumerate(pattern):
            need(
                sym in LAYER_SYMBOLS,
                "hybrid_override_pattern",
                f"unknown layer symbol {sym!r} at position {i}; expected one of M (Mamba2), * (attention), "
                f"- (MLP), E (MoE)",
            )
        for name in ("vocab_size", "hidden_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "expected a positive integer")
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "expected > 0")
        need(self.mlp_hidden_act == "relu2", "mlp_hidden_act", f"only 'relu2' is supported, got {self.mlp_hidden_act!r}")
        kinds = set(pattern)
        if "M" in kinds:
            need(self.mamba_hidden_act == "silu", "mamba_hidden_act", "only 'silu' is supported")
            for name in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"):
                need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "expected a positive integer")
            need(
                self.mamba_num_heads % self.n_groups == 0,
                "n_groups",
                f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by n_groups ({self.n_groups})",
            )
            need(0 < self.time_step_min <= self.time_step_max, "time_step_min", "expected 0 < time_step_min <= time_step_max")
        if "*" in kinds:
            need(self.num_attention_heads > 0, "num_attention_heads", "expected a positive integer")
            need(
                self.hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}",
            )
            need(self.num_key_value_heads > 0, "num_key_value_heads", "expected a positive integer")
            need(
                self.num_attention_heads % self.num_key_value_heads == 0,
                "num_key_value_heads",
                f"{self.num_key_value_heads} KV heads do not divide num_attention_heads {self.num_attention_heads}",
            )
            need(self.attn_head_dim > 0, "head_dim", "expected a positive integer")
        if "-" in kinds:
            need(self.intermediate_size > 0, "intermediate_size", "expected a positive integer")
        if "E" in kinds:
            e, k = self.n_routed_experts, self.num_experts_per_tok
            need(e > 0, "n_routed_experts", "expected a positive integer")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "expected a positive integer")
            need(0 < k <= e, "num_experts_per_tok", f"top-k {k} must be between 1 and n_routed_experts ({e})")
            need(self.n_group > 0 and e % self.n_group == 0, "n_group", f"must divide n_routed_experts ({e})")
            need(0 < self.topk_group <= self.n_group, "topk_group", f"must be between 1 and n_group ({self.n_group})")
            if self.n_group > 1:
                need(e // self.n_group >= 2, "n_group", "each expert group needs at least 2 experts")
                need(
                    k <= self.topk_group * (e // self.n_group),
                    "num_experts_per_tok",
                    f"top-k {k} exceeds the experts in {self.topk_group} selected groups",
                )
            need(
                self.router_score_function in ("sigmoid", "softmax"),
                "router_score_function",
                f"expected 'sigmoid' or 'softmax', got {self.router_score_function!r}",
            )
            if self.n_shared_experts > 0:
                need(
                    self.moe_shared_expert_intermediate_size > 0,
                    "moe_shared_expert_intermediate_size",
                    "expected a positive integer when n_shared_experts > 0",
                )

    def _check_types(self, need: Any) -> None:
        """Every field has its declared type before any arithmetic on it: ints are ints (a bool
        or 64.0 is not a width), floats are finite numbers, strings strings, bools bools."""
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value, kinds = getattr(self, f.name), str(f.type)
            if value is None and "None" in kinds:
                continue
            if kinds.startswith("int | list[int]") and isinstance(value, list):
                need(all(_is_int(v) and v >= 0 for v in value), f.name, f"expected token ids (integers >= 0), got {_show(value)}")
            elif kinds.startswith("int"):
                lowest = 0 if f.name in _MAY_BE_ZERO else 1
                need(_is_int(value) and value >= lowest, f.name,
                     f"expected an integer >= {lowest} (not a bool or a float), got {_show(value)}")
                need(value <= _MAX_INT, f.name, f"expected at most {_MAX_INT:,}, got {_show(value)}")
            elif kinds.startswith("float"):
                need(isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
                     f.name, f"expected a finite number, got {_show(value)}")
            elif kinds.startswith("bool"):
                need(isinstance(value, bool), f.name, f"expected true or false, got {_show(value)}")
            elif kinds.startswith("str"):
                need(isinstance(value, str), f.name, f"expected a string, got {_show(value)}")

    # ---------------------------------------------------------------- HF interop
    @classmethod
    def known_keys(cls) -> set[str]:
        """Every key :meth:`from_dict` reads as a field: the field names, HF aliases, ``layers_block_type``."""
        return ({f.name for f in dataclasses.fields(cls)} - {"extra"}) | set(_ALIASES) | {"layers_block_type"}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "model config") -> "HybridConfig":
        """Build from a HF ``config.json`` dict or a recipe's inline dict; unknown HF keys go to ``extra``."""
        data = dict(raw)
        for old, new in _ALIASES.items():
            if old in data:
                data.setdefault(new, data.pop(old))
        if "hybrid_override_pattern" not in data and data.get("layers_block_type"):
            data["hybrid_override_pattern"] = _pattern_from_block_types(data["layers_block_type"], source)
        data.pop("layers_block_type", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "extra"}
        extra.update(data.get("extra") or {})
        try:
            return cls(**known, extra=extra)
        except ConfigError as err:
            raise ConfigError(str(err).replace("model config", source, 1)) from None
        except TypeError as err:  # e.g. a list where an int was expected
            raise ConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of our fields (no HF bookkeeping)."""
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``NemotronHForCausalLM`` loads."""
        out: dict[str, Any] = dict(self.extra)
        out.update(self.to_dict())
        if self.router_score_function == "sigmoid":
            out.pop("router_score_function")  # HF only knows the sigmoid router
        out["head_dim"] = self.attn_head_dim
        out["num_hidden_layers"] = self.num_hidden_layers
        out["layers_block_type"] = [HF_BLOCK_TYPES[s] for s in self.hybrid_override_pattern]
        out["model_type"] = "nemotron_h"
        out["architectures"] = ["NemotronHForCausalLM"]
        out.setdefault("torch_dtype", "float32")
        for key in ("auto_map",):  # never point loaders at remote code by default
            out.pop(key, None)
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "HybridConfig":
        path = Path(path)
        raw = read_json_object(path, "model config (config.json)", ConfigError)
        return cls.from_dict(raw, source=str(path))

    def num_parameters(self) -> int:
        """Parameter count (embeddings and head counted once when tied)."""
        h = self.hidden_size
        total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for kind in self.layer_types:
            total += h  # pre-norm
            if kind == "mamba":
                di, nh = self.mamba_intermediate_size, self.mamba_num_heads
                proj = di + self.mamba_conv_dim + nh
                total += h * proj + self.mamba_conv_dim * self.conv_kernel + 3 * nh + di + di * h
                total += self.mamba_conv_dim if self.use_conv_bias else 0
            elif kind == "attention":
                hd = self.attn_head_dim
                total += h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
            elif kind == "mlp":
                total += 2 * h * self.intermediate_size
            else:
                inner = self.moe_latent_size or h
                total += self.n_routed_experts * (h + 2 * inner * self.moe_intermediate_size)
                if self.moe_latent_size:
                    total += 2 * h * inner
                if self.n_shared_experts > 0:
                    total += 2 * h * self.moe_shared_expert_intermediate_size
        return total


def _pattern_from_block_types(types: Any, source: str) -> str:
    if not isinstance(types, list):
        raise ConfigError(f"{source}: layers_block_type: expected a list of layer type names")
    rev = {v: k for k, v in HF_BLOCK_TYPES.items()} | _LEGACY_BLOCK_TYPES
    out = []
    for i, name in enumerate(types):
        if name not in rev:
            raise ConfigError(
                f"{source}: layers_block_type[{i}]: unknown layer type {name!r}; expected one of {sorted(rev)}"
            )
        out.append(rev[name])
    return "".join(out)


def describe(config: HybridConfig) -> str:
    """One line: pattern, width and size, for logs."""
    n = config.num_parameters()
    return f"hybrid {config.hybrid_override_pattern} (hidden {config.hidden_size}, {n / 1e6:.2f}M params)"
