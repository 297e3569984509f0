"""The per-GPU memory model (``hebtron/train/memory.py``) and ``hebtron preflight --memory``.

Analytic checks of the state accounting, the activation measurement under FakeTensorMode against
real tensors on CPU (it must be exact), the GPU-kernel stand-ins against the layers they stand in
for, and the command on the real Nemotron 3 Nano recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hebtron.backends.megatron import memory as mega
from hebtron.backends.megatron.config_map import ParallelPlan, Precision
from hebtron.cli import main
from hebtron.errors import UserError
from hebtron.model.attention import prepare_documents
from hebtron.model.config import HybridConfig
from hebtron.model.decoder import Block
from hebtron.train import memory as mm
from tests.conftest import TINY_CONFIGS

REPO = Path(__file__).resolve().parents[1]
NANO = REPO / "recipes" / "nemotron3-nano"
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:megatron.*")]
ALL_TYPES = HybridConfig(**TINY_CONFIGS["all-types-grouped"])  # M * - E


@pytest.fixture(scope="module")
def nano() -> HybridConfig:
    return HybridConfig.from_json_file(NANO / "config.json")


# ----------------------------------------------------------------------------- states
def test_nano_parameter_counts_are_the_published_sizes(nano):
    total = mm.total_parameters(nano)
    assert total == nano.num_parameters()  # group by group, as the native modules hold them
    assert 31.5e9 < total < 31.7e9  # "31.6B total"
    assert 3.5e9 < mm.active_parameters(nano) < 3.7e9  # "3.6B active including embeddings"
    assert 3.15e9 < mm.active_parameters(nano, input_embedding=False) < 3.3e9  # "3.2B active"
    groups = mega.stage_groups(nano, ParallelPlan(), 0, distributed_optimizer=True)
    assert sum(g.count for g in groups) == total  # one rank without model parallelism holds everything


@pytest.mark.parametrize("cfg", [ALL_TYPES, HybridConfig(**TINY_CONFIGS["dense-first"])],
                         ids=["all-types", "dense-first"])
def test_parameter_groups_count_every_module_parameter(cfg):
    model_params = sum(p.numel() for i in range(cfg.num_hidden_layers) for p in Block(cfg, i).parameters())
    assert model_params == sum(mm.layer_parameters(cfg, i).total for i in range(cfg.num_hidden_layers))


def _states(cfg: HybridConfig, plan: ParallelPlan, distributed: bool = True) -> mm.Breakdown:
    groups = sum((mega.stage_groups(cfg, plan, s, distributed) for s in range(plan.pp)), ())
    return mm.estimate(mm.MemoryPlan(groups, mega.state_bytes(Precision("bf16")), ()))


def test_optimizer_state_shrinks_as_one_over_dp_with_the_distributed_optimizer(nano):
    small, big = _states(nano, ParallelPlan(tp=2, ep=8, dp=4)), _states(nano, ParallelPlan(tp=2, ep=8, dp=8))
    assert small.row("optimizer state") == pytest.approx(2 * big.row("optimizer state"), rel=1e-12)
    for row in ("weights", "gradients"):  # not sharded by Megatron's distributed optimizer
        assert small.row(row) == big.row(row)
    rep4 = _states(nano, ParallelPlan(tp=2, ep=8, dp=4), distributed=False)
    rep8 = _states(nano, ParallelPlan(tp=2, ep=8, dp=8), distributed=False)
    assert rep4.row("optimizer state") == rep8.row("optimizer state") == 12 * small.row("weights") / 2


def test_states_match_megatron_lm_bytes_per_parameter(nano):
    """theoretical_memory_usage.py: 6 + 12 / dp bytes per parameter (bf16, distributed optimizer),
    18 without it; here with tp = ep = 1, where its formula applies unchanged."""
    total = mm.total_parameters(nano)
    for dp in (1, 4, 16):
        b = _states(nano, ParallelPlan(dp=dp))
        states = b.row("weights") + b.row("gradients") + b.row("optimizer state")
        assert states == pytest.approx(total * (6 + 12 / dp), rel=1e-12)
    b = _states(nano, ParallelPlan(dp=16), distributed=False)
    assert b.row("weights") + b.row("gradients") + b.row("optimizer state") == pytest.approx(18 * total, rel=1e-12)


def test_experts_shard_their_optimizer_over_the_expert_data_parallel_ranks(nano):
    groups = {g.name: g for g in mega.stage_groups(nano, ParallelPlan(tp=2, ep=8, dp=8), 0, True)}
    assert groups["dense"].optimizer_shards == 8 and groups["experts"].optimizer_shards == 2  # 16 / (ep x etp)
    experts = sum(mm.layer_parameters(nano, i).expert for i in range(nano.num_hidden_layers))
    assert groups["experts"].count == experts / 8


# ----------------------------------------------------------------------------- activations
def _kinds(cfg: HybridConfig) -> list[str]:
    return [k for k in mm.LAYER_KINDS if k in cfg.layer_types]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("kernels", mm.KERNELS)
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_fake_measurement_equals_the_saved_tensors_of_a_real_forward(name, kernels, packed):
    cfg = HybridConfig(**TINY_CONFIGS[name])
    for kind in _kinds(cfg):
        for dtype in (torch.bfloat16, torch.float32):
            args = dict(dtype=dtype, kernels=kernels, packed=packed)
            fake = mm.measure_layer(cfg, kind, 2, 37, fake=True, **args)
            real = mm.measure_layer(cfg, kind, 2, 37, fake=False, **args)
            assert fake == real, (kind, dtype)
            assert real.saved > real.input
    assert mm.measure_head(cfg, 2, 37, fake=True) == mm.measure_head(cfg, 2, 37, fake=False)
    assert mm.measure_embedding(cfg, 2, 37, fake=True) == mm.measure_embedding(cfg, 2, 37, fake=False) == 2 * 37 * 8


def test_the_measurement_counts_every_saved_storage_once():
    """An MLP layer in fp32, by hand: what the norm and the two projections keep."""
    cfg = ALL_TYPES
    b, t, h, i = 2, 5, cfg.hidden_size, cfg.intermediate_size
    m = mm.measure_layer(cfg, "mlp", b, t, dtype=torch.float32, kernels="reference", fake=False)
    assert m.routed == 0 and m.input == b * t * h * 4
    # fp32 norm: its input (x.float() is x), rsqrt (one per row), the normalized and the normed output
    assert m.sequence == 3 * b * t * h * 4 + b * t * 4
    assert m.mixer == 2 * b * t * i * 4  # relu output (kept by relu and square), square output (down_proj input)
    fused = mm.measure_layer(cfg, "mlp", b, t, dtype=torch.float32, kernels="megatron-gpu", fake=False)
    assert fused.sequence == 2 * b * t * h * 4  # fused norm keeps its input; up_proj keeps the normed input
    assert fused.mixer == m.mixer


@pytest.mark.slow  # full-width measurements, several seconds on a shared 2-core machine
def test_activations_scale_linearly_with_micro_batch_and_seq_len(nano):
    for kind, kernels in (("mamba", "megatron-gpu"), ("attention", "megatron-gpu"), ("moe", "megatron-gpu"),
                          ("mamba", "reference")):  # the chunked SSD reference keeps (chunk x chunk) decays
        one, two, three = (mm.measure_layer(nano, kind, b, 256, kernels=kernels) for b in (1, 2, 3))
        assert three.saved - two.saved == two.saved - one.saved, kind  # exactly affine in the batch ...
        constant = 2 * one.saved - two.saved  # ... plus per-call copies: the router's fp32 weight, norm weights, masks
        assert 0 <= constant <= nano.n_routed_experts * nano.hidden_size * 4 + 65536, kind
        longer = mm.measure_layer(nano, kind, 1, 512, kernels=kernels)
        assert longer.saved == pytest.approx(2 * one.saved, rel=0.02), kind
        assert longer.input == two.input == 2 * one.input == 512 * nano.hidden_size * 2


def test_full_recompute_keeps_only_the_layer_inputs():
    for kind in _kinds(ALL_TYPES):
        for kernels in mm.KERNELS:
            m = mm.measure_layer(ALL_TYPES, kind, 3, 20, kernels=kernels, recompute=True, fake=False)
            assert m.saved == m.input == 3 * 20 * ALL_TYPES.hidden_size * 2, (kind, kernels)


def test_recompute_in_the_model_keeps_inputs_and_one_working_layer(nano):
    plan = ParallelPlan(tp=2, ep=8, dp=8, sequence_parallel=True)
    measures = mega.Measures.cached(nano, 2, 1024, torch.bfloat16, "megatron-gpu")
    kw = dict(micro_batch=2, micro_batches=1, precision=Precision("bf16"), distributed_optimizer=True,
              measures=measures)
    none = mm.estimate(mega.stage_plan(nano, plan, 0, options=mega.Options(), **kw))
    full_options = mega.Options(recompute=mega.parse_recompute("full"))
    full = mm.estimate(mega.stage_plan(nano, plan, 0, options=full_options, **kw))
    for kind, count in (("mamba", 23), ("moe", 23), ("attention", 6)):
        m = measures.layers[kind]
        assert full.row(f"activations: {kind} x {count}") == pytest.approx(count * m.input / 2)
        assert none.row(f"activations: {kind} x {count}") == pytest.approx(count * m.saved / 2)
    assert full.row("recompute working set") == pytest.approx(measures.layers["moe"].saved / 2)
    assert full.total < none.total
    for row in ("weights", "gradients", "optimizer state"):
        assert full.row(row) == none.row(row)


def test_pipeline_stage_zero_holds_pp_micro_batches(nano):
    measures = mega.Measures.cached(nano, 2, 1024, torch.bfloat16, "megatron-gpu")
    plan = ParallelPlan(tp=2, ep=4, pp=4, dp=2, sequence_parallel=True)
    kw = dict(micro_batch=2, precision=Precision("bf16"), distributed_optimizer=True, measures=measures,
              options=mega.Options())
    first = mega.stage_plan(nano, plan, 0, micro_batches=64, **kw)
    last = mega.stage_plan(nano, plan, 3, micro_batches=64, **kw)
    assert (first.in_flight, last.in_flight) == (4, 1)
    assert mega.stage_plan(nano, plan, 0, micro_batches=2, **kw).in_flight == 2
    assert any(t.name == "output layer + loss" for t in last.activations)
    assert not any(t.name == "output layer + loss" for t in first.activations)


def _block(cfg: HybridConfig, kind: str) -> Block:
    torch.manual_seed(0)
    block = Block(cfg, cfg.layer_types.index(kind))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return block


@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_megatron_gpu_stand_ins_compute_the_same_function(packed):
    """The stand-ins only change what is kept for backward: outputs and gradients are the layer's."""
    cfg = ALL_TYPES
    seq_idx = (torch.arange(24) >= 9).long().expand(2, 24) if packed else None
    for kind in _kinds(cfg):
        block = _block(cfg, kind)
        documents = prepare_documents(seq_idx, "dense") if kind == "attention" and packed else None
        x = torch.randn(2, 24, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
        results = []
        for stand_in in (False, True):
            block.zero_grad()
            xi = x.clone().requires_grad_(True)
            with mm.megatron_gpu_kernels(block) if stand_in else torch.enable_grad():
                out, _ = block(xi, seq_idx, documents)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()
                                                    if p.grad is not None}))
        (o0, g0, p0), (o1, g1, p1) = results
        torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6, msg=kind)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6, msg=kind)
        assert p1.keys() == p0.keys(), kind
        for n in p0:
            torch.testing.assert_close(p1[n], p0[n], rtol=1e-4, atol=1e-6, msg=f"{kind} {n}")


