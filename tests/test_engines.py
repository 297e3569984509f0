"""One :class:`Trainer` over both engines, and the step guard deciding before the update.

Each engine runs in a fresh process (Megatron patches itself for CPU and keeps global parallel
state): the trainer for ``backend: native`` and ``backend: megatron`` is the same class, and a
step whose guard says "skip" leaves every weight bit-identical, while the next, allowed step
changes them (so the check can fail). The guard sees the step's own global loss and gradient
norm: the ones the step then reports. The same process then poisons a weight with inf: each
non-finite step is skipped before the update, and the third in a row aborts the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # fresh processes, torchrun, Megatron imports

# One process (or torchrun rank) per engine. With GUARD_STEPS=1 it first drives two steps through
# engine.train_step with a guard that refuses, then allows; then, for every run, it poisons a norm
# weight with inf and runs the trainer until the NaN guard aborts. Each rank writes its JSON.
WORKER = r"""
import json, os, sys
from pathlib import Path
import torch
from hebtron.backends.engines import make_trainer
from hebtron.recipe import load_recipe
from hebtron.train.engine import StepPlan, split_rows
from hebtron.train.guards import TrainingAborted
from hebtron.train.loop import Trainer

trainer = make_trainer(load_recipe(sys.argv[1], sys.argv[2:]))
engine = trainer.engine
modules = engine.engine.modules if hasattr(engine, "engine") else [engine.model]
params = [(n, p) for m in modules for n, p in m.named_parameters()]

def weights():
    return [p.detach().clone() for _, p in params]

def step(number, skip):
    seen = []
    def guard(loss, grad_norm):
        seen.append((loss, grad_norm))
        return skip
    rows = trainer.data.next_batch(8, engine.dp_rank, engine.dp_size)
    micro = [split_rows(rows, s, s + 4) for s in range(0, rows["input_ids"].shape[0], 4)]
    before = weights()
    result = engine.train_step(StepPlan(micro, 1e-2, number, trainer.pad_id, False, guard))
    same = all(torch.equal(a, b) for a, b in zip(before, weights(), strict=True))
    return {"same": same, "skipped": result.skipped, "seen": seen, "loss": result.loss, "norm": result.grad_norm}

out = {"trainer": type(trainer) is Trainer, "engine": type(engine).__name__}
if os.environ.get("GUARD_STEPS") == "1":
    out.update(refused=step(1, True), allowed=step(2, False))

name, norm = next((n, p) for n, p in params if "norm" in n and n.endswith("weight"))
with torch.no_grad():
    norm.fill_(float("inf"))  # every forward now gives a non-finite loss and gradient
before = weights()
start = trainer.step
try:
    trainer.run()
    aborted = None
except TrainingAborted as err:
    aborted = str(err)
same = all(torch.equal(a, p.detach()) for a, (_, p) in zip(before, params, strict=True))
out["poison"] = {"poisoned": name, "aborted": aborted, "steps": trainer.step - start,
                 "skipped": trainer.nan_guard.total, "same": same}
rank = engine.ops.rank
trainer.close()
(Path(os.environ["RESULT_DIR"]) / f"rank{rank}.json").write_text(json.dumps(out))  # ranks print at once
"""


def _run_worker(recipe: Path, tmp_path: Path, backend: str, ranks: int, *extra: str, guard_steps: bool) -> list[dict]:
    run = tmp_path / "run"
    args = [str(recipe), f"backend={backend}", "train.nan_guard_max_skips=2", "train.total_steps=6",
            "train.eval_interval=0", f"logging.run_dir={run}", f"checkpoint.dir={run / 'ckpt'}", *extra]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    env = {**_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RESULT_DIR": str(tmp_path),
           "GUARD_STEPS": "1" if guard_steps else "0"}
    proc = subprocess.run([*launch, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


def _assert_poisoned_steps_skipped_then_aborted(results: list[dict]) -> None:
    """Every rank: the same decision, its own weights (inf included) bit-identical, the third
    non-finite step in a row aborts."""
    for out in results:
        poison = out["poison"]
        assert poison["same"], poison
        assert poison["steps"] == 2 and poison["skipped"] == 3, poison  # two skipped steps, the third aborts
        assert poison["aborted"] and "consecutive steps with non-finite" in poison["aborted"], poison


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    fixture = build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")
    return write_recipe(fixture, tmp_path_factory.mktemp("engines") / "run", total_steps=2)


@pytest.mark.parametrize("backend", ["native", "megatron"])
def test_one_trainer_the_guard_decides_before_the_update_and_non_finite_steps_abort(recipe, tmp_path, backend):
    out, = _run_worker(recipe, tmp_path, backend, 1, guard_steps=True)
    assert out["trainer"], out
    assert out["engine"] == {"native": "NativeEngine", "megatron": "MegatronTrainEngine"}[backend]
    refused, allowed = out["refused"], out["allowed"]
    assert refused["skipped"] and refused["same"], refused  # asked before the optimizer stepped
    assert not allowed["skipped"] and not allowed["same"], allowed
    for result in (refused, allowed):
        (loss, norm), = result["seen"]  # asked once, with the numbers the step reports
        assert loss == pytest.approx(result["loss"], rel=1e-12) and norm == pytest.approx(result["norm"], rel=1e-12)
        assert loss > 0 and norm > 0
    _assert_poisoned_steps_skipped_then_aborted([out])


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def test_two_native_ranks_collate_their_own_rows_and_train_like_one(recipe, tmp_path):
    """Each FSDP rank collates only its slice of the global batch (``next_batch(n, rank, 2)``);
    the data order, the global loss-token count and so the losses are those of one process."""
    from hebtron.cli import main as hebtron_main

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["train.total_steps=3", "train.eval_interval=0"]
    assert hebtron_main(["train", str(recipe), *common, f"logging.run_dir={one}", f"checkpoint.dir={one / 'ckpt'}"]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hebtron.cli",
         "train", str(recipe), *common, "parallel.dp=2", f"logging.run_dir={two}", f"checkpoint.dir={two / 'ckpt'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    def losses(run: Path) -> list[tuple[int, float, float]]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [(r["step"], r["loss"], r["loss_tokens"]) for r in rows if "loss" in r]

    a, b = losses(one), losses(two)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3]
    for (_, loss_a, tokens_a), (_, loss_b, tokens_b) in zip(a, b, strict=True):
        assert tokens_a == tokens_b  # the global count, summed over the two ranks' own rows
        assert loss_a == pytest.approx(loss_b, rel=1e-5)


def test_non_finite_steps_are_skipped_on_every_megatron_rank_then_abort(recipe, tmp_path):
    """2 ranks, dp=2 and ep=2: expert shards differ per rank, dense ones are replicas; every rank
    decides alike from the global figures."""
    _assert_poisoned_steps_skipped_then_aborted(
        _run_worker(recipe, tmp_path, "megatron", 2, "parallel.dp=2", "parallel.ep=2", guard_steps=False))
