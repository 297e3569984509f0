"""``hebtron preflight --memory RECIPE``: predicted per-GPU memory of a Megatron recipe, in seconds.

Fills hebtron's shared memory model (:mod:`hebtron.train.memory`) from the recipe's parallel plan:

- **states** per parameter group of one pipeline stage: dense weights split over tp (norms and
  routers replicated), embedding and output layer vocab-parallel over tp, routed experts split over
  ep x expert-tp; bf16 weights (2 B), fp32 main gradients (4 B; the engine reduces gradients in
  fp32), and fp32 master weights + Adam moments (12 B) sharded by the distributed optimizer over the
  dense data-parallel ranks (dp x cp) or, for experts, the expert-data-parallel ranks
  (dp x cp x tp / (ep x expert-tp)). Megatron-LM's own estimate (``theoretical_memory_usage.py``)
  refuses hybrid Mamba models and has no expert parallelism; this is its accounting per group.
  FP8 adds Transformer Engine's FP8 copies of the linear weights (data + transpose, 2 B).
- **activations** measured on one layer of each kind at full width under FakeTensorMode, at the
  recipe's micro_batch x seq_len, then per rank: divided by cp (the sequence is split), the
  mixer part by tp (heads / channels are split), the norm part by tp only under sequence
  parallelism (always on with MoE and tp > 1), the routed-expert part by tp and multiplied by
  ``moe_imbalance`` (the most loaded rank's share of assignments relative to even routing).
  Stage ``s`` of a 1F1B pipeline holds ``min(pp - s, micro-batches)`` micro-batches at once.
  The output layer + loss sits on the last stage: Megatron's vocab-parallel cross-entropy, fused
  (``cross_entropy_loss_fusion``) or not, keeps the fp32 softmax of its vocabulary shard, and the
  bf16 logits gradient is the largest transient in backward. ``moe_permute_fusion`` keeps only
  the row map (the router weights are applied inside the experts), so it changes no figure.

Assumptions: Transformer Engine / mamba-ssm kernels (``megatron-gpu`` stand-ins, see
:mod:`hebtron.train.memory`; ``reference`` with ``megatron.local_spec``); the router's fp32 copy of
its input, as hebtron's router keeps it (Megatron's keeps the bf16 input: +10.8 KB per token per
MoE layer before splitting); FP8 activations counted as bf16; context parallelism splits
activations evenly (its KV exchange is not counted); a fixed reserve for the CUDA context, NCCL and
workspaces. The engine runs without recompute: ``recompute`` is a what-if.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hebtron.backends.megatron.config_map import ParallelPlan, Precision, check_divisibility, settings_from_recipe
from hebtron.errors import UserError
from hebtron.model.config import HybridConfig
from hebtron.train import memory as mm

DEFAULT_RESERVE_GB = 4.0
RECOMPUTE_CHOICES = ("none", "full", *mm.LAYER_KINDS)


def parse_recompute(text: str) -> frozenset[str]:
    """``none`` | ``full`` | a comma list of layer kinds (``moe`` or ``mamba,moe``) -> recomputed kinds."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in RECOMPUTE_CHOICES]
    if bad or not items:
        kinds = ", ".join(mm.LAYER_KINDS)
        raise UserError(f"--recompute: expected none, full or a comma list of {kinds}, got {text!r}")
    if "none" in items:
        return frozenset()
    if "full" in items:
        return frozenset(mm.LAYER_KINDS)
    return frozenset(items)


def _recompute_name(kinds: frozenset[str]) -> str:
    if not kinds:
        return "none"
    return "full" if kinds >= set(mm.LAYER_KINDS) else ",".join(k for k in mm.LAYER_KINDS if k in kinds)


@dataclass(frozen=True)
class Options:
    """What-if settings beyond the recipe (the engine itself runs without recompute today)."""

    kernels: str = "auto"  # megatron-gpu, or reference with megatron.local_spec
    recompute: frozenset[str] = frozenset()
    moe_imbalance: float = 1.0
    reserve_gb: float = DEFAULT_RESERVE_GB


