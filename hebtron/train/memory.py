"""Per-GPU training memory, one model for every backend: states from counts, activations measured.

A backend describes one rank of one run in neutral terms (:class:`MemoryPlan`): parameter groups
with their sharding, bytes per parameter of weights, gradients and optimizer state, activation
bytes per layer kind with the layer counts of the rank's pipeline stage and the recompute choice,
the micro-batches in flight, and short-lived backward peaks. :func:`estimate` turns it into a
table. The Megatron backend fills it from its parallel plan (``hebtron/backends/megatron/memory.py``);
the native backend (FSDP2) fills the same fields with its own sharding.

The formulae (bytes on one GPU):

- weights ``sum_g P_g * b_param / s_param,g``; gradients ``sum_g P_g * b_grad / s_grad,g``;
  optimizer ``sum_g P_g * b_opt / s_opt,g``. ``P_g`` is the group's parameter count on the rank
  after tensor / expert / pipeline splitting; ``s`` are the ranks a group's weights, gradients
  and optimizer state are sharded over. With Megatron's bf16 distributed optimizer this is
  ``P * (2 + 4 + 12 / dp)``, the ``6 + 12 / dp`` bytes per parameter of Megatron-LM's
  ``megatron/training/theoretical_memory_usage.py``, applied per group because the experts are
  sharded over the expert-data-parallel ranks, not the dense ones.
- activations ``in_flight * sum_k n_k * a_k`` where ``a_k`` is what one layer of kind ``k``
  keeps for backward (its input only when recomputed), plus, when any layer is recomputed, the
  largest recomputed layer's ``a_k`` once (it is rebuilt during its backward); ``n_k`` counts the
  layers of the stage and ``in_flight`` the micro-batches a pipeline schedule holds at once.
- the largest transient (e.g. the logits gradient), an allocator slack on activations (5%, the
  overhead factor of Megatron-LM's estimate), and a fixed reserve for the CUDA context, NCCL and
  library workspaces.

The activation bytes ``a_k`` are measured, not guessed: :func:`measure_layer` builds one layer of
hebtron's native model at the real width and runs a forward under ``FakeTensorMode`` (no memory,
no compute), summing the bytes of the distinct storages autograd saves for backward (parameters
excluded). On real tensors the same function gives the same figure (tested), so the fake
measurement is exact for the code it runs. Three kernel sets:

- ``reference``: hebtron's PyTorch layers as they run on CPU (chunked SSD scan, fp32 norms);
- ``megatron-gpu``: the GPU kernels Megatron-Core runs, by stand-ins that compute the same function
  but keep only what the kernel keeps: ``mamba_split_conv1d_scan_combined`` (mamba-ssm) keeps the
  in_proj output and the scan output; Megatron's separate gated norm keeps its gated input; fused
  RMSNorms (Transformer Engine) keep their input; the routed experts run in Megatron's order
  (TEGroupedMLP weights by the router probability before fc2, the unpermute is a scatter-add), so
  they keep the expert input, the squared-ReLU input and output and the weighted fc2 input.
  Attention is already flash-style on CPU (q, k, v, output, log-sum-exp). Still the reference: the
  router's fp32 copy of its input (Megatron's fp32 router GEMM keeps the bf16 one).
- ``native-gpu``: what the native backend runs on CUDA: mamba-ssm's ``mamba_chunk_scan_combined``
  keeps its inputs and output, causal-conv1d keeps its inputs; norms, attention and the
  grouped-GEMM experts as on CPU; the head + loss chunk by chunk (the hidden states and one
  log-sum-exp per token, no logits).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from hebtron.kernels.chunked_ce import chunked_linear_cross_entropy
from hebtron.model import mamba2
from hebtron.model.config import HybridConfig
from hebtron.model.decoder import Block
from hebtron.model.mlp import relu2
from hebtron.model.moe import Experts, MoE
from hebtron.model.norms import RMSNorm
from hebtron.train.loss import token_loss_sum

GB = 1e9  # decimal gigabytes, as GPU memory is quoted (H200: 141 GB)

# Nominal memory per GPU (the vendors' figures, compared in decimal GB). The H200 machines lent here
# are described as about 139 GiB (149 GB), so a verdict against 141 GB is conservative by ~5%.
GPU_MEMORY_GB: dict[str, float] = {"h100": 80.0, "h200": 141.0, "b200": 180.0, "b300": 288.0}

KERNELS = ("megatron-gpu", "reference", "native-gpu")
LAYER_KINDS = ("mamba", "attention", "mlp", "moe")


def gpu_from_text(text: str) -> tuple[str, float] | None:
    """The first known GPU named in ``text`` (a profile name or description, a recipe file name)."""
    for match in re.finditer(r"(?<![a-z0-9])([hb][123]00)(?![0-9])", text.lower()):
        if match.group(1) in GPU_MEMORY_GB:
            return match.group(1).upper(), GPU_MEMORY_GB[match.group(1)]
    return None


# ----------------------------------------------------------------------------- parameter counts
@dataclass(frozen=True)
class LayerParams:
    """Parameters of one layer: ``split`` over tensor-parallel ranks (projections, Mamba heads,
    shared expert), ``replicated`` on every tensor-parallel rank (pre-norm, router), ``expert``
    (routed experts, split over expert-parallel x expert-tensor-parallel ranks)."""

    split: int = 0
    replicated: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.split + self.replicated + self.expert


def layer_parameters(cfg: HybridConfig, index: int) -> LayerParams:
    """Parameter count of layer ``index``, field by field as the native modules hold them."""
    h = cfg.hidden_size
    kind = cfg.layer_types[index]
    if kind == "mamba":
        di, nh, conv = cfg.mamba_intermediate_size, cfg.mamba_num_heads, cfg.mamba_conv_dim
        bias = (di + conv + nh + h) if cfg.use_bias else 0
        split = h * (di + conv + nh) + conv * cfg.conv_kernel + (conv if cfg.use_conv_bias else 0)
        split += 3 * nh + di + di * h + bias  # dt_bias, A_log, D; gated norm; out_proj
        return LayerParams(split=split, replicated=h)
    if kind == "attention":
        hd, bias = cfg.attn_head_dim, cfg.attention_bias
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        split = h * (q + 2 * kv) + q * h + ((q + 2 * kv + h) if bias else 0)
        return LayerParams(split=split, replicated=h)
    if kind == "mlp":
        i = cfg.intermediate_size
        return LayerParams(split=2 * h * i + ((i + h) if cfg.mlp_bias else 0), replicated=h)
    inner = cfg.moe_latent_size or h
    split = 0
    if cfg.n_shared_experts > 0:
        s = cfg.moe_shared_expert_intermediate_size
        split += 2 * h * s + ((s + h) if cfg.mlp_bias else 0)
    if cfg.moe_latent_size:
        split += 2 * h * inner + ((inner + h) if cfg.mlp_bias else 0)
    expert = cfg.n_routed_experts * 2 * inner * cfg.moe_intermediate_size
    return LayerParams(split=split, replicated=h + cfg.n_routed_experts * h, expert=expert)


def embedding_parameters(cfg: HybridConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size


def output_parameters(cfg: HybridConfig) -> int:
    """The LM head's own weights (0 when tied to the embedding)."""
    return 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size