def test_output_layer_matches_megatron_lms_formula(nano):
    """theoretical_memory_usage.py counts 4 s b h (1 + V / h) bytes for the output layer and loss (the
    bf16 final-norm input and normed output, the fp32 softmax); hebtron also keeps the int64 labels and
    the fp32 loss mask."""
    for cfg in (nano, ALL_TYPES):
        per_token = 4 * (cfg.hidden_size + cfg.vocab_size) + 8 + 4
        assert mm.measure_head(cfg, 2, 64) == 2 * 64 * per_token + 4  # + nll_loss's scalar total weight


def test_stand_ins_keep_less_than_the_reference_and_match_the_kernels_save_lists(nano):
    b, t = 1, 256
    ref = {k: mm.measure_layer(nano, k, b, t, kernels="reference") for k in ("mamba", "moe")}
    gpu = {k: mm.measure_layer(nano, k, b, t, kernels="megatron-gpu") for k in ("mamba", "moe")}
    h, di = nano.hidden_size, nano.mamba_intermediate_size
    zxbcdt = 2 * di + 2 * nano.n_groups * nano.ssm_state_size + nano.mamba_num_heads
    # block input + normed input, zxbcdt, scan output, gated output, normed output (out_proj input); bf16
    assert gpu["mamba"].saved == b * t * 2 * (2 * h + zxbcdt + 3 * di)
    k, i = nano.num_experts_per_tok, nano.moe_intermediate_size
    # per assignment: expert input, squared-ReLU input/output, weighted fc2 input (bf16) + fp32 prob + indices
    assert gpu["moe"].routed == pytest.approx(b * t * k * (2 * h + 6 * i), rel=0.01)
    for kind in ref:
        assert gpu[kind].saved < ref[kind].saved