class Measures:
    """Per-layer measurements at one (micro_batch, seq_len), reused for every candidate plan;
    activations are linear in the batch dimension, so other micro-batches scale from these."""

    def __init__(self, cfg: HybridConfig, batch: int, seq_len: int, dtype: torch.dtype, kernels: str,
                 packed: bool = False) -> None:
        self.cfg, self.batch, self.seq_len, self.dtype, self.kernels = cfg, batch, seq_len, dtype, kernels
        started = time.perf_counter()
        kinds = [k for k in mm.LAYER_KINDS if k in cfg.layer_types]
        self.layers = {k: mm.measure_layer(cfg, k, batch, seq_len, dtype=dtype, kernels=kernels, packed=packed)
                       for k in kinds}
        self.head = mm.measure_head(cfg, batch, seq_len, dtype=dtype, kernels=kernels)
        self.embedding = mm.measure_embedding(cfg, batch, seq_len)
        self.wall_s = time.perf_counter() - started

    @classmethod
    def cached(cls, cfg: HybridConfig, batch: int, seq_len: int, dtype: torch.dtype, kernels: str,
               packed: bool = False) -> "Measures":
        """One measurement per configuration and shape in a process (tests and repeated calls)."""
        key = (mm.config_key(cfg), batch, seq_len, str(dtype), kernels, packed)
        if key not in _MEASURED:
            _MEASURED[key] = cls(cfg, batch, seq_len, dtype, kernels, packed)
        return _MEASURED[key]


_MEASURED: dict[tuple[str, int, int, str, str, bool], Measures] = {}


@dataclass
class MemoryReport:
    """The most loaded GPU of one recipe: its breakdown, the verdict and what to change."""

    recipe: str
    plan: ParallelPlan
    micro_batch: int
    seq_len: int
    micro_batches: int
    stage: int
    breakdown: mm.Breakdown
    options: Options
    precision: Precision
    distributed_optimizer: bool
    gpu: str | None = None
    gpu_source: str = ""
    advice: list[str] = field(default_factory=list)
    measures: Measures | None = None
    wall_s: float = 0.0

    @property
    def fits(self) -> bool | None:
        return self.breakdown.fits

    def verdict(self) -> str:
        return self.breakdown.verdict(
            "; ".join(self.advice) or "no single change of micro_batch, ep, tp, pp or recompute fits: use more GPUs")

    def header(self) -> list[str]:
        p, prec = self.plan, self.precision
        sp = _sequence_parallel(p, self.measures.cfg if self.measures else None)
        parts = [f"dp={p.dp} tp={p.tp} ep={p.ep} etp={p.expert_tp} pp={p.pp} cp={p.cp}"]
        parts.append("sequence parallel" if sp else "no sequence parallel")
        parts.append("distributed optimizer" if self.distributed_optimizer else "replicated optimizer")
        precision = prec.dtype + (f" + FP8 {prec.fp8}/{prec.fp8_recipe}" if prec.fp8 else "")
        stage = f"pipeline stage {self.stage} of {p.pp} (the most loaded)" if p.pp > 1 else "one pipeline stage"
        lines = [
            f"preflight --memory {self.recipe} (megatron, per GPU, {stage})",
            f"  plan: {', '.join(parts)}; {precision}",
            f"  micro-batch {self.micro_batch} x {self.seq_len} tokens, {self.micro_batches} per step; recompute: "
            f"{_recompute_name(self.options.recompute)}; kernels: {self.options.kernels}; MoE imbalance "
            f"x{self.options.moe_imbalance:g}",
        ]
        if self.measures is not None:
            per = ", ".join(f"{k} {m.saved / (m.batch * m.seq_len) / 1e3:.1f}" for k, m in self.measures.layers.items())
            lines.append(f"  measured per layer on one device (KB per token, FakeTensorMode, "
                         f"{self.measures.wall_s:.1f}s): {per}; output layer + loss "
                         f"{self.measures.head / (self.measures.batch * self.measures.seq_len) / 1e3:.1f}")
        return lines

    def table(self) -> str:
        b = self.breakdown
        lines = self.header() + [b.table()] + b.gpu_lines(self.gpu, self.gpu_source)
        lines.append(f"  {self.verdict()}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = {
            "recipe": self.recipe,
            "mode": "memory",
            "backend": "megatron",
            "plan": dataclasses.asdict(self.plan) | {"expert_tp": self.plan.expert_tp},
            "stage": self.stage,
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "micro_batches": self.micro_batches,
            "precision": self.precision.dtype,
            "fp8": self.precision.fp8,
            "distributed_optimizer": self.distributed_optimizer,
            "kernels": self.options.kernels,
            "recompute": _recompute_name(self.options.recompute),
            "moe_imbalance": self.options.moe_imbalance,
            "gpu": self.gpu,
            "gpu_source": self.gpu_source,
            **self.breakdown.to_json(),
            "verdict": self.verdict(),
            "advice": self.advice,
            "wall_s": round(self.wall_s, 2),
        }
        if self.measures is not None:
            out["measured"] = {k: mm.as_dict(m) for k, m in self.measures.layers.items()}
            out["measured"]["head"] = self.measures.head
            out["measured"]["embedding"] = self.measures.embedding
        return out


