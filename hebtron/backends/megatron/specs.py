"""Megatron-Core layer specs for the hybrid stack: Transformer Engine on GPU, hebtron's own on CPU.

Megatron's local (non-TE) modules cannot run Nemotron-H on CPU: its Mamba mixer needs the
mamba-ssm CUDA kernels, and its local attention refuses packed sequences. The local spec below
swaps in three hebtron modules and keeps Megatron's everything else (parallel linears, MoE
layer, router, token dispatcher, experts, bias-dropout-add):

- :class:`LocalMambaMixer` - Megatron's MambaMixer parameters and checkpoint layout, computed
  with ``hebtron.kernels`` (causal conv1d and chunked SSD scan that restart at every document
  start, ``seq_idx`` derived from ``cu_seqlens``), plus Nemotron-H's dt clamp;
- :class:`PackedCoreAttention` - causal attention that honours ``packed_seq_params``
  (documents never see each other);
- :class:`LocalRMSNorm` - fp32 RMSNorm that supports sequence parallelism.

Packed batches use Megatron's THD convention: one row of ``b * T`` tokens with ``cu_seqlens``
at every document start (see :mod:`hebtron.backends.megatron.batches`). Sharded-checkpoint keys
are mapped onto the TE spec's names, so distributed checkpoints move between a CPU preflight
and a GPU run.

The GPU spec is Megatron's own, with one hebtron mixer: :class:`ClampedMambaMixer`, Megatron's
``MambaMixer`` unchanged except that its fused kernel gets Nemotron-H's ``dt_limit`` (Megatron
passes none, so dt would go unclamped where hebtron native, the CPU spec and Hugging Face clamp
it) and that packed rows always carry ``seq_idx`` (0.17+ read it from ``PackedSeqParams``, which
computes it only when ``total_tokens`` is set). Which spec runs is :func:`choose_layer_spec`'s
decision: on CUDA, missing kernels stop the run unless ``megatron.local_spec: true``.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hebtron.errors import UserError
from hebtron.model.mamba2 import conv_and_scan
from hebtron.model.config import HybridConfig


# ----------------------------------------------------------------------------- which spec
@dataclass(frozen=True)
class GPUStack:
    """What the production (Transformer Engine) spec needs, as found in this process: None where a
    part is usable, else why not (the text goes into the one-line error)."""

    cuda: bool
    transformer_engine: str | None = None
    mamba_ssm: str | None = None
    causal_conv1d: str | None = None


def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, OSError (a .so built for another CUDA), RuntimeError
        return f"{module}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return None


def _extension_problem(package: str, extension: str) -> str | None:
    """A package whose compiled CUDA extension is missing (installed with *_SKIP_CUDA_BUILD)."""
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    if importlib.util.find_spec(extension) is None:
        return f"{package} has no compiled extension ({extension})"
    return None


def probe_gpu_stack() -> GPUStack:
    """Look for CUDA, Transformer Engine and the mamba-ssm / causal-conv1d extensions. Imports
    only where CUDA runs (where Megatron imports them anyway); on CPU nothing is imported."""
    if not torch.cuda.is_available():
        return GPUStack(cuda=False)
    return GPUStack(
        cuda=True,
        transformer_engine=_import_problem("transformer_engine.pytorch"),
        mamba_ssm=_extension_problem("mamba_ssm", "selective_scan_cuda") or _import_problem("mamba_ssm.ops.triton.ssd_combined"),
        causal_conv1d=_extension_problem("causal_conv1d", "causal_conv1d_cuda"),
    )


def choose_layer_spec(stack: GPUStack, local_spec: bool, mamba: bool) -> bool:
    """True: Megatron's Transformer Engine spec; False: hebtron's local spec.

    On CPU always the local spec. On CUDA the TE spec, and a missing Transformer Engine (or, with
    Mamba layers, mamba-ssm / causal-conv1d without their compiled extensions) is one line
    (UserError) instead of a silent fall back to the local spec, which is correct but slow
    (dense attention masks, a per-expert loop). ``megatron.local_spec: true`` asks for that on purpose."""
    if not stack.cuda or local_spec:
        return False
    missing = [stack.transformer_engine] + ([stack.mamba_ssm, stack.causal_conv1d] if mamba else [])
    problems = [m for m in missing if m is not None]
    if problems:
        raise UserError(
            f"megatron: this CUDA run needs Transformer Engine{', mamba-ssm and causal-conv1d' if mamba else ''} "
            f"for Megatron's GPU layers, but {'; '.join(problems)} (pip install -e .[gpu], or a container that has "
            "them); set megatron.local_spec: true to train with hebtron's local layers on purpose (much slower)"
        )
    return True


# ----------------------------------------------------------------------------- helpers
def seq_idx_from_packed(packed_seq_params: Any, total_tokens: int, device: torch.device) -> torch.Tensor | None:
    """(1, total_tokens) document index from ``cu_seqlens_q`` (THD layout), or None."""
    if packed_seq_params is None:
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    positions = torch.arange(total_tokens, device=device)
    return (torch.searchsorted(cu.to(device)[1:-1].contiguous(), positions, right=True)).unsqueeze(0)


def _megatron():
    """Megatron imports in one place (deferred: importing hebtron must not need megatron)."""
    from megatron.core.ssm.mamba_mixer import MambaMixer
    from megatron.core.transformer.module import MegatronModule

    return MambaMixer, MegatronModule


class LocalRMSNorm(nn.Module):
    """RMSNorm in fp32 (Nemotron-H numerics). Under sequence parallelism its weight is marked so
    Megatron all-reduces its gradient across tensor-parallel ranks."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class LocalGatedRMSNorm(nn.Module):
    """``norm(y * silu(z))`` per channel group; weight sharded along channels with tensor parallelism."""

    def __init__(self, size: int, group_size: int, eps: float, dtype: torch.dtype, tp_group: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.group_size = group_size
        self.eps = eps
        self.tp_group = tp_group

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        yf = y.float() * F.silu(z.float())
        grouped = yf.view(*yf.shape[:-1], -1, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.view_as(yf).to(dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


@functools.cache
def _mixer_class() -> type:
    MambaMixer, MegatronModule = _megatron()

    class LocalMambaMixer(MambaMixer):
        """Megatron's Mamba2 mixer layout computed with hebtron's seq_idx-aware kernels.

        Subclasses :class:`MambaMixer` only to inherit its sharded-checkpoint layout (in_proj split
        into z/x/B/C/dt, conv1d into x/B/C), so checkpoints equal those of the TE/mamba-ssm mixer.
        """

        def __init__(
            self,
            config: Any,
            submodules: Any,
            d_model: int,
            d_conv: int = 4,
            chunk_size: int = 128,
            dt_min: float = 0.001,
            dt_max: float = 0.1,
            dt_init_floor: float = 1e-4,
            dt_clamp_min: float = 0.0,
            conv_bias: bool = True,
            layer_number: int | None = None,
            pg_collection: Any = None,
            pp_layer_offset: int = 0,
            **_: Any,
        ) -> None:
            from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
            from megatron.core.transformer.spec_utils import build_module

            MegatronModule.__init__(self, config)
            self.config = config
            self.d_model = d_model
            self.d_conv = d_conv
            self.chunk_size = chunk_size
            self.layer_number = layer_number
            self.pp_layer_offset = pp_layer_offset
            self.pg_collection = pg_collection
            self.tp_group = pg_collection.tp
            self.D_has_hdim = False
            self.rmsnorm = True
            self.norm_before_gate = False
            self.d_state = config.mamba_state_dim
            self.headdim = config.mamba_head_dim
            self.ngroups = config.mamba_num_groups
            self.nheads = config.mamba_num_heads
            self.d_inner = self.nheads * self.headdim
            tp = self.tp_group.size()
            self.nheads_local_tp = self.nheads // tp
            self.d_inner_local_tp = self.d_inner // tp
            self.ngroups_local_tp = self.ngroups // tp
            self.dt_limit = (dt_clamp_min, math.inf)
            self.in_proj = build_module(
                submodules.in_proj,
                d_model,
                self.d_inner * 2 + 2 * self.ngroups * self.d_state + self.nheads,  # z x B C dt
                config=config,
                init_method=config.init_method,
                gather_output=False,
                bias=False,
                skip_bias_add=False,
                is_expert=False,
                tp_comm_buffer_name="fc1",
                tp_group=self.tp_group,
            )
            conv_dim = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state
            conv = nn.Conv1d(
                conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                bias=conv_bias, dtype=config.params_dtype,
            )
            if conv_as_parameters():  # as the installed MambaMixer holds it (its sharded_state_dict reads it)
                self.conv1d_weight = nn.Parameter(conv.weight.detach())
                self.conv1d_bias = nn.Parameter(conv.bias.detach()) if conv.bias is not None else None
            else:
                self.conv1d = conv
            heads = self.nheads_local_tp
            first_head = self.tp_group.rank() * heads
            dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(config.params_dtype))
            # Nemotron-H initialization: A = 1..heads (S4D-real); fp32 like Megatron's.
            self.A_log = nn.Parameter(torch.log(torch.arange(first_head + 1, first_head + heads + 1, dtype=torch.float32)))
            self.D = nn.Parameter(torch.ones(heads))
            self.norm = LocalGatedRMSNorm(
                self.d_inner_local_tp, self.d_inner_local_tp // self.ngroups_local_tp, config.layernorm_epsilon,
                config.params_dtype, self.tp_group,
            )
            conv = self._conv()
            for param in (conv.weight, conv.bias, self.dt_bias, self.A_log, self.D, self.norm.weight):
                if param is not None:
                    set_tensor_model_parallel_attributes(param, True, 0, 1)
            self.out_proj = build_module(
                submodules.out_proj,
                self.d_inner,
                d_model,
                config=config,
                init_method=config.output_layer_init_method,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=True,
                is_expert=False,
                tp_comm_buffer_name="fc2",
                tp_group=self.tp_group,
            )

        def _conv(self) -> Any:
            """The depthwise conv's weight and bias, whichever way they are held."""
            if "conv1d" in self._modules:
                return self.conv1d
            return types.SimpleNamespace(weight=self.conv1d_weight, bias=self.conv1d_bias)

        def forward(self, hidden_states, inference_context=None, *, inference_params=None, packed_seq_params=None):
            """hidden_states (s, b, h) -> (out, bias); packed rows restart conv and scan per document."""
            if inference_context is not None or inference_params is not None:
                raise NotImplementedError("the CPU Mamba mixer is for training and evaluation, not generation")
            zxbcdt, _ = self.in_proj(hidden_states)
            seqlen, batch, _ = zxbcdt.shape
            zxbcdt = zxbcdt.transpose(0, 1)
            groups_state = self.ngroups_local_tp * self.d_state
            z, xbc, dt = zxbcdt.split([self.d_inner_local_tp, self.d_inner_local_tp + 2 * groups_state, self.nheads_local_tp], dim=-1)
            seq_idx = seq_idx_from_packed(packed_seq_params, seqlen, zxbcdt.device)
            if seq_idx is not None and batch != 1:
                raise ValueError("packed sequences use the THD layout: one row per micro-batch")
            y = conv_and_scan(xbc, dt, self._conv(), self.A_log, self.D, self.dt_bias, self.dt_limit, self.chunk_size,
                              self.nheads_local_tp, self.headdim, self.ngroups_local_tp, self.d_state, seq_idx)
            y = self.norm(y, z)
            return self.out_proj(y.transpose(0, 1).contiguous().to(hidden_states.dtype))

    return LocalMambaMixer


@functools.cache
def _attention_class() -> type:
    _, MegatronModule = _megatron()

    class PackedCoreAttention(MegatronModule):
        """Causal GQA core attention via ``scaled_dot_product_attention``; packed THD input gets a
        per-document causal mask from ``cu_seqlens``."""

        def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                     attention_dropout: float | None = None, softmax_scale: float | None = None,
                     cp_comm_type: str | None = None, pg_collection: Any = None) -> None:
            super().__init__(config=config)
            if config.context_parallel_size != 1:
                raise ValueError("context parallelism needs Transformer Engine attention (GPU)")
            tp = pg_collection.tp.size() if pg_collection is not None else 1
            self.heads = config.num_attention_heads // tp
            self.softmax_scale = softmax_scale

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if attention_bias is not None:
                raise ValueError("attention bias is not supported")
            if packed_seq_params is not None:  # THD: (t, heads, d)
                t = query.shape[0]
                seq_idx = seq_idx_from_packed(packed_seq_params, t, query.device)[0]
                mask = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
                mask &= seq_idx[:, None] == seq_idx[None, :]
                q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # (1, h, t, d)
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
                )
                return out[0].transpose(0, 1).reshape(t, -1)
            s, b = query.shape[:2]  # SBHD: (s, b, heads, d)
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
            )
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    return PackedCoreAttention


