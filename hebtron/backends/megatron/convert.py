"""Weights between Hugging Face NemotronH (hebtron's native names) and Megatron-Core.

The Megatron side is the *canonical* form: the keys of Megatron's distributed checkpoints
(``decoder.layers.N.mixer.in_proj.weight.z``, ``...mlp.experts.experts.linear_fc1.weight`` with
the experts stacked, ...) with whole, unsharded tensors. That form is independent of tp/ep/pp:

- :func:`hf_to_megatron` / :func:`megatron_to_hf` rename, split and interleave (pure tensor
  ops, bit-exact both ways);
- :func:`load_into_model` fills any parallel layout from it, shard by shard, using the model's
  own sharded state dict (so TP splits of in_proj / conv1d / QKV follow Megatron's rules);
- :func:`gather_from_model` rebuilds it from the shards of all ranks;
- :func:`save_canonical` writes it as a Megatron distributed checkpoint, which Megatron loads at
  any tp/ep/pp; :func:`top_to_hf` / :func:`layer_to_hf` convert it back a layer at a time
  (:mod:`.hf_export` streams a whole checkpoint to HF with them).

Layout facts: HF ``in_proj`` rows are [z | x B C | dt] (Megatron: z, x, B, C, dt); conv1d
channels [x | B | C]; Megatron's fused QKV interleaves per KV group [q heads of g | k_g | v_g];
routed experts are stacked along a leading expert axis in both hebtron and Megatron.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from hebtron.errors import CheckpointError
from hebtron.model.config import HybridConfig

_NORM_TARGET = {
    "mamba": "mixer.in_proj.layer_norm_weight",
    "attention": "self_attention.linear_qkv.layer_norm_weight",
    "mlp": "mlp.linear_fc1.layer_norm_weight",
    "moe": "pre_mlp_layernorm.weight",
}
_MAMBA_SAME = ("dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")
_MOE_SAME = {
    "gate.weight": "router.weight",
    "shared_experts.up_proj.weight": "shared_experts.linear_fc1.weight",
    "shared_experts.down_proj.weight": "shared_experts.linear_fc2.weight",
    "fc1_latent_proj.weight": "fc1_latent_proj.weight",
    "fc2_latent_proj.weight": "fc2_latent_proj.weight",
    "experts.up_proj": "experts.experts.linear_fc1.weight",
    "experts.down_proj": "experts.experts.linear_fc2.weight",
}


def _mamba_sizes(cfg: HybridConfig) -> tuple[list[int], list[str], list[int], list[str]]:
    inner, gn = cfg.mamba_intermediate_size, cfg.n_groups * cfg.ssm_state_size
    return [inner, inner, gn, gn, cfg.mamba_num_heads], ["z", "x", "B", "C", "dt"], [inner, gn, gn], ["x", "B", "C"]


def _qkv_interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: HybridConfig) -> torch.Tensor:
    groups, hd = cfg.num_key_value_heads, cfg.attn_head_dim
    per = cfg.num_attention_heads // groups
    h = q.shape[-1]
    stacked = torch.cat([q.view(groups, per * hd, h), k.view(groups, hd, h), v.view(groups, hd, h)], dim=1)
    return stacked.reshape(-1, h)


def _qkv_split(qkv: torch.Tensor, cfg: HybridConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd = cfg.num_key_value_heads, cfg.attn_head_dim
    per = cfg.num_attention_heads // groups
    h = qkv.shape[-1]
    grouped = qkv.view(groups, (per + 2) * hd, h)
    q, k, v = grouped.split([per * hd, hd, hd], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def hf_to_megatron(state: Mapping[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    """hebtron/HF native state (stacked experts) -> canonical Megatron tensors.

    Every input tensor must be used: a tensor Megatron has no place for (e.g. projection biases)
    is an error, not a silent drop."""
    used: set[str] = set()

    class _Reader(dict):
        def __getitem__(self, key: str) -> torch.Tensor:
            used.add(key)
            return super().__getitem__(key)

    out = _hf_to_megatron(_Reader(state), cfg)
    left = sorted(set(state) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if left:
        raise CheckpointError(f"tensor {left[0]!r} has no Megatron counterpart (bias-free Nemotron-H layers only)")
    return out


def _hf_to_megatron(state: Mapping[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    out = _top_to_megatron(state, cfg)
    for i in range(cfg.num_hidden_layers):
        out.update(_layer_to_megatron(i, state, cfg))
    return out


def _top_to_megatron(state: Mapping[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    out = {
        "embedding.word_embeddings.weight": state["backbone.embeddings.weight"],
        "decoder.final_norm.weight": state["backbone.norm_f.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    return out


def _layer_to_megatron(i: int, state: Mapping[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    kind = cfg.layer_types[i]
    in_sizes, in_names, conv_sizes, conv_names = _mamba_sizes(cfg)
    src, dst = f"backbone.layers.{i}.", f"decoder.layers.{i}."
    out = {dst + _NORM_TARGET[kind]: state[src + "norm.weight"]}
    if kind == "mamba":
        for part, name in zip(state[src + "mixer.in_proj.weight"].split(in_sizes, dim=0), in_names):
            out[f"{dst}mixer.in_proj.weight.{name}"] = part
        for fld in ("weight", "bias"):
            key = f"{src}mixer.conv1d.{fld}"
            if key in state:
                for part, name in zip(state[key].split(conv_sizes, dim=0), conv_names):
                    out[f"{dst}mixer.conv1d.{fld}.{name}"] = part
        for fld in _MAMBA_SAME:
            out[f"{dst}mixer.{fld}"] = state[f"{src}mixer.{fld}"]
    elif kind == "attention":
        q, k, v = (state[f"{src}mixer.{p}_proj.weight"] for p in "qkv")
        out[dst + "self_attention.linear_qkv.weight"] = _qkv_interleave(q, k, v, cfg)
        out[dst + "self_attention.linear_proj.weight"] = state[src + "mixer.o_proj.weight"]
    elif kind == "mlp":
        out[dst + "mlp.linear_fc1.weight"] = state[src + "mixer.up_proj.weight"]
        out[dst + "mlp.linear_fc2.weight"] = state[src + "mixer.down_proj.weight"]
    else:
        for native, mega in _MOE_SAME.items():
            if src + "mixer." + native in state:
                out[dst + "mlp." + mega] = state[src + "mixer." + native]
        bias = state[src + "mixer.gate.e_score_correction_bias"]
        if cfg.router_score_function == "sigmoid":
            out[dst + "mlp.router.expert_bias"] = bias
        elif bool(bias.ne(0).any()):
            raise CheckpointError(
                f"layer {i}: a softmax router with a non-zero e_score_correction_bias has no Megatron equivalent"
            )
    return out


def lazy_canonical(state: Mapping[str, torch.Tensor], cfg: HybridConfig) -> Callable[[str], torch.Tensor]:
    """key -> canonical tensor, converting one layer at a time from a lazily read HF state, so each
    rank of a large model reads only what its shards need (with one layer in memory)."""
    cache: dict[str, Any] = {"layer": None, "tensors": {}}
    top: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        parts = key.split(".")
        if parts[:2] == ["decoder", "layers"]:
            layer = int(parts[2])
            if cache["layer"] != layer:
                cache["layer"], cache["tensors"] = layer, _layer_to_megatron(layer, state, cfg)
            return cache["tensors"][key]
        if not top:
            top.update(_top_to_megatron(state, cfg))
        return top[key]

    return get


def megatron_to_hf(canon: Mapping[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    """Canonical Megatron tensors -> hebtron/HF native state (stacked experts)."""
    out = top_to_hf(canon, cfg)
    for i in range(cfg.num_hidden_layers):
        out.update(layer_to_hf(i, canon, cfg))
    return out


TOP_KEYS = ("embedding.word_embeddings.weight", "decoder.final_norm.weight", "output_layer.weight")


def top_to_hf(canon: Mapping[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    """Embedding, final norm and head (the tensors outside ``decoder.layers``)."""
    return {
        "backbone.embeddings.weight": canon["embedding.word_embeddings.weight"],
        "backbone.norm_f.weight": canon["decoder.final_norm.weight"],
        "lm_head.weight": canon["embedding.word_embeddings.weight" if cfg.tie_word_embeddings else "output_layer.weight"],
    }


def layer_to_hf(i: int, canon: Mapping[str, torch.Tensor], cfg: HybridConfig) -> dict[str, torch.Tensor]:
    """Layer ``i``'s canonical tensors (``decoder.layers.i.*``) -> its native ones: the unit a
    streaming conversion holds in memory."""
    _, in_names, _, conv_names = _mamba_sizes(cfg)
    kind = cfg.layer_types[i]
    src, dst = f"decoder.layers.{i}.", f"backbone.layers.{i}."
    out = {dst + "norm.weight": canon[src + _NORM_TARGET[kind]]}
    if kind == "mamba":
        out[dst + "mixer.in_proj.weight"] = torch.cat([canon[f"{src}mixer.in_proj.weight.{n}"] for n in in_names])
        for fld in ("weight", "bias"):
            if f"{src}mixer.conv1d.{fld}.x" in canon:
                out[f"{dst}mixer.conv1d.{fld}"] = torch.cat([canon[f"{src}mixer.conv1d.{fld}.{n}"] for n in conv_names])
        for fld in _MAMBA_SAME:
            out[f"{dst}mixer.{fld}"] = canon[f"{src}mixer.{fld}"]
    elif kind == "attention":
        q, k, v = _qkv_split(canon[src + "self_attention.linear_qkv.weight"], cfg)
        out.update({dst + "mixer.q_proj.weight": q, dst + "mixer.k_proj.weight": k, dst + "mixer.v_proj.weight": v})
        out[dst + "mixer.o_proj.weight"] = canon[src + "self_attention.linear_proj.weight"]
    elif kind == "mlp":
        out[dst + "mixer.up_proj.weight"] = canon[src + "mlp.linear_fc1.weight"]
        out[dst + "mixer.down_proj.weight"] = canon[src + "mlp.linear_fc2.weight"]
    else:
        for native, mega in _MOE_SAME.items():
            if src + "mlp." + mega in canon:
                out[dst + "mixer." + native] = canon[src + "mlp." + mega]
        bias_key = src + "mlp.router.expert_bias"
        out[dst + "mixer.gate.e_score_correction_bias"] = (
            canon[bias_key].float() if bias_key in canon else torch.zeros(cfg.n_routed_experts)
        )
    return out


# ----------------------------------------------------------------------------- live models
def _sharded_tensors(model: torch.nn.Module) -> Iterator[Any]:
    """The model's ShardedTensors with factories applied (their data are views of the parameters)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            yield value