def _sequence_parallel(plan: ParallelPlan, cfg: HybridConfig | None) -> bool:
    """As the engine configures it: on with tp > 1 when asked, and always with MoE and tp > 1."""
    moe = cfg is not None and "E" in cfg.hybrid_override_pattern
    return plan.tp > 1 and (plan.sequence_parallel or moe)


def state_bytes(precision: Precision) -> mm.StateBytes:
    fp8 = 2.0 if precision.fp8 else 0.0
    if precision.dtype == "bf16":
        return mm.StateBytes(2, 4, 12, fp8, "fp32 master weights + Adam m, v")
    return mm.StateBytes(4, 4, 8, fp8, "Adam m, v")


def stage_groups(cfg: HybridConfig, plan: ParallelPlan, stage: int,
                 distributed_optimizer: bool) -> tuple[mm.ParamGroup, ...]:
    """Parameter groups one rank of pipeline stage ``stage`` holds, with their optimizer sharding."""
    per_stage = cfg.num_hidden_layers // plan.pp
    layers = [mm.layer_parameters(cfg, i) for i in range(stage * per_stage, (stage + 1) * per_stage)]
    first, last = stage == 0, stage == plan.pp - 1
    dense = sum(p.split for p in layers) / plan.tp
    replicated = sum(p.replicated for p in layers) + (cfg.hidden_size if last else 0)  # + final norm
    vocab = 0.0
    if first:
        vocab += mm.embedding_parameters(cfg) / plan.tp
    if last and (mm.output_parameters(cfg) or plan.pp > 1):  # tied weights: the last stage keeps a copy
        vocab += mm.embedding_parameters(cfg) / plan.tp
    experts = sum(p.expert for p in layers) / (plan.ep * plan.expert_tp)
    dense_shards = plan.dp * plan.cp if distributed_optimizer else 1
    expert_shards = (plan.dp * plan.cp * plan.tp) // (plan.ep * plan.expert_tp) if distributed_optimizer else 1
    return (
        mm.ParamGroup("dense", dense, optimizer_shards=dense_shards, fp8=True),
        mm.ParamGroup("norms+routers", replicated, optimizer_shards=dense_shards),
        mm.ParamGroup("embedding+output", vocab, optimizer_shards=dense_shards),
        mm.ParamGroup("experts", experts, optimizer_shards=expert_shards, fp8=True),
    )