def total_parameters(cfg: HybridConfig) -> int:
    layers = sum(layer_parameters(cfg, i).total for i in range(cfg.num_hidden_layers))
    return layers + embedding_parameters(cfg) + output_parameters(cfg) + cfg.hidden_size  # + final norm


def active_parameters(cfg: HybridConfig, input_embedding: bool = True) -> int:
    """Parameters one token passes through: every dense weight and top-k of the routed experts."""
    routed = sum(layer_parameters(cfg, i).expert for i in range(cfg.num_hidden_layers))
    active = total_parameters(cfg) - routed
    if "E" in cfg.hybrid_override_pattern:
        active += routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return active if input_embedding else active - embedding_parameters(cfg)


def recipe_for(recipe_path: Any, overrides: list[str] | None, backend: str) -> tuple[Any, str]:
    """The recipe ``preflight --memory`` models (input paths unchecked: a laptop has no cluster
    data) and its name for messages; one line if it is for another backend."""
    from hebtron.errors import UserError
    from hebtron.recipe import load_recipe

    where = str(recipe_path)
    recipe = load_recipe(recipe_path, overrides or [], check_paths=False)
    if recipe.backend != backend:
        raise UserError(f"{where}: backend: this memory model is for backend {backend}; got backend: {recipe.backend}")
    return recipe, where