def _stack_classes() -> tuple[type, type, str]:
    """(stack class, submodules dataclass, name of the layer-pattern argument) for this megatron-core."""
    try:  # megatron-core >= 0.18
        from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules

        return HybridStack, HybridStackSubmodules, "hybrid_layer_pattern"
    except ImportError:
        from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules

        return MambaStack, MambaStackSubmodules, "hybrid_override_pattern"


@functools.cache
def _local_stack_class() -> type:
    stack_cls, _, _ = _stack_classes()

    class LocalHybridStack(stack_cls):
        """The hybrid stack with hebtron's final RMSNorm (the stock one hard-codes Transformer Engine's)."""

        def __init__(self, config: Any, submodules: Any, *args: Any, **kwargs: Any) -> None:
            wants_norm = kwargs.pop("post_layer_norm", True)
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = wants_norm
            if self.post_process and wants_norm:
                self.final_norm = LocalRMSNorm(config, config.hidden_size, config.layernorm_epsilon)

    return LocalHybridStack


def mixer_params(cfg: HybridConfig) -> dict[str, Any]:
    """Mamba mixer arguments that are not TransformerConfig fields."""
    return {
        "d_conv": cfg.conv_kernel,
        "chunk_size": cfg.chunk_size,
        "dt_min": cfg.time_step_min,
        "dt_max": cfg.time_step_max,
        "dt_init_floor": cfg.time_step_floor,
        "conv_bias": cfg.use_conv_bias,
    }