def stage_plan(cfg: HybridConfig, plan: ParallelPlan, stage: int, *, micro_batch: int, micro_batches: int,
               precision: Precision, distributed_optimizer: bool, options: Options,
               measures: Measures) -> mm.MemoryPlan:
    """The neutral description of one rank of pipeline stage ``stage`` (module docstring)."""
    per_stage = cfg.num_hidden_layers // plan.pp
    kinds = cfg.layer_types[stage * per_stage:(stage + 1) * per_stage]
    sp_split = plan.tp if _sequence_parallel(plan, cfg) else 1
    scale = micro_batch / measures.batch / plan.cp
    terms = []
    if stage == 0:
        terms.append(mm.ActivationTerm("embedding", 1, measures.embedding * scale, measures.embedding * scale,
                                       detail="token ids"))
    for kind in mm.LAYER_KINDS:
        count = kinds.count(kind)
        if not count:
            continue
        m = measures.layers[kind]
        saved = scale * (m.sequence / sp_split + m.mixer / plan.tp + m.routed * options.moe_imbalance / plan.tp)
        kept = scale * m.input / sp_split
        terms.append(mm.ActivationTerm(kind, count, saved, kept, recompute=kind in options.recompute))
    transients: tuple[tuple[str, float], ...] = ()
    if stage == plan.pp - 1:
        head = measures.head * scale / plan.tp
        terms.append(mm.ActivationTerm("output layer + loss", 1, head, head, detail="fp32 softmax of the V/tp shard"))
        tokens = micro_batch * measures.seq_len / plan.cp
        grad = tokens * cfg.vocab_size / plan.tp * (2 if precision.dtype == "bf16" else 4)
        transients = (("logits gradient", grad),)
    return mm.MemoryPlan(
        groups=stage_groups(cfg, plan, stage, distributed_optimizer),
        state=state_bytes(precision),
        activations=tuple(terms),
        in_flight=max(1, min(plan.pp - stage, micro_batches)),
        transients=transients,
        reserve=options.reserve_gb * mm.GB,
    )