# ----------------------------------------------------------------------------- the neutral model
@dataclass(frozen=True)
class ParamGroup:
    """Parameters one rank holds for one group (``count``, after tp / ep / pp splitting) and the
    ranks its weights, gradients and optimizer state are each sharded over (1: whole copy)."""

    name: str
    count: float
    optimizer_shards: int = 1
    grad_shards: int = 1
    param_shards: int = 1
    fp8: bool = False  # linear weights cast to FP8 (Transformer Engine keeps the FP8 copies)


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter: weight as held for compute, gradient, optimizer state before sharding,
    and the FP8 copies of an FP8 linear weight (0 without FP8)."""

    param: float
    grad: float
    optimizer: float
    fp8_weight: float = 0.0
    describe: str = ""


@dataclass(frozen=True)
class ActivationTerm:
    """``count`` layers that each keep ``saved`` bytes per micro-batch for backward, or ``kept``
    bytes (their input) when ``recompute`` is on."""

    name: str
    count: int
    saved: float
    kept: float
    recompute: bool = False
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    groups: tuple[ParamGroup, ...]
    state: StateBytes
    activations: tuple[ActivationTerm, ...]
    in_flight: int = 1
    transients: tuple[tuple[str, float], ...] = ()
    reserve: float = 0.0
    activation_slack: float = 0.05


@dataclass
class Row:
    component: str
    bytes: float
    detail: str = ""


@dataclass
class Breakdown:
    """The rows of one GPU's memory and the capacity they are judged against."""

    rows: list[Row]
    capacity: float | None = None

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    @property
    def headroom(self) -> float | None:
        return None if self.capacity is None else self.capacity - self.total

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    def verdict(self, advice: str) -> str:
        """One line: the need without a capacity, the headroom when it fits, else ``advice``."""
        if self.capacity is None:
            return f"needs {self.total / GB:.1f} GB per GPU (no GPU memory given: --gpu-memory or --profile)"
        if self.fits:
            return f"fits: {self.total / GB:.1f} GB of {self.capacity / GB:.0f} GB, {self.headroom / GB:.1f} GB headroom"
        return f"does not fit: needs {self.total / GB:.1f} GB of {self.capacity / GB:.0f} GB; {advice}"

    def gpu_lines(self, gpu: str | None, source: str) -> list[str]:
        """The GPU the breakdown is judged against, for the table (none without a capacity)."""
        if self.capacity is None:
            return []
        name = f"{gpu} " if gpu else ""
        return [f"  GPU: {name}{self.capacity / GB:.0f} GB ({source}); headroom {self.headroom / GB:.1f} GB"]

    def row(self, component: str) -> float:
        return sum(r.bytes for r in self.rows if r.component == component)

    def table(self) -> str:
        width = max([len(r.component) for r in self.rows] + [len("total")])
        lines = [f"  {'component':<{width}}  {'GB/GPU':>8}"]
        for r in self.rows:
            lines.append(f"  {r.component:<{width}}  {r.bytes / GB:8.2f}  {r.detail}".rstrip())
        lines.append(f"  {'total':<{width}}  {self.total / GB:8.2f}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": [{"component": r.component, "gb": round(r.bytes / GB, 3), "detail": r.detail} for r in self.rows],
            "total_gb": round(self.total / GB, 3),
            "capacity_gb": None if self.capacity is None else round(self.capacity / GB, 3),
            "headroom_gb": None if self.headroom is None else round(self.headroom / GB, 3),
            "fits": self.fits,
        }