def load_into_model(model: torch.nn.Module, canon: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]) -> int:
    """Copy each local shard of ``model`` out of the whole canonical tensors; returns tensors filled.

    ``canon`` is a mapping or a function key -> tensor (e.g. lazy reads from a HF checkpoint).
    """
    get = canon if callable(canon) else canon.__getitem__
    filled = 0
    with torch.no_grad():
        for sh in _sharded_tensors(model):
            try:
                whole = get(sh.key)
            except KeyError:
                raise CheckpointError(f"missing tensor {sh.key!r} for the Megatron model") from None
            if tuple(whole.shape) != tuple(sh.global_shape):
                raise CheckpointError(f"tensor {sh.key!r} has shape {tuple(whole.shape)}, Megatron expects {tuple(sh.global_shape)}")
            sh.data.copy_(whole[sh.global_slice()])
            filled += 1
    return filled


def _is_main_replica(replica_id: Any) -> bool:
    """Megatron marks one copy of each shard with an all-zero replica id (others are DP copies)."""
    return not any(replica_id) if isinstance(replica_id, tuple) else replica_id == 0


def gather_from_model(model: torch.nn.Module, group: Any = None) -> dict[str, torch.Tensor]:
    """Whole canonical tensors rebuilt from every rank's shards (same result on all ranks)."""
    import torch.distributed as dist

    pieces = [
        (sh.key, tuple(sh.global_shape), sh.global_slice(), sh.data.detach().cpu().clone())
        for sh in _sharded_tensors(model)
        if _is_main_replica(sh.replica_id)
    ]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, pieces, group=group)
        pieces = [p for rank_pieces in gathered for p in rank_pieces]
    out: dict[str, torch.Tensor] = {}
    for key, shape, where, data in pieces:
        if key not in out:
            out[key] = torch.empty(shape, dtype=data.dtype)
        out[key][where] = data
    return out


# ----------------------------------------------------------------------------- on disk
def save_canonical(canon: Mapping[str, torch.Tensor], directory: str | Path) -> None:
    """Write whole tensors as a Megatron distributed checkpoint (rank 0's call; loads at any tp/ep/pp)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sharded = {k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0) for k, v in canon.items()}
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded, str(directory))
