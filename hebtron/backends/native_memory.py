"""``hebtron preflight --memory`` for native recipes: predicted peak memory of one FSDP2 rank.

Fills the shared memory model (:mod:`hebtron.train.memory`) with FSDP2's sharding over dp:

- **states**: every parameter's master weight (``train.master_weights``, fp32 by default: 4 B) and
  AdamW's two moments (in the master dtype: 8 B) are sharded over the dp ranks; gradients are
  fp32 (``reduce_dtype``) and sharded, except that without ``train.sharded_accumulation`` a step
  of several micro-batches accumulates each parameter's *unsharded* fp32 gradient until the last
  micro-batch's reduce-scatter (FSDP2's ``unsharded_accumulated_grad``): 4 B for every parameter
  on every rank.
- **activations** measured on one layer of each kind at full width under FakeTensorMode, at the
  recipe's micro_batch x seq_len, with the native GPU kernels' save lists (``native-gpu``);
  ``train.activation_checkpointing: full`` keeps each block's input plus one block's working set
  while it is rebuilt. ``selective`` is counted as ``none`` (an upper bound: what it keeps
  depends on the op mix and is not measured here).
- **transients**: FSDP2's unsharded working set: the root's all-gathered weights (embedding,
  final norm, output layer: held from forward through backward), two blocks' all-gathered
  weights (the current one and the prefetched next one) in the compute dtype, and one block's
  unsharded fp32 gradient before its reduce-scatter. The chunked loss keeps no logits; its one
  chunk of fp32 logits and their gradient are counted with the loss.

Assumptions: CUDA context, NCCL and workspaces as a fixed reserve; even routing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hebtron.backends.megatron.memory import Measures
from hebtron.backends.megatron.preflight import model_config_for
from hebtron.errors import UserError
from hebtron.kernels.chunked_ce import default_chunk_size
from hebtron.model.config import HybridConfig
from hebtron.train import memory as mm

KERNELS = "native-gpu"


@dataclass
class NativeMemoryReport:
    recipe: str
    dp: int
    micro_batch: int
    seq_len: int
    micro_batches: int
    precision: str
    master_weights: str
    activation_checkpointing: str
    sharded_accumulation: bool
    breakdown: mm.Breakdown
    measures: Measures
    gpu: str | None = None
    gpu_source: str = ""
    wall_s: float = 0.0

    @property
    def fits(self) -> bool | None:
        return self.breakdown.fits

    def verdict(self) -> str:
        hints = []
        if not self.sharded_accumulation and self.micro_batches > 1:
            hints.append("train.sharded_accumulation: true")
        if self.activation_checkpointing != "full":
            hints.append("train.activation_checkpointing: full")
        hints.append("more dp ranks, a smaller micro_batch, or backend: megatron (tensor / expert parallelism)")
        return self.breakdown.verdict(f"try {'; '.join(hints)}")

    def table(self) -> str:
        m = self.measures
        per = ", ".join(f"{k} {v.saved / (v.batch * v.seq_len) / 1e3:.1f}" for k, v in m.layers.items())
        lines = [
            f"preflight --memory {self.recipe} (native FSDP2, per GPU)",
            f"  plan: dp={self.dp} (FSDP2 over every parameter); precision {self.precision}, master weights "
            f"{self.master_weights}; activation checkpointing {self.activation_checkpointing}; gradient accumulation "
            f"{'sharded' if self.sharded_accumulation else 'unsharded'}",
            f"  micro-batch {self.micro_batch} x {self.seq_len} tokens, {self.micro_batches} per step; kernels: "
            f"{KERNELS}",
            f"  measured per layer on one device (KB per token, FakeTensorMode, {m.wall_s:.1f}s): {per}; "
            f"head + chunked loss {m.head / (m.batch * m.seq_len) / 1e3:.1f}",
            self.breakdown.table(),
            *self.breakdown.gpu_lines(self.gpu, self.gpu_source),
        ]
        lines.append(f"  {self.verdict()}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "mode": "memory", "backend": "native", "dp": self.dp,
            "micro_batch": self.micro_batch, "seq_len": self.seq_len, "micro_batches": self.micro_batches,
            "precision": self.precision, "master_weights": self.master_weights,
            "activation_checkpointing": self.activation_checkpointing,
            "sharded_accumulation": self.sharded_accumulation, "kernels": KERNELS, "gpu": self.gpu,
            "gpu_source": self.gpu_source, **self.breakdown.to_json(), "verdict": self.verdict(),
            "measured": {k: mm.as_dict(v) for k, v in self.measures.layers.items()} | {"head": self.measures.head},
            "wall_s": round(self.wall_s, 2),
        }


def native_plan(cfg: HybridConfig, *, dp: int, micro_batch: int, micro_batches: int, compute_dtype: torch.dtype,
                master_weights: str, activation_checkpointing: str, sharded_accumulation: bool,
                measures: Measures, reserve_gb: float) -> mm.MemoryPlan:
    """One FSDP2 rank in the shared model's terms (module docstring)."""
    master = 2.0 if master_weights == "bf16" else 4.0
    grad_shards = dp if sharded_accumulation or micro_batches == 1 else 1
    groups = (mm.ParamGroup("all", float(mm.total_parameters(cfg)), optimizer_shards=dp, grad_shards=grad_shards,
                            param_shards=dp),)
    state = mm.StateBytes(master, 4.0, 2 * master, describe=f"AdamW m, v in {master_weights}")
    scale = micro_batch / measures.batch
    recompute = activation_checkpointing == "full"
    terms = [mm.ActivationTerm("embedding", 1, measures.embedding * scale, measures.embedding * scale,
                               detail="token ids")]
    for kind in mm.LAYER_KINDS:
        count = cfg.layer_types.count(kind)
        if count:
            m = measures.layers[kind]
            terms.append(mm.ActivationTerm(kind, count, scale * m.saved, scale * m.input, recompute=recompute))
    head = measures.head * scale
    chunk = min(micro_batch * measures.seq_len, default_chunk_size(cfg.vocab_size))
    terms.append(mm.ActivationTerm("output layer + chunked loss", 1, head, head,
                                   detail="hidden states and one log-sum-exp per token"))
    compute = torch.finfo(compute_dtype).bits / 8
    layers = [mm.layer_parameters(cfg, i) for i in range(cfg.num_hidden_layers)]
    biggest = max(p.total for p in layers)
    root = mm.embedding_parameters(cfg) + mm.output_parameters(cfg) + cfg.hidden_size
    working = root * compute + 2 * biggest * compute + biggest * 4 + 2 * chunk * cfg.vocab_size * 4
    transients = (("FSDP2 gathered weights + block gradient", working),)
    return mm.MemoryPlan(groups=groups, state=state, activations=tuple(terms), transients=transients,
                         reserve=reserve_gb * mm.GB)