def estimate(plan: MemoryPlan, capacity: float | None = None) -> Breakdown:
    """The per-GPU breakdown of ``plan`` (formulae in the module docstring)."""
    st = plan.state
    params = sum(g.count for g in plan.groups)

    def shard_note(attr: str) -> str:
        parts = [f"{g.name} /{getattr(g, attr)}" for g in plan.groups if g.count and getattr(g, attr) > 1]
        return ("sharded: " + ", ".join(parts)) if parts else "not sharded"

    by_group = ", ".join(f"{g.name} {g.count / 1e9:.2f}B" for g in plan.groups if g.count)
    rows = [
        Row("weights", sum(g.count * st.param / g.param_shards for g in plan.groups),
            f"{params / 1e9:.2f}B parameters x {st.param:g} B ({by_group})"),
        Row("gradients", sum(g.count * st.grad / g.grad_shards for g in plan.groups),
            f"{st.grad:g} B each; {shard_note('grad_shards')}"),
        Row("optimizer state", sum(g.count * st.optimizer / g.optimizer_shards for g in plan.groups),
            f"{st.optimizer:g} B each ({st.describe}); {shard_note('optimizer_shards')}"),
    ]
    fp8 = sum(g.count for g in plan.groups if g.fp8)
    if st.fp8_weight and fp8:
        rows.append(Row("FP8 weight copies", fp8 * st.fp8_weight,
                        f"{fp8 / 1e9:.2f}B linear weights x {st.fp8_weight:g} B"))
    act_total = 0.0
    for term in plan.activations:
        per_layer = term.kept if term.recompute else term.saved
        b = plan.in_flight * term.count * per_layer
        act_total += b
        what = "recomputed, keeps its input" if term.recompute else "saved for backward"
        flight = f" x {plan.in_flight} micro-batches in flight" if plan.in_flight > 1 else ""
        count = f" x {term.count}" if term.count != 1 else ""
        unit = "MB/layer" if term.count != 1 else "MB"
        note = f"; {term.detail}" if term.detail else ""
        rows.append(Row(f"activations: {term.name}{count}", b, f"{per_layer / GB * 1e3:.1f} {unit} {what}{flight}{note}"))
    recomputed = [t for t in plan.activations if t.recompute and t.count]
    if recomputed:
        worst = max(recomputed, key=lambda t: t.saved)
        act_total += worst.saved
        rows.append(Row("recompute working set", worst.saved, f"one {worst.name} layer rebuilt during its backward"))
    if plan.transients:
        name, b = max(plan.transients, key=lambda t: t[1])
        act_total += b
        rows.append(Row(f"backward peak: {name}", b, "largest short-lived tensor on top of the saved activations"))
    if plan.activation_slack:
        rows.append(Row("allocator slack", act_total * plan.activation_slack,
                        f"{plan.activation_slack:.0%} of activations (Megatron-LM's overhead factor)"))
    if plan.reserve:
        rows.append(Row("CUDA context, NCCL, workspaces", plan.reserve, "assumed, not measured"))
    return Breakdown(rows, capacity)


# ----------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class LayerMeasure:
    """Bytes one layer keeps for backward on one device for one (batch, seq_len) micro-batch, by
    where they are saved: ``sequence`` by the pre-norm and as the mixer's input (split over tp
    only with sequence parallelism), ``mixer`` inside the mixer, ``routed`` by the routed experts
    (proportional to the tokens a rank receives); ``input`` is the layer input (what full
    recompute keeps)."""

    kind: str
    batch: int
    seq_len: int
    sequence: int
    mixer: int
    routed: int
    input: int

    @property
    def saved(self) -> int:
        return self.sequence + self.mixer + self.routed


class _Held(torch.autograd.Function):
    """``run(*inputs)`` that keeps only ``inputs`` and ``hold(inputs, output)`` for backward, like a
    fused kernel; backward recomputes ``run`` (params get gradients as in reentrant checkpointing)."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., torch.Tensor], hold: Callable[..., tuple[torch.Tensor, ...]] | None,
                *inputs: torch.Tensor) -> torch.Tensor:
        out = run(*inputs)
        extra = tuple(hold(inputs, out)) if hold is not None else ()
        ctx.run, ctx.n_inputs = run, len(inputs)
        ctx.save_for_backward(*inputs, *extra)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = ctx.saved_tensors[: ctx.n_inputs]
        detached = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        with torch.enable_grad():
            out = ctx.run(*detached)
        torch.autograd.backward(out, grad)
        return (None, None, *[d.grad if d.requires_grad else None for d in detached])


def held(run: Callable[..., torch.Tensor], *inputs: torch.Tensor,
         hold: Callable[..., tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """``run(*inputs)`` keeping only ``inputs`` (+ ``hold(inputs, output)``): a fused kernel's save list."""
    return _Held.apply(run, hold, *inputs)


