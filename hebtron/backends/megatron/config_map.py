"""HybridConfig + recipe settings -> Megatron-Core ``TransformerConfig``.

One function per concern so each mapping can be read (and tested) on its own: the architecture
(Mamba2 / attention / MLP sizes), the MoE router and its balancing losses, the parallel sizes,
precision, and the GPU speed settings. Settings Megatron cannot express exactly raise
:class:`ConfigError` naming the field, instead of training a silently different model.

megatron-core versions (0.16.1 to 0.19): a speed setting maps to the field the installed
``TransformerConfig`` / ``DistributedDataParallelConfig`` dataclass has (read from the dataclass,
not guessed from the version number); a setting the version cannot express is one line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hebtron.errors import ConfigError, UserError
from hebtron.model.config import HybridConfig

AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss")


@dataclass(frozen=True)
class ParallelPlan:
    """Parallel degrees of one run. ``etp`` is the expert tensor-parallel size; None picks 1 (whole
    experts) with expert parallelism and ``tp`` without it (Megatron reduces expert gradients
    over the dense data-parallel group when ep = 1, so experts must then be split like the rest)."""

    tp: int = 1
    ep: int = 1
    etp: int | None = None
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def expert_tp(self) -> int:
        if self.etp is not None:
            return self.etp
        return 1 if self.ep > 1 else self.tp

    def shrunk(self, world_size: int) -> "ParallelPlan":
        """The same plan at dp = world_size / (tp * pp * cp) (used by preflight on 2 ranks)."""
        dp = world_size // (self.tp * self.pp * self.cp)
        return ParallelPlan(self.tp, self.ep, self.etp, self.pp, self.cp, dp, self.vpp, self.sequence_parallel)


@dataclass(frozen=True)
class MoEBalance:
    """Router balancing: Megatron aux-loss types with coefficients, z-loss, aux-loss-free bias.

    Defaults are Nemotron 3 Nano's: a sequence-level aux loss of 1e-4 and the expert bias.
    """

    loss_types: tuple[str, ...] = ("seq_aux_loss",)
    loss_coeffs: tuple[float, ...] = (1e-4,)
    z_loss_coeff: float | None = None
    expert_bias: bool = True
    bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        if len(self.loss_types) != len(self.loss_coeffs):
            raise UserError("moe balance: loss types and coefficients must have the same length")
        for kind in self.loss_types:
            if kind not in AUX_LOSS_TYPES:
                raise UserError(f"moe balance: unknown aux loss {kind!r}; expected one of {', '.join(AUX_LOSS_TYPES)}")


@dataclass(frozen=True)
class Precision:
    """``bf16`` or ``fp32`` parameters; FP8 (``hybrid`` / ``e4m3``) only with Transformer Engine."""

    dtype: str = "fp32"
    fp8: str | None = None
    fp8_recipe: str = "tensorwise"
    extra: dict[str, Any] = field(default_factory=dict)


DISPATCHERS = ("alltoall", "allgather", "flex")
FLEX_BACKENDS = ("deepep", "hybridep")
_FUSIONS = ("gradient_accumulation_fusion", "moe_permute_fusion", "cross_entropy_loss_fusion")
_OVERLAPS = ("overlap_grad_reduce", "overlap_param_gather")


@dataclass(frozen=True)
class SpeedSettings:
    """GPU speed settings that Megatron-Bridge's Nemotron 3 Nano recipes turn on (all off by default).

    None changes the math: overlaps run the data-parallel reduce-scatter / all-gather under
    compute, the fusions fuse the weight-gradient accumulation (Transformer Engine linears), the
    MoE token permutation (TE) and the vocab-parallel cross entropy; ``flex`` dispatches tokens
    with DeepEP or HybridEP instead of NCCL all-to-all. :func:`resolve_speed` decides what runs.
    """

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    gradient_accumulation_fusion: bool = False
    moe_permute_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
    dispatcher: str = "alltoall"
    flex_backend: str = "deepep"

    def __post_init__(self) -> None:
        if self.dispatcher not in DISPATCHERS:
            raise UserError(f"megatron.token_dispatcher: expected one of {', '.join(DISPATCHERS)}, got {self.dispatcher!r}")
        if self.flex_backend not in FLEX_BACKENDS:
            raise UserError(f"megatron.flex_backend: expected one of {', '.join(FLEX_BACKENDS)}, got {self.flex_backend!r}")


def _importable(name: str) -> bool:
    """A module can be imported (found without importing it, so probing has no side effects)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_speed(
    speed: SpeedSettings,
    *,
    cuda: bool,
    te: bool,
    distributed_optimizer: bool,
    moe: bool,
    importable: Callable[[str], bool] = _importable,
) -> tuple[SpeedSettings, tuple[str, ...]]:
    """The speed settings that run here, and one note per setting turned off (or a UserError).

    Pure (the facts come in as arguments) so the rule is testable without a GPU:

    - CPU: every overlap and fusion is forced off (the fusions need CUDA kernels from Transformer
      Engine / Apex, the CPU path runs the collectives synchronously); ``flex`` is refused;
    - CUDA without the Transformer Engine spec (``megatron.local_spec``): the two TE fusions
      (weight-gradient accumulation, MoE permutation) are forced off; the native fused cross
      entropy still runs;
    - ``overlap_param_gather`` needs the distributed optimizer and ``overlap_grad_reduce``;
    - ``flex`` needs DeepEP (the ``deep_ep`` package; HybridEP ships in it) on CUDA.
    """
    if speed.overlap_param_gather and not (distributed_optimizer and speed.overlap_grad_reduce):
        raise UserError("megatron.overlap_param_gather: needs megatron.distributed_optimizer: true and "
                        "megatron.overlap_grad_reduce: true (the parameter all-gather of the distributed optimizer)")
    notes: list[str] = []
    changes: dict[str, Any] = {}
    if speed.dispatcher == "flex" and moe:
        if not cuda:
            raise UserError("megatron.token_dispatcher: flex (DeepEP / HybridEP) runs on CUDA GPUs only; "
                            "use alltoall on this machine")
        if not importable("deep_ep"):
            raise UserError(f"megatron.token_dispatcher: flex with flex_backend {speed.flex_backend} needs DeepEP "
                            "(the deep_ep package, built for this CUDA), which is not installed; use alltoall")
    if not cuda:
        on = [name for name in (*_OVERLAPS, *_FUSIONS) if getattr(speed, name)]
        changes.update({name: False for name in on})
        if on:
            notes.append(f"megatron.{', megatron.'.join(on)}: forced off on CPU (GPU speed settings: CUDA kernels "
                         "and overlapped NCCL collectives; the CPU path computes the same unfused and synchronously)")
    elif not te:
        on = [name for name in ("gradient_accumulation_fusion", "moe_permute_fusion") if getattr(speed, name)]
        changes.update({name: False for name in on})
        if on:
            notes.append(f"megatron.{', megatron.'.join(on)}: forced off (they fuse inside Transformer Engine "
                         "layers, and megatron.local_spec: true uses hebtron's local layers)")
    return dataclasses.replace(speed, **changes), tuple(notes)