def native_memory_report(recipe_path: str | Path, overrides: list[str] | None = None, *,
                         model_config: Path | None = None, gpus: int | None = None, capacity_gb: float | None = None,
                         gpu: str | None = None, gpu_source: str = "", reserve_gb: float = 4.0) -> NativeMemoryReport:
    started = time.perf_counter()
    recipe_path = Path(recipe_path)
    recipe, where = mm.recipe_for(recipe_path, overrides, "native")
    train = recipe.train
    dp = recipe.parallel.dp
    if gpus is not None and gpus != dp:
        raise UserError(f"{where}: parallel.dp = {dp} GPUs, but the cluster has {gpus}")
    cfg = model_config_for(recipe, recipe_path, model_config)
    compute = torch.bfloat16 if train.precision == "bf16" else torch.float32
    measures = Measures.cached(cfg, train.micro_batch, recipe.data.seq_len, compute, KERNELS,
                               packed=recipe.sft is not None)
    micro_batches = max(1, train.global_batch // (train.micro_batch * dp))
    plan = native_plan(cfg, dp=dp, micro_batch=train.micro_batch, micro_batches=micro_batches, compute_dtype=compute,
                       master_weights=train.master_weights, activation_checkpointing=train.activation_checkpointing,
                       sharded_accumulation=train.sharded_accumulation, measures=measures, reserve_gb=reserve_gb)
    capacity = None if capacity_gb is None else capacity_gb * mm.GB
    return NativeMemoryReport(where, dp, train.micro_batch, recipe.data.seq_len, micro_batches, train.precision,
                              train.master_weights, train.activation_checkpointing, train.sharded_accumulation,
                              mm.estimate(plan, capacity), measures, gpu, gpu_source,
                              time.perf_counter() - started)