def local_stack_spec(cfg: HybridConfig, num_experts: int | None):
    """The CPU spec: Megatron parallel linears and MoE, hebtron mixer / attention / norms."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    try:
        from megatron.core.transformer.transformer_layer import MoETransformerLayer as MoELayerCls
    except ImportError:  # older megatron-core
        MoELayerCls = TransformerLayer
    _, submodules_cls, _ = _stack_classes()
    params = mixer_params(cfg)
    params["dt_clamp_min"] = cfg.time_step_min  # Nemotron-H clamps dt from below (HF and hebtron)
    mamba = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=LocalRMSNorm,
            mixer=ModuleSpec(
                module=_mixer_class(),
                params=params,
                submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
            ),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
        ),
    )
    attention = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LocalRMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=_attention_class(), linear_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )
    mlp = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=LocalRMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    subs: dict[str, Any] = {"mamba_layer": mamba, "attention_layer": attention, "mlp_layer": mlp}
    if num_experts:
        subs["moe_layer"] = ModuleSpec(
            module=MoELayerCls,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=LocalRMSNorm,
                mlp=get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(module=_local_stack_class(), submodules=submodules_cls(**subs))


# ----------------------------------------------------------------------------- GPU mixer
_KERNELS = ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined")  # the fused training / prefill scans


def _mixer_module() -> Any:
    """The module whose globals Megatron's MambaMixer calls its kernels through."""
    from megatron.core.ssm.mamba_mixer import MambaMixer

    return sys.modules[MambaMixer.__module__]


