"""``hebtron preflight RECIPE``: try a Megatron cluster recipe on a CPU machine before paying for GPUs.

Two stages:

1. **Full size, no compute.** The recipe's real model and parallel plan: ranks against the
   cluster (``dp x tp x pp x cp``, and ``--gpus`` when given), expert parallelism against the
   ranks of a pipeline stage, every size tp / ep / pp must divide, and Megatron's own
   ``TransformerConfig`` validation of the mapped settings. Mistakes here are one-line errors.
2. **Tiny model, real Megatron.** The same layer pattern and router at tiny widths, trained for a
   few steps by 2 CPU processes over gloo at the recipe's tp / ep (or pp) where they fit in 2
   ranks, with packed batches when the recipe is SFT. Checks: shapes against the HF layout,
   finite losses, checkpoint save / resume (bit-exact replay) and reshard to another layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hebtron.backends.megatron.config_map import ParallelPlan, settings_from_recipe
from hebtron.errors import UserError
from hebtron.model.config import HybridConfig

RANKS = 2


@dataclass
class PreflightReport:
    recipe: str
    full_plan: ParallelPlan
    tiny_plan: ParallelPlan
    reshard_plan: ParallelPlan
    checks: list[dict[str, Any]]
    wall_s: float

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def table(self) -> str:
        lines = [f"preflight {self.recipe}", f"  cluster plan: {_fmt(self.full_plan)}",
                 f"  CPU plan ({RANKS} ranks): {_fmt(self.tiny_plan)}; reshard to {_fmt(self.reshard_plan)}"]
        for c in self.checks:
            mark = "FAIL" if not c["ok"] else "warn" if c.get("warning") else "ok"
            lines.append(f"  [{mark}] {c['check']}: {c['detail']}")
        lines.append(f"  {'passed' if self.ok else 'FAILED'} in {self.wall_s:.1f}s")
        return "\n".join(lines)


def _fmt(plan: ParallelPlan) -> str:
    parts = [f"dp={plan.dp}", f"tp={plan.tp}", f"ep={plan.ep}", f"pp={plan.pp}", f"cp={plan.cp}"]
    if plan.tp > 1:
        parts.append(f"etp={plan.expert_tp}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- stage 1
def model_config_for(recipe: Any, recipe_path: Path, model_config: Path | None = None) -> HybridConfig:
    """The recipe's architecture: ``model.init``, else ``hf_path/config.json``, else ``--model-config``
    or a ``config.json`` beside the recipe (cluster checkpoints are not on the laptop)."""
    if recipe.model.init is not None:
        return HybridConfig.from_dict(recipe.model.init, source=f"{recipe_path}: model.init")
    candidates = [model_config] if model_config else []
    candidates += [Path(recipe.model.hf_path) / "config.json", recipe_path.parent / "config.json"]
    for path in candidates:
        if path is not None and path.is_file():
            return HybridConfig.from_json_file(path)
    raise UserError(
        f"{recipe_path}: model.hf_path: {recipe.model.hf_path}/config.json is not on this machine; "
        "pass --model-config CONFIG.json (the checkpoint's config.json)"
    )


def check_full_size(recipe: Any, cfg: HybridConfig, gpus: int | None, where: str) -> ParallelPlan:
    """Stage 1. Returns the cluster plan; raises UserError naming the field on any mismatch."""
    from hebtron.backends.megatron import config_map
    from hebtron.backends.megatron.runtime import check_world

    if recipe.backend != "megatron":
        raise UserError(f"{where}: backend: preflight checks Megatron recipes; got backend: {recipe.backend}")
    settings = settings_from_recipe(recipe)
    plan = settings.plan
    world = plan.world_size
    if gpus is not None and gpus != world:
        raise UserError(
            f"{where}: parallel: dp x tp x pp x cp = {plan.dp} x {plan.tp} x {plan.pp} x {plan.cp} = {world} "
            f"GPUs, but the cluster has {gpus}"
        )
    check_world(plan, world, where=f"{where}: parallel")
    if plan.cp > 1 and plan.tp * plan.cp > world:
        raise UserError(f"{where}: parallel.cp: cp x tp exceeds the {world} GPUs")
    if plan.vpp and plan.vpp > 1:
        from hebtron.backends.megatron.model import model_class

        _, spec_arg, _ = model_class()
        if spec_arg == "mamba_stack_spec":
            raise UserError(
                f"{where}: megatron.virtual_pipeline: megatron-core's MambaModel (this version) has no "
                "interleaved pipeline for hybrid models; remove it"
            )
    try:
        config_map.check_divisibility(cfg, plan)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    check_seq_len(recipe.data.seq_len, plan, where)
    te = False  # validated as far as a CPU can: FP8 needs TE, checked on the cluster
    precision = dataclasses.replace(settings.precision, fp8=None)
    config_map.transformer_config(cfg, plan, precision, settings.balance, te=te, cpu=True)
    return plan


def check_seq_len(seq_len: int, plan: ParallelPlan, where: str) -> None:
    """Sequence parallelism splits every sequence over tp ranks, context parallelism over 2 x cp chunks."""
    split = (plan.tp if plan.tp > 1 else 1) * (2 * plan.cp if plan.cp > 1 else 1)
    if seq_len % split:
        raise UserError(f"{where}: data.seq_len: {seq_len} must be a multiple of {split} (tp x 2cp) for Megatron")


def gpu_warnings(settings: Any, cfg: HybridConfig, distributed_optimizer: bool) -> list[dict[str, Any]]:
    """What the GPU run will do that this CPU preflight cannot: warnings, never failures.

    The Transformer Engine Mamba mixer's dt clamp (checked on the installed megatron-core's
    source), and the speed settings under the field names of the installed megatron-core (the
    cluster's may differ); the CPU run itself turns them off and dispatches with alltoall."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    from hebtron.backends.megatron import config_map
    from hebtron.backends.megatron.specs import dt_clamp_problem

    rows: list[dict[str, Any]] = []
    if "M" in cfg.hybrid_override_pattern:
        problem = dt_clamp_problem()
        rows.append({"check": "GPU Mamba dt clamp", "ok": True, "warning": problem is not None,
                     "detail": f"the Transformer Engine path will NOT clamp dt at time_step_min: {problem}" if problem
                     else f"the Transformer Engine mixer clamps dt at time_step_min = {cfg.time_step_min}, as Nemotron-H"})
    speed = settings.speed
    on = [name for name in ("overlap_grad_reduce", "overlap_param_gather", "gradient_accumulation_fusion",
                            "moe_permute_fusion", "cross_entropy_loss_fusion") if getattr(speed, name)]
    if speed.dispatcher == "flex":
        on.append(f"token_dispatcher flex ({speed.flex_backend}: needs deep_ep on the cluster)")
    if not on:
        return rows
    try:
        config_map.speed_kwargs(speed, config_map.dataclass_fields(TransformerConfig), "E" in cfg.hybrid_override_pattern)
        config_map.ddp_kwargs(speed, distributed_optimizer, config_map.dataclass_fields(DistributedDataParallelConfig))
    except UserError as err:
        rows.append({"check": "GPU speed settings", "ok": True, "warning": True, "detail": str(err)})
        return rows
    rows.append({"check": "GPU speed settings", "ok": True,
                 "detail": f"{', '.join(on)}: fields of this megatron-core; GPU only, off in the CPU run below"})
    return rows


# ----------------------------------------------------------------------------- stage 2
def tiny_plans(plan: ParallelPlan, ranks: int = RANKS) -> tuple[ParallelPlan, ParallelPlan]:
    """The recipe's plan squeezed into ``ranks`` CPU ranks, and a different one to reshard to."""
    if plan.pp > 1:
        return ParallelPlan(pp=ranks, dp=1), ParallelPlan(dp=ranks)
    tp, ep = min(plan.tp, ranks), min(plan.ep, ranks)
    tiny = ParallelPlan(tp=tp, ep=ep, dp=ranks // tp, sequence_parallel=plan.sequence_parallel,
                        etp=1 if ep > 1 else None)
    if tp > 1:
        reshard = ParallelPlan(tp=1, ep=ep, dp=ranks)
    elif ep > 1:
        reshard = ParallelPlan(tp=1, ep=1, dp=ranks)
    else:
        reshard = ParallelPlan(tp=ranks, dp=1, sequence_parallel=True)
    return tiny, reshard


def shrink(cfg: HybridConfig, tiny: ParallelPlan) -> HybridConfig:
    """Same pattern, router kind and ratios at tiny widths (divisible by the tiny plan)."""
    experts = max(8, 4 * tiny.ep) if "E" in cfg.hybrid_override_pattern else cfg.n_routed_experts
    n_group = cfg.n_group if experts % cfg.n_group == 0 and experts // cfg.n_group >= 2 else 1
    topk_group = min(cfg.topk_group, n_group)
    top_k = min(cfg.num_experts_per_tok, experts // 2)
    if n_group > 1 and topk_group < n_group:
        top_k = 2 * topk_group
    data = cfg.to_dict()
    data.update(
        vocab_size=512,
        hidden_size=64,
        mamba_num_heads=8,
        mamba_head_dim=8,
        ssm_state_size=16,
        n_groups=2,
        chunk_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64,
        moe_latent_size=16 if cfg.moe_latent_size else None,
        max_position_embeddings=512,
    )
    return HybridConfig.from_dict(data, source="shrunk model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_preflight(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    gpus: int | None = None,
    model_config: Path | None = None,
    steps: int = 3,
    seq_len: int = 64,
    keep: Path | None = None,
    timeout_s: int = 900,
) -> PreflightReport:
    from hebtron.recipe import load_recipe

    started = time.perf_counter()
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, overrides or [], check_paths=False)
    cfg = model_config_for(recipe, recipe_path, model_config)
    where = str(recipe_path)
    with warnings.catch_warnings():  # megatron-core warns at import about missing GPU extras
        warnings.simplefilter("ignore")
        plan = check_full_size(recipe, cfg, gpus, where)
    checks: list[dict[str, Any]] = [
        {"check": "cluster plan", "ok": True,
         "detail": f"{plan.world_size} GPUs; {cfg.num_hidden_layers} layers {cfg.hybrid_override_pattern}; "
                   f"{cfg.num_parameters() / 1e9:.2f}B parameters; TransformerConfig accepted"},
    ]
    checks += gpu_warnings(settings_from_recipe(recipe), cfg, recipe.megatron.distributed_optimizer)
    if plan.cp > 1:
        checks.append({"check": "context parallel", "ok": True,
                       "detail": f"cp={plan.cp} runs in Transformer Engine attention on GPU; the CPU run uses cp=1"})
    tiny, reshard = tiny_plans(plan)
    small = shrink(cfg, tiny)
    settings = settings_from_recipe(recipe)
    workdir = Path(tempfile.mkdtemp(prefix="hebtron-preflight-")) if keep is None else keep
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": small.to_hf_dict(),
        "plan": dataclasses.asdict(tiny),
        "reshard": dataclasses.asdict(reshard),
        "precision": recipe.train.precision,
        "balance": dataclasses.asdict(settings.balance),
        "distributed_optimizer": recipe.megatron.distributed_optimizer,
        "lr": 1e-3,
        "seed": recipe.train.seed,
        "steps": steps,
        "seq_len": seq_len,
        "micro_batch": min(recipe.train.micro_batch, 2),
        "num_micro": 2,
        "packed": recipe.sft is not None,
        "workdir": str(workdir),
    }
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2, default=str), encoding="utf-8")
    try:
        checks += _run_workers(spec_path, timeout_s)
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return PreflightReport(where, plan, tiny, reshard, checks, time.perf_counter() - started)


def _run_workers(spec_path: Path, timeout_s: int) -> list[dict[str, Any]]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "hebtron.backends.megatron.preflight_worker", str(spec_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return [{"check": "tiny model run", "ok": False, "detail": f"timed out after {timeout_s}s"}]
    result = spec_path.parent / "result.json"
    if proc.returncode == 0 and result.is_file():
        return json.loads(result.read_text(encoding="utf-8"))["checks"]
    return [{"check": "tiny model run", "ok": False, "detail": _failure_line(proc.stdout + proc.stderr)}]


def _failure_line(output: str) -> str:
    """The most telling line of a failed worker (its exception), for the one-line report."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for marker in ("AssertionError:", "Error:", "Exception:"):
        hits = [ln for ln in lines if marker in ln and "ChildFailedError" not in ln]
        if hits:
            return hits[-1].removeprefix("[rank0]: ").removeprefix("[rank1]: ")[:500]
    return (lines[-1] if lines else "no output")[:500]