def dataclass_fields(cls: type) -> frozenset[str]:
    """Field names of a megatron-core config dataclass (what the installed version can express)."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def speed_kwargs(speed: SpeedSettings, fields: frozenset[str], moe: bool) -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments for ``speed``, named as the installed version names
    them. A setting that is on and has no field in this version is one line."""

    def need(name: str, setting: str) -> str:
        if name not in fields:
            raise UserError(f"megatron.{setting}: this megatron-core has no TransformerConfig.{name}; "
                            "turn the setting off or use megatron-core 0.16.1 or later")
        return name

    out: dict[str, Any] = {"gradient_accumulation_fusion": speed.gradient_accumulation_fusion}
    if speed.cross_entropy_loss_fusion:
        out[need("cross_entropy_loss_fusion", "cross_entropy_loss_fusion")] = True
        if "cross_entropy_fusion_impl" in fields:  # 'native' needs no Transformer Engine (Megatron-Bridge's choice)
            out["cross_entropy_fusion_impl"] = "native"
    if not moe:
        return out
    if speed.moe_permute_fusion:
        out[need("moe_permute_fusion", "moe_permute_fusion")] = True
    if speed.dispatcher == "flex":
        if "moe_flex_dispatcher_backend" in fields:  # 0.16+: the backend is a string
            out["moe_flex_dispatcher_backend"] = speed.flex_backend
        elif speed.flex_backend == "deepep":  # older: a DeepEP switch only
            out[need("moe_enable_deepep", "token_dispatcher")] = True
        else:
            need("moe_flex_dispatcher_backend", "flex_backend")
    return out