def _mixer_class_source() -> Any:
    """The installed ``MambaMixer`` class as parsed source (``ast.ClassDef``), or why not (str).

    Parsed, not imported: the mixer module needs Triton, which CPU machines lack."""
    try:
        spec = importlib.util.find_spec("megatron.core.ssm.mamba_mixer")  # imports megatron.core.ssm, not the mixer
    except Exception as err:
        return f"megatron-core does not import ({type(err).__name__}: {err})"
    if spec is None or spec.origin is None:
        return "megatron-core's Mamba mixer module is not installed"
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError) as err:
        return f"megatron-core's Mamba mixer source could not be read ({err})"
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "MambaMixer":
            return node
    return "megatron-core's Mamba mixer module has no MambaMixer class"


def _method(cls: Any, name: str) -> Any:
    return next((m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name == name), None)


def dt_clamp_problem() -> str | None:
    """Why the GPU mixer cannot clamp dt with this megatron-core (None: it can).

    :class:`ClampedMambaMixer` relies on one fact of Megatron's source: ``MambaMixer._ssm_training``
    calls ``mamba_split_conv1d_scan_combined`` by its module-global name. Checked on the installed
    version's source, so a refactor in a later release is reported instead of training silently
    unclamped (true of 0.16.1 to 0.19.2)."""
    cls = _mixer_class_source()
    if isinstance(cls, str):
        return cls
    method = _method(cls, "_ssm_training")
    if method is None:
        return "megatron-core's MambaMixer has no _ssm_training method"
    calls = {c.func.id for c in ast.walk(method) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    if _KERNELS[0] not in calls:
        return f"megatron-core's MambaMixer._ssm_training no longer calls {_KERNELS[0]} by name"
    return None


@functools.cache
def conv_as_parameters() -> bool:
    """True where the installed ``MambaMixer`` holds its depthwise conv as the parameters
    ``conv1d_weight`` / ``conv1d_bias`` (0.19), False where it holds an ``nn.Conv1d`` named
    ``conv1d`` (0.16 to 0.18). Checkpoint keys are ``conv1d.weight`` / ``conv1d.bias`` in both."""
    cls = _mixer_class_source()
    init = None if isinstance(cls, str) else _method(cls, "__init__")
    if init is None:
        return False
    return any(isinstance(t, ast.Attribute) and t.attr == "conv1d_weight" and isinstance(t.value, ast.Name)
               and t.value.id == "self"
               for node in ast.walk(init) if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))


