"""MoE aux losses and the aux-loss-free bias: hand-computed values, split invariance, 2 ranks, resume."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hebtron.backends.native import NativeBackend
from hebtron.model import HybridConfig, HybridModel
from hebtron.recipe.schema import MoESection
from hebtron.train.balance import update_expert_bias
from hebtron.backends.native_engine import accumulate_gradients
from hebtron.train.engine import split_rows
from hebtron.train.moe_step import MoEStep
from tests.conftest import TINY_CONFIGS

REPO = Path(__file__).resolve().parents[1]
PAD = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_batch(vocab: int, rows: int = 8, seq: int = 12, seed: int = 5) -> dict[str, torch.Tensor]:
    """Hebrew and English rows, a row of unknown language, and trailing padding in some rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, seq + 1), generator=gen)
    lang = torch.tensor([0, 1, 0, -1, 0, 1, 0, 0][:rows]).view(rows, 1).expand(rows, seq + 1).clone()
    for r, pad in enumerate([0, 3, 0, 5, 1, 0, 7, 0][:rows]):
        if pad:
            ids[r, seq + 1 - pad :] = PAD
            lang[r, seq + 1 - pad :] = -1
    loss_mask = (ids[:, 1:] != PAD).long()
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": loss_mask, "lang": lang[:, :-1],
            "position_ids": torch.arange(seq).expand(rows, seq).contiguous()}


def moe_step(model, backend=None, **settings) -> MoEStep:
    return MoEStep(MoESection(**settings), model, backend or NativeBackend(1), PAD)


# ----------------------------------------------------------------- hand-computed formulas
def hand_values(routers, batch) -> dict[str, list[float]]:
    """Every aux loss per layer with plain Python loops, straight from the definitions."""
    ids, lang = batch["input_ids"].tolist(), batch["lang"].tolist()
    rows, seq = len(ids), len(ids[0])
    real = [[not (lang[r][t] == -1 and ids[r][t] == PAD) for t in range(seq)] for r in range(rows)]
    out: dict[str, list[float]] = {"micro_batch": [], "sequence": [], "global_batch": [], "z": []}
    for rec in routers:
        scores, logits, topk = rec.scores.tolist(), rec.logits.tolist(), rec.topk_idx.tolist()
        num_experts, k = len(scores[0]), len(topk[0])

        def balance(tokens: list[int]) -> float:
            if not tokens:
                return 0.0
            total = 0.0
            for i in range(num_experts):
                f = sum(topk[n].count(i) for n in tokens) / (k * len(tokens))
                p = sum(scores[n][i] / sum(scores[n]) for n in tokens) / len(tokens)
                total += f * p
            return num_experts * total

        all_tokens = [r * seq + t for r in range(rows) for t in range(seq) if real[r][t]]
        per_row = [[r * seq + t for t in range(seq) if real[r][t]] for r in range(rows)]
        out["micro_batch"].append(balance(all_tokens))
        out["global_batch"].append(balance(all_tokens))
        out["sequence"].append(sum(balance(t) for t in per_row if t) / sum(1 for t in per_row if t))
        lse = [math.log(sum(math.exp(x) for x in logits[n])) for n in all_tokens]
        out["z"].append(sum(v * v for v in lse) / len(lse))
    return out


@pytest.mark.parametrize("name", ["nano-like", "all-types-grouped"])
def test_every_aux_loss_equals_its_formula(name: str) -> None:
    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**TINY_CONFIGS[name]))
    batch = mixed_batch(model.config.vocab_size)
    with torch.no_grad():
        routers = model(batch["input_ids"], batch["position_ids"]).routers
    expected = hand_values(routers, batch)
    assert len(routers) >= 1 and expected["sequence"][0] > 1.0  # a random router is not balanced per row
    for kind, values in expected.items():
        step = moe_step(model, aux_loss={kind: 0.5})
        step.begin([batch])
        aux = step.micro_batch_loss(routers, batch)
        assert float(aux) == pytest.approx(0.5 * sum(values), rel=1e-5), kind
        logged = step.finish_step(1)["moe_aux"]
        assert logged == {kind: pytest.approx(sum(values) / len(values), rel=1e-5)}