@contextlib.contextmanager
def megatron_gpu_kernels(block: Block) -> Iterator[None]:
    """Swap ``block``'s norms, Mamba scan and routed experts for stand-ins that compute the same
    function but keep for backward what Megatron's GPU kernels keep (module docstring)."""
    norm_forward = block.norm.forward
    block.norm.forward = lambda x: held(norm_forward, x)  # TE fused RMSNorm: keeps its input (+ rstd)
    calls = [0]
    original = mamba2.conv_and_scan
    patch: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if isinstance(block.mixer, mamba2.Mamba2Mixer):
        signature = inspect.signature(original)
        gated_norm = block.mixer.norm
        gated_forward = gated_norm.forward

        def conv_and_scan(*args: Any, **kwargs: Any) -> torch.Tensor:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            rest = dict(bound.arguments)
            xbc, dt, seq_idx = rest.pop("xbc"), rest.pop("dt"), rest["seq_idx"]
            calls[0] += 1
            extra = (seq_idx,) if seq_idx is not None else ()
            # mamba_split_conv1d_scan_combined keeps zxbcdt (xbc and dt are views of it) and its output.
            return held(lambda x, d, *_: original(x, d, **rest), xbc, dt, *extra, hold=lambda ins, out: (out,))

        def gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            # Megatron gates in the scan kernel, then its RMSNormGated keeps the gated tensor.
            def gate_only(ins: tuple[torch.Tensor, ...], out: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return ((ins[0].float() * F.silu(ins[1].float())).to(ins[0].dtype),)

            return held(gated_forward, x, gate, hold=gate_only)

        gated_norm.forward = gated
        patch = _patched(mamba2, "conv_and_scan", conv_and_scan)
    experts = block.mixer.experts if isinstance(block.mixer, MoE) else None
    if experts is not None:
        experts.forward = lambda x, idx, weight, counts: grouped_mlp(experts, x, idx, weight, counts)
    try:
        with patch:
            yield
        if isinstance(block.mixer, mamba2.Mamba2Mixer) and calls[0] == 0:
            raise RuntimeError("memory measurement: Mamba2Mixer no longer calls mamba2.conv_and_scan; "
                               "update hebtron.train.memory.megatron_gpu_kernels")
    finally:
        block.norm.forward = norm_forward
        if experts is not None:
            del experts.forward  # back to the class's method
        if isinstance(block.mixer, mamba2.Mamba2Mixer):
            block.mixer.norm.forward = gated_forward


@contextlib.contextmanager
def native_gpu_kernels(block: Block) -> Iterator[None]:
    """Swap ``block``'s SSD scan and conv1d for stand-ins that keep what the native backend's GPU
    kernels keep: mamba-ssm's ``mamba_chunk_scan_combined`` its inputs and output, causal-conv1d's
    kernel its inputs (the output is recomputed in its backward). Norms, attention (flash-style)
    and the grouped-GEMM experts run on GPU as they do here."""
    if not isinstance(block.mixer, mamba2.Mamba2Mixer):
        yield
        return
    scan, conv = mamba2.ssd_chunk_scan, mamba2.causal_conv1d

    def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
            **kwargs: Any) -> torch.Tensor:
        extra = (kwargs["seq_idx"],) if kwargs.get("seq_idx") is not None else ()
        return held(lambda x_, dt_, A_, B_, C_, *_: scan(x_, dt_, A_, B_, C_, chunk_size, **kwargs),
                    x, dt, A, B, C, *extra, hold=lambda ins, out: (out,))

    def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        extra = (kwargs["seq_idx"],) if kwargs.get("seq_idx") is not None else ()
        return held(lambda x_, w_, *_: conv(x_, w_, bias, **kwargs), x, weight, *extra)

    with _patched(mamba2, "ssd_chunk_scan", ssd), _patched(mamba2, "causal_conv1d", conv1d):
        yield


def grouped_mlp(experts: Experts, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The routed experts in Megatron-Core's order of operations (alltoall dispatcher, TEGroupedMLP,
    unfused unpermute): permuted tokens -> fc1 -> squared ReLU -> x router prob -> fc2 -> scatter-add.
    Same function as :class:`hebtron.model.moe.Experts` (the weights commute with fc2), keeping
    what Megatron keeps: the expert input, the activation's input and output, the weighted fc2 input."""
    k = topk_idx.shape[1]
    order = topk_idx.reshape(-1).argsort(stable=True)
    token_of = order // k
    permuted = x[token_of]
    probs = topk_weight.reshape(-1)[order, None]
    offsets = tokens_per_expert.cumsum(0, dtype=torch.int32)
    act = relu2(grouped_matmul(permuted, experts.up_proj.transpose(-2, -1), offsets))
    y = grouped_matmul((act * probs).to(x.dtype), experts.down_proj.transpose(-2, -1), offsets)
    index = token_of[:, None].expand(-1, y.shape[1])
    return torch.zeros(x.shape[0], y.shape[1], dtype=y.dtype, device=x.device).scatter_add_(0, index, y)


