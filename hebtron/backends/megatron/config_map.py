"""HybridConfig + recipe settings -> Megatron-Core ``TransformerConfig``.

One function per concern so each mapping can be read (and tested) on its own: the architecture
(Mamba2 / attention / MLP sizes), the MoE router and its balancing losses, the parallel sizes,
and precision. Settings Megatron cannot express exactly raise :class:`ConfigError` naming the
field, instead of training a silently different model.
"""

from __future__ import annotations

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
):
    """Build the ``TransformerConfig`` (import of megatron.core deferred to the call)."""
    from megatron.core.transformer import TransformerConfig

    check_divisibility(cfg, plan)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    kwargs = architecture_kwargs(cfg)
    kwargs.update(moe_kwargs(cfg, balance, te, dispatcher))
    kwargs.update(parallel_kwargs(plan))
    if plan.tp > 1 and "E" in cfg.hybrid_override_pattern:
        kwargs["sequence_parallel"] = True  # Megatron trains MoE with TP only under sequence parallelism
    kwargs.update(precision_kwargs(precision, te))
    kwargs["use_cpu_initialization"] = cpu
    kwargs["gradient_accumulation_fusion"] = False
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
    dispatcher: str


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
    return RecipeSettings(plan, precision, balance_from_recipe(recipe), meg.token_dispatcher)