def test_split_does_not_change_sequence_global_and_z_losses() -> None:
    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**TINY_CONFIGS["nano-like"]))
    batch = mixed_batch(model.config.vocab_size)
    tokens = int(batch["loss_mask"].sum())
    logged = {}
    for micro in (8, 4, 1):
        step = moe_step(model, aux_loss={"micro_batch": 1, "sequence": 1, "global_batch": 1, "z": 1},
                        monitor={"interval": 1})
        accumulate_gradients(model, [split_rows(batch, s, s + micro) for s in range(0, 8, micro)], tokens,
                             NativeBackend(1), moe=step)
        model.zero_grad()
        logged[micro] = step.finish_step(1)
    for micro in (4, 1):
        for kind in ("sequence", "global_batch", "z"):
            assert logged[micro]["moe_aux"][kind] == pytest.approx(logged[8]["moe_aux"][kind], rel=1e-6), kind
        assert logged[micro]["router"] == logged[8]["router"]  # counts are exact; entropies sum the same
    # the micro-batch loss is, by definition, what the split changes
    assert logged[1]["moe_aux"]["micro_batch"] != pytest.approx(logged[8]["moe_aux"]["micro_batch"], rel=1e-3)


def test_padding_does_not_change_the_losses() -> None:
    """Extra padded rows (lang -1, pad ids) add nothing to any loss or figure."""
    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**TINY_CONFIGS["nano-like"]))
    batch = mixed_batch(model.config.vocab_size)
    padded = {k: torch.cat([v, torch.full_like(v[:2], -1 if k == "lang" else (0 if k == "loss_mask" else PAD))])
              for k, v in batch.items()}
    padded["position_ids"] = torch.arange(12).expand(10, 12).contiguous()
    out = []
    for b in (batch, padded):
        step = moe_step(model, aux_loss={"sequence": 1, "global_batch": 1, "z": 1}, monitor={"interval": 1})
        accumulate_gradients(model, [b], int(b["loss_mask"].sum()), NativeBackend(1), moe=step)
        model.zero_grad()
        out.append(step.finish_step(1))
    assert out[0]["moe_aux"] == pytest.approx(out[1]["moe_aux"], rel=1e-5)
    for layer, langs in out[0]["router"].items():
        for lang, row in langs.items():
            assert out[1]["router"][layer][lang]["tokens"] == row["tokens"]
            assert out[1]["router"][layer][lang]["load_entropy"] == pytest.approx(row["load_entropy"], abs=1e-6)


# ---------------------------------------------------------------------- aux-loss-free bias
def test_bias_update_rule() -> None:
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 2, 4, 4]), 0.5)  # mean 5
    assert bias.tolist() == [-0.5, 0.5, 0.5, 0.5] and bias.dtype == torch.float32
    update_expert_bias(bias, torch.tensor([5, 5, 5, 5]), 0.5)  # balanced: sign(0) = 0
    assert bias.tolist() == [-0.5, 0.5, 0.5, 0.5]