def ddp_kwargs(speed: SpeedSettings, distributed_optimizer: bool, fields: frozenset[str]) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` keyword arguments (fp32 gradient reduction, as before)."""
    out: dict[str, Any] = {"grad_reduce_in_fp32": True, "use_distributed_optimizer": distributed_optimizer}
    for name in _OVERLAPS:
        if getattr(speed, name):
            if name not in fields:
                raise UserError(f"megatron.{name}: this megatron-core has no DistributedDataParallelConfig.{name}")
            out[name] = True
        elif name in fields:
            out[name] = False
    return {k: v for k, v in out.items() if k in fields}


def architecture_kwargs(cfg: HybridConfig) -> dict[str, Any]:
    """Layer sizes shared by every layer kind (no positional encoding: it is a MambaModel argument)."""
    from megatron.core.activations import squared_relu

    for name in ("use_bias", "attention_bias", "mlp_bias"):
        if getattr(cfg, name):
            raise ConfigError(f"model config: {name}: the megatron backend supports bias-free layers only (Nemotron-H)")
    return {
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_key_value_heads,
        "kv_channels": cfg.attn_head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": cfg.layer_norm_epsilon,
        "activation_func": squared_relu,
        "gated_linear_unit": False,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": cfg.initializer_range,
        "fp32_residual_connection": cfg.residual_in_fp32,
        "mamba_state_dim": cfg.ssm_state_size,
        "mamba_head_dim": cfg.mamba_head_dim,
        "mamba_num_groups": cfg.n_groups,
        "mamba_num_heads": cfg.mamba_num_heads,
        "is_hybrid_model": True,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "attention_softmax_in_fp32": True,
        "calculate_per_token_loss": True,  # hebtron's rule: sum over tokens / global loss tokens
    }


def moe_kwargs(cfg: HybridConfig, balance: MoEBalance, te: bool, dispatcher: str = "alltoall") -> dict[str, Any]:
    """Router (score function, top-k, groups, scaling, expert bias) and balancing losses."""
    if "E" not in cfg.hybrid_override_pattern:
        return {}
    k = cfg.num_experts_per_tok
    out: dict[str, Any] = {
        "num_moe_experts": cfg.n_routed_experts,
        "moe_router_topk": k,
        "moe_ffn_hidden_size": cfg.moe_intermediate_size,
        "moe_router_score_function": cfg.router_score_function,
        "moe_router_topk_scaling_factor": cfg.routed_scaling_factor,
        "moe_router_dtype": "fp32",
        "moe_token_dispatcher_type": dispatcher,
        "moe_grouped_gemm": te,
        "moe_latent_size": cfg.moe_latent_size,
        "moe_router_load_balancing_type": list(balance.loss_types) or "none",
        "moe_aux_loss_coeff": list(balance.loss_coeffs) or 0.0,
        "moe_z_loss_coeff": balance.z_loss_coeff,
    }
    if cfg.n_shared_experts > 0:
        out["moe_shared_expert_intermediate_size"] = cfg.n_shared_experts * cfg.moe_shared_expert_intermediate_size
    if cfg.router_score_function == "sigmoid":
        if not cfg.norm_topk_prob and k > 1:
            raise ConfigError(
                "model config: norm_topk_prob: Megatron's sigmoid router always normalizes the top-k weights; "
                "set norm_topk_prob: true for the megatron backend"
            )
        # The bias is part of the model (e_score_correction_bias): always carried; a zero update
        # rate freezes it when the recipe turns aux-loss-free balancing off.
        out["moe_router_enable_expert_bias"] = True
        out["moe_router_bias_update_rate"] = balance.bias_update_rate if balance.expert_bias else 0.0
    else:
        out["moe_router_pre_softmax"] = not cfg.norm_topk_prob
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        if k // cfg.topk_group != 2:
            raise ConfigError(
                "model config: topk_group: Megatron scores a group by its top (top-k / topk_group) experts, "
                f"Nemotron-H by its top 2; num_experts_per_tok / topk_group must be 2, got {k} / {cfg.topk_group}"
            )
        out["moe_router_num_groups"] = cfg.n_group
        out["moe_router_group_topk"] = cfg.topk_group
    return out


def parallel_kwargs(plan: ParallelPlan) -> dict[str, Any]:
    return {
        "tensor_model_parallel_size": plan.tp,
        "pipeline_model_parallel_size": plan.pp,
        "virtual_pipeline_model_parallel_size": plan.vpp,
        "context_parallel_size": plan.cp,
        "expert_model_parallel_size": plan.ep,
        "expert_tensor_parallel_size": plan.expert_tp,
        "sequence_parallel": plan.sequence_parallel and plan.tp > 1,
    }


def precision_kwargs(precision: Precision, te: bool) -> dict[str, Any]:
    if precision.dtype not in ("fp32", "bf16"):
        raise UserError(f"train.precision: expected 'fp32' or 'bf16' for the megatron backend, got {precision.dtype!r}")
    bf16 = precision.dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    out: dict[str, Any] = {"bf16": bf16, "params_dtype": dtype, "pipeline_dtype": dtype}
    if precision.fp8 is not None:
        if not te:
            raise UserError(
                f"megatron.fp8: {precision.fp8!r} needs Transformer Engine (pip install -e .[gpu]); "
                "it is not installed here"
            )
        out.update({"fp8": precision.fp8, "fp8_recipe": precision.fp8_recipe, "first_last_layers_bf16": True})
    return out


def transformer_config(
    cfg: HybridConfig,
    plan: ParallelPlan = ParallelPlan(),
    precision: Precision = Precision(),
    balance: MoEBalance = MoEBalance(),
    te: bool = False,
    dispatcher: str = "alltoall",
    cpu: bool | None = None,
    speed: SpeedSettings | None = None,
):
    """Build the ``TransformerConfig`` (import of megatron.core deferred to the call). ``speed``
    should already be :func:`resolve_speed`'s answer; without it, ``dispatcher`` and no speed settings."""
    from megatron.core.transformer import TransformerConfig

    check_divisibility(cfg, plan)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    speed = SpeedSettings(dispatcher=dispatcher) if speed is None else speed
    moe = "E" in cfg.hybrid_override_pattern
    kwargs = architecture_kwargs(cfg)
    kwargs.update(moe_kwargs(cfg, balance, te, speed.dispatcher))
    kwargs.update(parallel_kwargs(plan))
    if plan.tp > 1 and moe:
        kwargs["sequence_parallel"] = True  # Megatron trains MoE with TP only under sequence parallelism
    kwargs.update(precision_kwargs(precision, te))
    kwargs["use_cpu_initialization"] = cpu
    kwargs.update(speed_kwargs(speed, dataclass_fields(TransformerConfig), moe))
    try:
        return TransformerConfig(**kwargs)
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"megatron TransformerConfig rejected the model/parallel settings: {err}") from None


def check_divisibility(cfg: HybridConfig, plan: ParallelPlan) -> None:
    """Model sizes that tp / ep / pp must divide; one line naming the parallel field."""
    kinds = set(cfg.hybrid_override_pattern)
    tp = plan.tp

    def need(ok: bool, fld: str, msg: str) -> None:
        if not ok:
            raise UserError(f"parallel.{fld}: {msg}")

    need(cfg.vocab_size % tp == 0, "tp", f"tp={tp} must divide the vocabulary ({cfg.vocab_size})")
    if "M" in kinds:
        need(cfg.mamba_num_heads % tp == 0, "tp", f"tp={tp} must divide mamba_num_heads ({cfg.mamba_num_heads})")
        need(cfg.n_groups % tp == 0, "tp", f"tp={tp} must divide the Mamba n_groups ({cfg.n_groups})")
    if "*" in kinds:
        need(cfg.num_attention_heads % tp == 0, "tp", f"tp={tp} must divide num_attention_heads ({cfg.num_attention_heads})")
        kv = cfg.num_key_value_heads
        need(kv % tp == 0 or tp % kv == 0, "tp", f"tp={tp} and num_key_value_heads ({kv}) must divide one another")
    if "-" in kinds:
        need(cfg.intermediate_size % tp == 0, "tp", f"tp={tp} must divide intermediate_size ({cfg.intermediate_size})")
    if "E" in kinds:
        need(cfg.n_routed_experts % plan.ep == 0, "ep", f"ep={plan.ep} must divide n_routed_experts ({cfg.n_routed_experts})")
        need(
            cfg.moe_intermediate_size % plan.expert_tp == 0,
            "tp",
            f"expert tensor parallel size {plan.expert_tp} must divide moe_intermediate_size ({cfg.moe_intermediate_size})",
        )
        if plan.ep == 1 and plan.expert_tp != tp:
            need(False, "ep", f"without expert parallelism experts are split like dense layers: expert tp must be tp={tp}")
        if cfg.n_shared_experts:
            size = cfg.n_shared_experts * cfg.moe_shared_expert_intermediate_size
            need(size % tp == 0, "tp", f"tp={tp} must divide the shared expert size ({size})")
    need(cfg.num_hidden_layers % plan.pp == 0, "pp", f"pp={plan.pp} must divide the {cfg.num_hidden_layers} layers")
    if plan.vpp is not None and plan.vpp > 1:
        need(plan.pp > 1, "pp", "a virtual pipeline needs pp > 1")
        need(
            cfg.num_hidden_layers % (plan.pp * plan.vpp) == 0,
            "pp",
            f"pp x virtual_pipeline = {plan.pp * plan.vpp} must divide the {cfg.num_hidden_layers} layers",
        )


# ----------------------------------------------------------------------------- from a recipe
@dataclass(frozen=True)
class RecipeSettings:
    """Everything the Megatron engine needs from a recipe besides the model config."""

    plan: ParallelPlan
    precision: Precision
    balance: MoEBalance
    speed: SpeedSettings = SpeedSettings()
    local_spec: bool = False  # megatron.local_spec: hebtron's layer specs even where CUDA runs
    reshardable: bool = False  # checkpoint.reshardable: optimizer state in the fully reshardable format

    @property
    def dispatcher(self) -> str:
        return self.speed.dispatcher


_AUX_TYPES = (("micro_batch", "aux_loss"), ("sequence", "seq_aux_loss"), ("global_batch", "global_aux_loss"))


def balance_from_recipe(recipe: Any) -> MoEBalance:
    """``moe.aux_loss`` coefficients -> Megatron aux-loss types; ``moe.bias_rate`` -> expert-bias rate."""
    moe = recipe.moe
    types = tuple(mega for ours, mega in _AUX_TYPES if getattr(moe.aux_loss, ours) > 0)
    coeffs = tuple(float(getattr(moe.aux_loss, ours)) for ours, _ in _AUX_TYPES if getattr(moe.aux_loss, ours) > 0)
    z = float(moe.aux_loss.z) or None
    return MoEBalance(types, coeffs, z, expert_bias=moe.bias_rate > 0, bias_update_rate=float(moe.bias_rate))


def settings_from_recipe(recipe: Any) -> RecipeSettings:
    par, meg = recipe.parallel, recipe.megatron
    plan = ParallelPlan(
        tp=par.tp, ep=par.ep, etp=meg.expert_tp, pp=par.pp, cp=par.cp, dp=par.dp,
        vpp=meg.virtual_pipeline, sequence_parallel=meg.sequence_parallel,
    )
    precision = Precision(dtype=recipe.train.precision, fp8=meg.fp8, fp8_recipe=meg.fp8_recipe)
    speed = SpeedSettings(
        overlap_grad_reduce=meg.overlap_grad_reduce, overlap_param_gather=meg.overlap_param_gather,
        gradient_accumulation_fusion=meg.gradient_accumulation_fusion, moe_permute_fusion=meg.moe_permute_fusion,
        cross_entropy_loss_fusion=meg.cross_entropy_loss_fusion, dispatcher=meg.token_dispatcher,
        flex_backend=meg.flex_backend,
    )
    return RecipeSettings(plan, precision, balance_from_recipe(recipe), speed, meg.local_spec,
                          recipe.checkpoint.reshardable)