# ----------------------------------------------------------------------------- the command
def _memory(capsys, *args: str) -> tuple[int, str]:
    code = main(["preflight", "--memory", *args])
    return code, capsys.readouterr().out


def test_preflight_memory_on_the_h200_recipe_fits_and_prints_the_breakdown(capsys, monkeypatch):
    from hebtron.backends.megatron import preflight

    monkeypatch.setattr(preflight, "_run_workers", lambda *a, **k: pytest.fail("--memory must not train"))
    code, out = _memory(capsys, str(NANO / "cpt-h200.yaml"))
    assert code == 0, out
    for needed in ("weights", "gradients", "optimizer state", "FP8 weight copies", "activations: mamba x 23",
                   "activations: moe x 23", "activations: attention x 6", "activations: output layer + loss",
                   "total", "H200 141 GB", "fits:"):
        assert needed in out, (needed, out)
    code, out = _memory(capsys, str(NANO / "cpt-h200.yaml"), "--json")
    report = json.loads(out)
    assert code == 0 and report["fits"] is True and report["capacity_gb"] == 141
    assert 60 < report["total_gb"] < 141
    assert report["plan"]["tp"] == 2 and report["plan"]["ep"] == 8 and report["micro_batch"] == 2
    assert sum(r["gb"] for r in report["rows"]) == pytest.approx(report["total_gb"], abs=0.01)