class _GroupedMatmul(torch.autograd.Function):
    """Rows of ``a`` grouped by ``offsets`` (cumulative ends) times ``b[g]``: what ``F.grouped_mm``
    computes and keeps for backward (both operands and the offsets), as a loop over the groups,
    and shape-only under FakeTensorMode (whose grouped_mm accepts bf16 only)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, offsets)
        out = a.new_empty(a.shape[0], b.shape[-1])
        if not is_fake(a):
            for g, rows in enumerate(_groups(offsets)):
                out[rows] = a[rows] @ b[g]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b, offsets = ctx.saved_tensors
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        for g, rows in enumerate(_groups(offsets)):
            grad_a[rows] = grad[rows] @ b[g].transpose(0, 1)
            grad_b[g] = a[rows].transpose(0, 1) @ grad[rows]
        return grad_a, grad_b, None


def _groups(offsets: torch.Tensor) -> list[slice]:
    ends = offsets.tolist()
    return [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _GroupedMatmul.apply(a, b, offsets)


def _fake_grouped_mm(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``F.grouped_mm`` under FakeTensorMode for the dtypes its fake kernel refuses (not bf16)."""

    def grouped_mm(a: torch.Tensor, b: torch.Tensor, *args: Any, offs: torch.Tensor | None = None,
                   **kwargs: Any) -> torch.Tensor:
        if a.dtype == torch.bfloat16 or offs is None or args or kwargs or a.dim() != 2 or b.dim() != 3:
            return original(a, b, *args, offs=offs, **kwargs)
        return grouped_matmul(a, b, offs)

    return grouped_mm


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


class _SavedBytes:
    """Sums the distinct storages autograd saves while active, excluding ``exclude`` (parameters),
    attributing each to the region (``sequence`` / ``mixer`` / ``routed``) that saved it first."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: dict[int, tuple[str, int]] = {}
        self.region = "mixer"
        self.sequence_keys: set[int] = set()
        self.keep: list[torch.Tensor] = []  # saved tensors stay alive so storages are not reused

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude and key not in self.seen:
            region = "sequence" if key in self.sequence_keys else self.region
            self.seen[key] = (region, storage.nbytes())
            self.keep.append(t)
        return t

    def total(self, region: str | None = None) -> int:
        return sum(n for r, n in self.seen.values() if region is None or r == region)

    def enter(self, region: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.region = region
        return hook

    def leave(self, region: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.region = region
        return hook

    def watch(self, block: Block) -> list[Any]:
        """Hooks that set the region while ``block``'s parts run."""
        handles = [block.norm.register_forward_pre_hook(self.enter("sequence")),
                   block.norm.register_forward_hook(self.leave("mixer"))]

        def mixer_input(module: nn.Module, args: Any) -> None:
            self.sequence_keys.add(args[0].untyped_storage()._cdata)  # the normed input, replicated without SP

        handles.append(block.mixer.register_forward_pre_hook(mixer_input))
        if isinstance(block.mixer, MoE):
            handles += [block.mixer.experts.register_forward_pre_hook(self.enter("routed")),
                        block.mixer.experts.register_forward_hook(self.leave("mixer"))]
        return handles


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}