def _with_dt_limit(kernel: Callable[..., Any], limit: tuple[float, float]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        kwargs["dt_limit"] = limit  # overrides Megatron's (0, inf) where it passes one (prefill)
        return kernel(*args, **kwargs)

    call.__wrapped__ = kernel  # type: ignore[attr-defined]
    return call


@contextlib.contextmanager
def _dt_limited(limit: tuple[float, float]) -> Iterator[None]:
    """While active, the mixer module's fused scans are called with ``dt_limit=limit``.

    Scoped to one mixer call on the calling thread's forward (and its recomputation); the module
    names are restored on exit, also on error. This is what lets the subclass below pass one
    argument without copying Megatron's forward."""
    module = _mixer_module()
    saved = {name: getattr(module, name) for name in _KERNELS if getattr(module, name, None) is not None}
    for name, kernel in saved.items():
        setattr(module, name, _with_dt_limit(kernel, limit))
    try:
        yield
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


@functools.cache
def _clamped_mixer_class() -> type:
    MambaMixer, _ = _megatron()

    class ClampedMambaMixer(MambaMixer):
        """Megatron's MambaMixer (mamba-ssm kernels, Transformer Engine linears) with Nemotron-H's
        dt clamp (``time_step_min``, as HF's NemotronH passes to the same kernel) and ``seq_idx``
        on packed rows for every megatron-core version. Parameters and checkpoints are Megatron's."""

        def __init__(self, *args: Any, dt_limit: tuple[float, float] = (0.0, math.inf), **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))

        def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params: Any = None) -> torch.Tensor:
            # 0.17+ read PackedSeqParams.seq_idx, set only when total_tokens was given: fill it from
            # cu_seqlens as 0.16's mixer does, or documents would leak into each other (zxBCdt: l b d)
            if packed_seq_params is not None and getattr(packed_seq_params, "seq_idx", False) is None:
                seq_idx = seq_idx_from_packed(packed_seq_params, zxBCdt.shape[0], zxBCdt.device)
                packed_seq_params.seq_idx = seq_idx.to(torch.int32)
            with _dt_limited(self.dt_limit):
                return super()._ssm_training(zxBCdt, packed_seq_params)

        def _ssm_prefill(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            with _dt_limited(self.dt_limit):  # the unfused path (use_mamba_mem_eff_path: false)
                return super()._ssm_prefill(*args, **kwargs)

    return ClampedMambaMixer


def te_stack_spec(cfg: HybridConfig):
    """The GPU spec: Megatron's own Transformer Engine hybrid spec (mamba-ssm mixer, fused norms,
    grouped-GEMM experts), with Nemotron-H's conv / chunk settings and its dt clamp
    (:class:`ClampedMambaMixer`) in the mixer."""
    from dataclasses import replace

    try:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as stock
    except ImportError:
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec as stock
    # new spec objects along the path to the mixer; Megatron's module-level spec stays untouched
    layer = stock.submodules.mamba_layer
    mixer = replace(layer.submodules.mixer, module=_clamped_mixer_class(), params={
        **(layer.submodules.mixer.params or {}), **mixer_params(cfg), "dt_limit": (cfg.time_step_min, math.inf)})
    layer = replace(layer, submodules=replace(layer.submodules, mixer=mixer))
    return replace(stock, submodules=replace(stock.submodules, mamba_layer=layer))


def stack_spec(cfg: HybridConfig, num_experts: int | None, use_te: bool):
    """Megatron's TE spec (``use_te``, see :func:`choose_layer_spec`) or hebtron's local spec."""
    return te_stack_spec(cfg) if use_te else local_stack_spec(cfg, num_experts)