def predict(cfg: HybridConfig, plan: ParallelPlan, *, micro_batch: int, global_batch: int, precision: Precision,
            distributed_optimizer: bool, options: Options, measures: Measures,
            capacity: float | None) -> tuple[int, int, mm.Breakdown]:
    """(most loaded stage, micro-batches per step, its breakdown)."""
    micro_batches = max(1, global_batch // (micro_batch * plan.dp))
    best: tuple[int, mm.Breakdown] | None = None
    for stage in range(plan.pp):
        b = mm.estimate(stage_plan(cfg, plan, stage, micro_batch=micro_batch, micro_batches=micro_batches,
                                   precision=precision, distributed_optimizer=distributed_optimizer,
                                   options=options, measures=measures), capacity)
        if best is None or b.total > best[1].total:
            best = (stage, b)
    assert best is not None
    return best[0], micro_batches, best[1]


def valid_plan(cfg: HybridConfig, plan: ParallelPlan, seq_len: int, where: str = "parallel") -> None:
    """The checks of plain preflight that need no Megatron import: ranks, divisibility, seq_len."""
    from hebtron.backends.megatron.preflight import check_seq_len
    from hebtron.backends.megatron.runtime import check_world

    check_world(plan, plan.world_size, where=where)
    try:
        check_divisibility(cfg, plan)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    check_seq_len(seq_len, plan, where)


def _candidates(cfg: HybridConfig, plan: ParallelPlan, micro_batch: int, global_batch: int,
                seq_len: int, options: Options) -> list[tuple[str, ParallelPlan, int, Options]]:
    """Single changes that keep the GPU count, in order of preference (cheapest first)."""
    out: list[tuple[str, ParallelPlan, int, Options]] = []

    def ok(p: ParallelPlan, mb: int) -> bool:
        if global_batch % (mb * p.dp):
            return False
        try:
            valid_plan(cfg, p, seq_len)
        except UserError:
            return False
        return True

    for mb in range(micro_batch - 1, 0, -1):
        if ok(plan, mb):
            out.append((f"lower train.micro_batch to {mb}", plan, mb, options))
    ep = plan.ep * 2
    while "E" in cfg.hybrid_override_pattern and ep <= cfg.n_routed_experts:
        p = dataclasses.replace(plan, ep=ep)
        if ok(p, micro_batch):
            out.append((f"raise parallel.ep to {ep}", p, micro_batch, options))
        ep *= 2
    for field_name in ("tp", "pp"):
        factor = 2
        while plan.dp % factor == 0:
            p = dataclasses.replace(plan, dp=plan.dp // factor, **{field_name: getattr(plan, field_name) * factor})
            if ok(p, micro_batch):
                text = f"raise parallel.{field_name} to {getattr(p, field_name)} (dp {p.dp})"
                out.append((text, p, micro_batch, options))
            factor *= 2
    if options.recompute != frozenset(mm.LAYER_KINDS):
        full = dataclasses.replace(options, recompute=frozenset(mm.LAYER_KINDS))
        out.append(("recompute every layer (full; the Megatron engine has no recipe key for it yet)",
                    plan, micro_batch, full))
    return out


def advise(cfg: HybridConfig, plan: ParallelPlan, *, micro_batch: int, global_batch: int, seq_len: int,
           precision: Precision, distributed_optimizer: bool, options: Options, measures: Measures,
           capacity: float, limit: int = 2) -> list[str]:
    """Up to ``limit`` single changes that fit, each with its predicted total; one per kind of change."""
    found: list[str] = []
    kinds_done: set[str] = set()
    for text, p, mb, opts in _candidates(cfg, plan, micro_batch, global_batch, seq_len, options):
        kind = text.split(" to ")[0].split(" (")[0]
        if kind in kinds_done:
            continue
        _, _, b = predict(cfg, p, micro_batch=mb, global_batch=global_batch, precision=precision,
                          distributed_optimizer=distributed_optimizer, options=opts, measures=measures,
                          capacity=capacity)
        if b.fits:
            found.append(f"{text} ({b.total / mm.GB:.1f} GB)")
            kinds_done.add(kind)
            if len(found) >= limit:
                break
    return found


def memory_report(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    *,
    model_config: Path | None = None,
    gpus: int | None = None,
    capacity_gb: float | None = None,
    gpu: str | None = None,
    gpu_source: str = "",
    options: Options = Options(),
) -> MemoryReport:
    """Load the recipe, check its plan, measure its layers and predict the most loaded GPU."""
    from hebtron.backends.megatron.preflight import model_config_for
    started = time.perf_counter()
    recipe_path = Path(recipe_path)
    recipe, where = mm.recipe_for(recipe_path, overrides, "megatron")
    if options.kernels == "auto":  # hebtron's local specs on CUDA run the PyTorch layers
        kernels = "reference" if getattr(recipe.megatron, "local_spec", False) else "megatron-gpu"
        options = dataclasses.replace(options, kernels=kernels)
    if options.kernels not in mm.KERNELS:
        raise UserError(f"--kernels: expected auto or one of {', '.join(mm.KERNELS)}, got {options.kernels!r}")
    if options.moe_imbalance < 1:
        raise UserError(f"--moe-imbalance: expected >= 1 (1 = even routing), got {options.moe_imbalance:g}")
    cfg = model_config_for(recipe, recipe_path, model_config)
    settings = settings_from_recipe(recipe)
    plan = settings.plan
    if gpus is not None and gpus != plan.world_size:
        raise UserError(
            f"{where}: parallel: dp x tp x pp x cp = {plan.dp} x {plan.tp} x {plan.pp} x {plan.cp} = "
            f"{plan.world_size} GPUs, but the cluster has {gpus}"
        )
    seq_len, micro_batch, global_batch = recipe.data.seq_len, recipe.train.micro_batch, recipe.train.global_batch
    valid_plan(cfg, plan, seq_len, where=f"{where}: parallel")
    dtype = torch.bfloat16 if settings.precision.dtype == "bf16" else torch.float32
    # SFT rows are packed: the Mamba layers also keep the document index (seq_idx)
    measures = Measures.cached(cfg, micro_batch, seq_len, dtype, options.kernels, packed=recipe.sft is not None)
    capacity = None if capacity_gb is None else capacity_gb * mm.GB
    common = dict(global_batch=global_batch, precision=settings.precision,
                  distributed_optimizer=recipe.megatron.distributed_optimizer, measures=measures)
    stage, micro_batches, breakdown = predict(cfg, plan, micro_batch=micro_batch, options=options,
                                              capacity=capacity, **common)
    advice: list[str] = []
    if capacity is not None and not breakdown.fits:
        advice = advise(cfg, plan, micro_batch=micro_batch, seq_len=seq_len, options=options, capacity=capacity,
                        **common)
    return MemoryReport(where, plan, micro_batch, seq_len, micro_batches, stage, breakdown, options,
                        settings.precision, recipe.megatron.distributed_optimizer, gpu, gpu_source, advice,
                        measures, time.perf_counter() - started)