@contextlib.contextmanager
def _mode(fake: bool) -> Iterator[None]:
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), _patched(F, "grouped_mm", _fake_grouped_mm(F.grouped_mm)):
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (``.to()`` cannot swap fake parameters)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _init(module: nn.Module) -> None:
    """Deterministic finite weights for real-tensor runs (values do not change saved sizes)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _layer_index(cfg: HybridConfig, kind: str) -> int:
    if kind not in cfg.layer_types:
        raise ValueError(f"no {kind} layer in {cfg.hybrid_override_pattern}")
    return cfg.layer_types.index(kind)


def _seq_idx(batch: int, seq_len: int, packed: bool) -> torch.Tensor | None:
    """Two documents per row when packed (document masks and state resets cost memory too)."""
    if not packed:
        return None
    return (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, seq_len).contiguous()


def measure_layer(
    cfg: HybridConfig,
    kind: str,
    batch: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    kernels: str = "megatron-gpu",
    recompute: bool = False,
    packed: bool = False,
    fake: bool = True,
) -> LayerMeasure:
    """Saved-for-backward bytes of one ``kind`` layer (the first of that kind in ``cfg``) at full
    width for a (batch, seq_len) micro-batch on one device. ``recompute`` wraps the layer as full
    recompute does (it keeps its input); ``packed`` puts two documents in every row (the Mamba
    state resets; attention keeps the same tensors either way). ``fake`` runs under FakeTensorMode; ``fake=False`` runs real
    tensors on CPU (the exactness check)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: expected one of {', '.join(KERNELS)}, got {kernels!r}")
    index = _layer_index(cfg, kind)
    with _mode(fake):
        with _default_dtype(dtype):
            block = Block(cfg, index)
        if not fake:
            _init(block)
        counter = _SavedBytes(_storages(block))
        seq_idx = _seq_idx(batch, seq_len, packed)
        gen = None if fake else torch.Generator().manual_seed(1)
        x = torch.randn(batch, seq_len, cfg.hidden_size, generator=gen).to(dtype).requires_grad_(True)
        handles = counter.watch(block)
        kernel_set = {"megatron-gpu": megatron_gpu_kernels, "native-gpu": native_gpu_kernels}.get(
            kernels, lambda _: contextlib.nullcontext())(block)
        try:
            with kernel_set, torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                # Attention gets no document layout: on GPU the flash / varlen / TE THD kernels keep
                # the same q, k, v, output and log-sum-exp with or without document boundaries.
                if recompute:
                    extra = (seq_idx,) if seq_idx is not None else ()
                    held(lambda h, *_: block(h, seq_idx, None)[0], x, *extra)
                else:
                    block(x, seq_idx, None)
        finally:
            for h in handles:
                h.remove()
        input_bytes = x.untyped_storage().nbytes()
    if recompute:
        return LayerMeasure(kind, batch, seq_len, counter.total(), 0, 0, input_bytes)
    return LayerMeasure(kind, batch, seq_len, counter.total("sequence"), counter.total("mixer"),
                        counter.total("routed"), input_bytes)


class _Head(nn.Module):
    """Final norm, output layer and the token loss: ``chunked`` as the native trainer computes it
    (head + cross-entropy chunk by chunk, no full logits), else the full fp32 logits."""

    def __init__(self, cfg: HybridConfig, chunked: bool = False) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.chunked = chunked

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        if self.chunked:
            return chunked_linear_cross_entropy(self.norm(hidden), self.lm_head.weight, labels, loss_mask)
        return token_loss_sum(self.lm_head(self.norm(hidden)).float(), labels, loss_mask)


def measure_head(cfg: HybridConfig, batch: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16,
                 kernels: str = "megatron-gpu", fake: bool = True) -> int:
    """Saved bytes of the final norm, the output layer and the cross-entropy (fp32 log-softmax)."""
    with _mode(fake):
        with _default_dtype(dtype):
            head = _Head(cfg, chunked=kernels == "native-gpu")
        if not fake:
            _init(head)
        counter = _SavedBytes(_storages(head))
        gen = None if fake else torch.Generator().manual_seed(2)
        x = torch.randn(batch, seq_len, cfg.hidden_size, generator=gen).to(dtype).requires_grad_(True)
        labels = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
        mask = torch.ones(batch, seq_len)
        norm_forward = head.norm.forward
        if kernels == "megatron-gpu":
            head.norm.forward = lambda h: held(norm_forward, h)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            head(x, labels, mask)
    return counter.total()


def measure_embedding(cfg: HybridConfig, batch: int, seq_len: int, *, fake: bool = True) -> int:
    """Saved bytes of the embedding lookup (the token ids)."""
    with _mode(fake):
        emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        counter = _SavedBytes(_storages(emb))
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            emb(ids)
    return counter.total()


def config_key(cfg: HybridConfig) -> str:
    """A hashable identity of a config for caching measurements."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def as_dict(measure: LayerMeasure) -> dict[str, Any]:
    return {**asdict(measure), "saved": measure.saved}