def test_bias_lowers_load_cv_fivefold_on_a_skewed_router() -> None:
    from hebtron.model.moe import TopKRouter

    config = HybridConfig(**{**TINY_CONFIGS["nano-like"], "n_routed_experts": 16, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    router = TopKRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.1)
        router.weight[:, 0] = torch.linspace(2.0, -2.0, 16)  # a fixed skew toward the first experts
    gen = torch.Generator().manual_seed(1)

    def cv_after(rate: float, steps: int) -> list[float]:
        router.e_score_correction_bias.zero_()
        cvs = []
        for _ in range(steps):
            x = torch.randn(2048, config.hidden_size, generator=gen)
            x[:, 0] = 1.0
            counts = torch.bincount(router(x)[2].flatten(), minlength=16).double()
            cvs.append(float(counts.std(unbiased=False) / counts.mean()))
            update_expert_bias(router.e_score_correction_bias, counts, rate)
        return cvs

    fixed = cv_after(0.0, 10)
    balanced = cv_after(1e-2, 100)
    start, end = balanced[0], sum(balanced[-20:]) / 20
    assert start > 1.0 and min(fixed) > 1.0  # skewed, and it stays so without the bias
    assert end <= start / 5, (start, end)


# ----------------------------------------------------------------------------- two ranks
DP_SCRIPT = r"""
import sys, copy, torch
sys.path.insert(0, sys.argv[2])
from safetensors.torch import save_file
from hebtron.backends.native import NativeBackend
from hebtron.model import HybridConfig, HybridModel
from hebtron.backends.native_engine import accumulate_gradients
from hebtron.train.engine import split_rows
from tests.conftest import TINY_CONFIGS
from tests.test_balance import mixed_batch, moe_step, SETTINGS
torch.manual_seed(0)
base = HybridModel(HybridConfig(**TINY_CONFIGS["nano-like"]))
batch = mixed_batch(base.config.vocab_size)
tokens = int(batch["loss_mask"].sum())
backend = NativeBackend(2)
first = backend.rank * 4
out = {}
# (a) two micro-batches of 2 rows per rank: logged values and expert bias
model = backend.wrap(copy.deepcopy(base))
step = moe_step(model, backend, bias_rate=0.01, **SETTINGS)
accumulate_gradients(model, [split_rows(batch, s, s + 2) for s in (first, first + 2)], tokens, backend, moe=step)
logged = step.finish_step(1)
out["values"] = torch.tensor([logged["moe_aux"][k] for k in ("sequence", "global_batch", "z")], dtype=torch.float64)
out["bias"] = torch.stack([g.e_score_correction_bias for g in step.gates]).contiguous()
out["he_entropy"] = torch.tensor([r["he"]["load_entropy"] for r in logged["router"].values()], dtype=torch.float64)
# (b) one micro-batch of 4 rows per rank: gradients (the global loss sees every rank's counts)
model = backend.wrap(copy.deepcopy(base))
step = moe_step(model, backend, **SETTINGS)
accumulate_gradients(model, [split_rows(batch, first, first + 4)], tokens, backend, moe=step)
grads = {n: p.grad.full_tensor().contiguous() for n, p in model.named_parameters() if p.grad is not None}
if backend.rank == 0:
    save_file({**out, **{"grad." + n: g for n, g in grads.items()}}, sys.argv[1])
else:
    save_file(out, sys.argv[1] + ".rank1")
backend.close()
"""
SETTINGS = {"aux_loss": {"sequence": 0.3, "global_batch": 0.5, "z": 0.1}, "monitor": {"interval": 1}}


@pytest.mark.slow  # torchrun, 2 ranks
def test_two_ranks_match_one_rank(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(script), str(out), str(REPO)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = load_file(out), load_file(str(out) + ".rank1")
    torch.manual_seed(0)
    base = HybridModel(HybridConfig(**TINY_CONFIGS["nano-like"]))
    batch = mixed_batch(base.config.vocab_size)
    tokens = int(batch["loss_mask"].sum())
    model = copy.deepcopy(base)
    step = moe_step(model, bias_rate=0.01, **SETTINGS)
    accumulate_gradients(model, [split_rows(batch, 0, 8)], tokens, NativeBackend(1), moe=step)
    logged = step.finish_step(1)
    values = torch.tensor([logged["moe_aux"][k] for k in ("sequence", "global_batch", "z")], dtype=torch.float64)
    bias = torch.stack([g.e_score_correction_bias for g in step.gates])
    he = torch.tensor([r["he"]["load_entropy"] for r in logged["router"].values()], dtype=torch.float64)
    assert bias.abs().sum() > 0
    for rank in ranks:  # every rank logs the global values and applies the same bias update
        torch.testing.assert_close(rank["values"], values, rtol=1e-6, atol=0)
        torch.testing.assert_close(rank["bias"], bias, rtol=0, atol=0)
        torch.testing.assert_close(rank["he_entropy"], he, rtol=1e-9, atol=1e-9)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ranks[0]["grad." + name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------- resume
def test_resume_restores_bias_alarms_and_monitor_exactly(tmp_path: Path, tmp_path_factory) -> None:
    import yaml

    from hebtron.recipe import load_recipe
    from hebtron.backends.engines import make_trainer
    from hebtron.train.metrics import read_metrics
    from tests.collapse_scenario import shared_fixture
    from tests.train_fixtures import TINY_MODEL, write_recipe

    fixture = shared_fixture(tmp_path_factory)
    path = write_recipe(fixture, tmp_path / "run", total_steps=10, eval_interval=0)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["init"] = {**TINY_MODEL, "hybrid_override_pattern": "M*EME"}
    recipe["checkpoint"] = {"interval": 4, "keep_last": 0}
    recipe["moe"] = {  # a rule that fires every 2nd record: the raised coefficients must survive resume
        "aux_loss": {"sequence": 1e-3, "global_batch": 1e-3, "z": 1e-4}, "bias_rate": 1e-3,
        "monitor": {"interval": 3},
        "alarms": [{"lang": "he", "below": 0.999, "intervals": 2, "min_tokens": 1, "action": "raise_aux",
                    "raise_factor": 3, "max_coeff": 5e-3}],
    }
    path.write_text(yaml.safe_dump(recipe))
    make_trainer(load_recipe(path)).run()
    reference = read_metrics(tmp_path / "run")
    fired = [r for r in reference if "router_alarm" in r]
    assert fired and "raised to" in fired[0]["router_alarm"][0]
    assert reference[-1]["moe_aux_multiplier"]["layer_4"] > 1 and reference[-1]["moe_bias_absmax"]["layer_4"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"  # mid monitor interval, before any alarm
    state = json.loads((ckpt / "trainer_state.json").read_text())["extra"]["moe"]
    assert sum(state["monitor"]["tokens"]) > 0
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000008")
    make_trainer(load_recipe(path), resume=str(ckpt)).run()
    resumed = read_metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for ours, theirs in zip(resumed, reference, strict=True):
        for key in ("loss", "moe_aux", "moe_bias_absmax", "moe_aux_multiplier", "router", "router_load",
                    "router_alarm"):
            assert ours.get(key) == theirs.get(key), (ours["step"], key)


# ------------------------------------------------------------------------------- recipe
@pytest.mark.parametrize(("overrides", "expected"), [
    (["moe.alarms=[{lang: he, below: 0.5, above: 0.9}]"], "moe.alarms[0]: set exactly one of below or above, got both"),
    (["moe.alarms=[{lang: xx, below: 0.5}]"], "moe.alarms[0].lang: unknown language 'xx'"),
    (["moe.aux_loss.sequence=0", "moe.alarms=[{below: 0.5, action: raise_aux, max_coeff: 0.1}]"],
     "moe.alarms[0].action: raise_aux needs a balancing loss"),
    (["moe.alarms=[{below: 0.5, action: raise_aux}]"], "moe.alarms[0].max_coeff: action raise_aux needs max_coeff"),
    (["moe.alarms=[{below: 0.5, action: raise_aux, max_coeff: 1e-4}]"], "max_coeff: must be >= the largest"),
    (["moe.aux_loss.sequence=-1"], "moe.aux_loss.sequence"),
    (["moe.aux_loss.seq=1e-4"], "moe.aux_loss.seq"),
])
def test_moe_recipe_errors_are_one_line(overrides: list[str], expected: str) -> None:
    from hebtron.errors import UserError
    from hebtron.recipe import load_recipe

    with pytest.raises(UserError) as info:
        load_recipe(REPO / "recipes" / "demo" / "cpt.yaml", overrides, check_paths=False)
    message = str(info.value)
    assert "\n" not in message and expected in message, message


def test_monitor_off_with_alarms_is_an_error() -> None:
    from hebtron.errors import UserError
    from hebtron.recipe import load_recipe

    with pytest.raises(UserError, match="alarms need the router monitor"):
        load_recipe(REPO / "recipes" / "demo" / "cpt.yaml", ["moe.monitor.interval=0"], check_paths=False)


def test_router_scores_stay_fp32_under_bf16_autocast() -> None:
    """Routing decisions are taken in fp32 even when the rest of the step runs in bf16: bf16
    logits (8 mantissa bits) would flip near-tied top-k choices and blur the expert bias."""
    from hebtron.model.moe import TopKRouter

    config = HybridConfig(**{**TINY_CONFIGS["nano-like"], "n_routed_experts": 16, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    router = TopKRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    x = torch.randn(512, config.hidden_size, generator=torch.Generator().manual_seed(2))
    reference = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(x)
    assert mixed[0].dtype == torch.float32
    assert torch.equal(mixed[0], reference[0]) and torch.equal(mixed[2], reference[2])