def test_preflight_memory_says_what_to_change_when_it_does_not_fit(capsys):
    code, out = _memory(capsys, str(NANO / "cpt-h200.yaml"), "parallel.tp=1", "parallel.ep=1", "train.micro_batch=16")
    assert code == 1
    assert "does not fit" in out.splitlines()[-1]
    code, out = _memory(capsys, str(NANO / "cpt-h200.yaml"), "train.micro_batch=4")
    last = out.splitlines()[-1]
    assert code == 1 and last.startswith("  does not fit:") and "lower train.micro_batch to 2" in last, last


def test_preflight_memory_takes_the_gpu_from_a_profile_or_the_command_line(capsys):
    code, out = _memory(capsys, str(NANO / "cpt-h200.yaml"), "--profile", "hyperpod-b300", "--json")
    assert code == 0 and json.loads(out)["capacity_gb"] == 288 and json.loads(out)["gpu"] == "B300"
    code, out = _memory(capsys, str(NANO / "cpt-h200.yaml"), "--gpu-memory", "40", "--json")
    assert code == 1 and json.loads(out)["fits"] is False
    assert main(["preflight", "--memory", str(NANO / "cpt-h200.yaml"), "--profile", "local"]) == 2
    assert "CPU profile" in capsys.readouterr().err
    assert main(["preflight", "--memory", str(NANO / "cpt-h200.yaml"), "--gpus", "8"]) == 2
    assert mm.gpu_from_text("hyperpod-h200") == ("H200", 141.0) and mm.gpu_from_text("sft-b300") == ("B300", 288.0)
    assert mm.gpu_from_text("cpt") is None and mm.gpu_from_text("gh2000") is None


def test_recompute_and_imbalance_what_ifs_move_the_total(capsys):
    def total(*args: str) -> float:
        _, out = _memory(capsys, str(NANO / "cpt-h200.yaml"), "--json", *args)
        return json.loads(out)["total_gb"]

    base = total()
    assert total("--recompute", "full") < total("--recompute", "moe") < base
    assert total("--moe-imbalance", "2") > base
    assert total("--kernels", "reference") > base
    with pytest.raises(UserError, match="--recompute"):
        mega.parse_recompute("sometimes")
    assert mega.parse_recompute("mamba,moe") == {"mamba", "moe"} and mega.parse_recompute("none") == frozenset()
