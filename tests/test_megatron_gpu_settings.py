"""Megatron backend on GPU, decided on CPU: which layer spec runs (a CUDA run missing Transformer
Engine / mamba-ssm stops with one line unless ``megatron.local_spec``), which speed settings run
and under which megatron-core field names, the optimizer-state checkpoint format and the layouts
it reloads at, the compat layer's refusal rules, and the Nano GPU recipes. No processes: the
decisions are pure functions of the facts they are given."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hebtron.backends.megatron import compat, config_map
from hebtron.backends.megatron.config_map import ParallelPlan, Precision, SpeedSettings, resolve_speed, speed_kwargs
from hebtron.backends.megatron.specs import GPUStack, choose_layer_spec, conv_as_parameters, dt_clamp_problem, probe_gpu_stack
from hebtron.backends.megatron.step import MegatronEngine, check_resume_layout
from hebtron.errors import CheckpointError, UserError
from hebtron.model.config import HybridConfig
from hebtron.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
NANO = REPO / "recipes" / "nemotron3-nano"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:megatron.*")
ALL_ON = SpeedSettings(overlap_grad_reduce=True, overlap_param_gather=True, gradient_accumulation_fusion=True,
                       moe_permute_fusion=True, cross_entropy_loss_fusion=True)
TINY = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="M*E", mamba_num_heads=4, mamba_head_dim=8,
            ssm_state_size=8, n_groups=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    return text


# ----------------------------------------------------------------------------- layer spec
def test_cuda_without_transformer_engine_stops_with_one_line_unless_local_spec(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a fake CUDA device; TE is not installed here
    stack = probe_gpu_stack()
    assert stack.cuda and "transformer_engine" in stack.transformer_engine
    assert stack.mamba_ssm and stack.causal_conv1d  # neither (nor their CUDA extensions) exists here
    with pytest.raises(UserError) as err:
        choose_layer_spec(stack, local_spec=False, mamba=True)
    line = _one_line(err)
    assert "Transformer Engine" in line and "transformer_engine" in line and "mamba_ssm is not installed" in line
    assert "megatron.local_spec: true" in line
    assert choose_layer_spec(stack, local_spec=True, mamba=True) is False  # the fallback, on purpose


def test_the_engine_stops_before_any_process_group_on_a_cuda_machine_without_te(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import torch.distributed as dist

    with pytest.raises(UserError, match="megatron.local_spec: true") as err:
        MegatronEngine(HybridConfig(**TINY))
    _one_line(err)
    assert not dist.is_initialized()  # decided before torch.distributed / Megatron's parallel state


def test_layer_spec_decision_table():
    assert choose_layer_spec(GPUStack(cuda=False), local_spec=False, mamba=True) is False  # CPU: hebtron's specs
    assert choose_layer_spec(GPUStack(cuda=True), local_spec=False, mamba=True) is True  # everything found
    no_conv = GPUStack(cuda=True, causal_conv1d="causal_conv1d has no compiled extension (causal_conv1d_cuda)")
    with pytest.raises(UserError, match=r"causal_conv1d has no compiled extension \(causal_conv1d_cuda\)"):
        choose_layer_spec(no_conv, local_spec=False, mamba=True)
    assert choose_layer_spec(no_conv, local_spec=False, mamba=False) is True  # no Mamba layers: not needed
    with pytest.raises(UserError, match="Transformer Engine for Megatron"):
        choose_layer_spec(GPUStack(cuda=True, transformer_engine="x"), local_spec=False, mamba=False)


def test_probe_imports_nothing_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe_gpu_stack() == GPUStack(cuda=False)


def test_local_spec_recipe_field_reaches_the_settings():
    recipe = load_recipe(NANO / "sft-h200.yaml", ["megatron.local_spec=true", "checkpoint.reshardable=true"],
                         check_paths=False)
    s = config_map.settings_from_recipe(recipe)
    assert s.local_spec and s.reshardable
    default = config_map.settings_from_recipe(load_recipe(NANO / "sft-h200.yaml", check_paths=False))
    assert not default.local_spec and not default.reshardable


# ----------------------------------------------------------------------------- speed settings
def test_nano_gpu_recipes_turn_on_megatron_bridges_settings():
    for name in ("cpt-h200", "cpt-b300", "sft-h200", "sft-b300"):
        speed = config_map.settings_from_recipe(load_recipe(NANO / f"{name}.yaml", check_paths=False)).speed
        assert speed == dataclasses.replace(ALL_ON, dispatcher="alltoall"), name  # flex: an option (commented)
    flex = load_recipe(NANO / "cpt-h200.yaml", ["megatron.token_dispatcher=flex", "megatron.flex_backend=hybridep"],
                       check_paths=False)
    speed = config_map.settings_from_recipe(flex).speed
    assert (speed.dispatcher, speed.flex_backend) == ("flex", "hybridep")


def test_cpu_forces_every_speed_setting_off_with_one_note():
    speed, notes = resolve_speed(ALL_ON, cuda=False, te=False, distributed_optimizer=True, moe=True)
    assert speed == SpeedSettings()
    assert len(notes) == 1 and "forced off on CPU" in notes[0] and "megatron.overlap_grad_reduce" in notes[0]
    assert "megatron.cross_entropy_loss_fusion" in notes[0]
    assert resolve_speed(SpeedSettings(), cuda=False, te=False, distributed_optimizer=True, moe=True) == (SpeedSettings(), ())


def test_gpu_keeps_them_and_local_spec_drops_only_the_te_fusions():
    assert resolve_speed(ALL_ON, cuda=True, te=True, distributed_optimizer=True, moe=True) == (ALL_ON, ())
    speed, notes = resolve_speed(ALL_ON, cuda=True, te=False, distributed_optimizer=True, moe=True)
    assert not speed.gradient_accumulation_fusion and not speed.moe_permute_fusion
    assert speed.overlap_grad_reduce and speed.overlap_param_gather and speed.cross_entropy_loss_fusion
    assert len(notes) == 1 and "megatron.local_spec" in notes[0]


def test_flex_dispatcher_needs_cuda_and_deepep():
    flex = SpeedSettings(dispatcher="flex")
    with pytest.raises(UserError, match="flex .* runs on CUDA GPUs only") as err:
        resolve_speed(flex, cuda=False, te=False, distributed_optimizer=True, moe=True)
    _one_line(err)
    with pytest.raises(UserError, match="needs DeepEP"):
        resolve_speed(flex, cuda=True, te=True, distributed_optimizer=True, moe=True, importable=lambda _: False)
    assert resolve_speed(flex, cuda=True, te=True, distributed_optimizer=True, moe=True,
                         importable=lambda name: name == "deep_ep")[0] == flex
    assert resolve_speed(flex, cuda=False, te=False, distributed_optimizer=True, moe=False)[0] == flex  # no MoE: unused


def test_param_gather_overlap_needs_the_distributed_optimizer_and_grad_overlap():
    with pytest.raises(UserError, match="megatron.distributed_optimizer: true"):
        resolve_speed(ALL_ON, cuda=True, te=True, distributed_optimizer=False, moe=True)
    with pytest.raises(UserError, match="overlap_param_gather: needs overlap_grad_reduce: true"):
        load_recipe(NANO / "cpt-h200.yaml", ["megatron.overlap_grad_reduce=false"], check_paths=False)
    with pytest.raises(UserError, match="overlap_param_gather: needs distributed_optimizer: true"):
        load_recipe(NANO / "cpt-h200.yaml", ["megatron.distributed_optimizer=false"], check_paths=False)


def test_speed_settings_map_to_the_fields_the_installed_version_has():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    fields = config_map.dataclass_fields(TransformerConfig)
    flex = dataclasses.replace(ALL_ON, dispatcher="flex", flex_backend="hybridep")
    assert speed_kwargs(flex, fields, moe=True) == {
        "gradient_accumulation_fusion": True, "cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "native",
        "moe_permute_fusion": True, "moe_flex_dispatcher_backend": "hybridep"}
    assert speed_kwargs(flex, fields, moe=False) == {
        "gradient_accumulation_fusion": True, "cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "native"}
    # a version that only had the DeepEP switch, and one without the permute fusion
    older = frozenset({"gradient_accumulation_fusion", "cross_entropy_loss_fusion", "moe_enable_deepep"})
    deepep = speed_kwargs(dataclasses.replace(flex, flex_backend="deepep", moe_permute_fusion=False), older, moe=True)
    assert deepep["moe_enable_deepep"] is True and "moe_flex_dispatcher_backend" not in deepep
    with pytest.raises(UserError, match="megatron.flex_backend: this megatron-core has no TransformerConfig.moe_flex"):
        speed_kwargs(dataclasses.replace(flex, moe_permute_fusion=False), older, moe=True)
    with pytest.raises(UserError, match="megatron.moe_permute_fusion: this megatron-core has no"):
        speed_kwargs(flex, older, moe=True)
    ddp_fields = config_map.dataclass_fields(DistributedDataParallelConfig)
    assert config_map.ddp_kwargs(ALL_ON, True, ddp_fields) == {
        "grad_reduce_in_fp32": True, "use_distributed_optimizer": True, "overlap_grad_reduce": True,
        "overlap_param_gather": True}
    assert config_map.ddp_kwargs(SpeedSettings(), False, ddp_fields)["overlap_grad_reduce"] is False
    with pytest.raises(UserError, match="no DistributedDataParallelConfig.overlap_param_gather"):
        config_map.ddp_kwargs(ALL_ON, True, frozenset({"grad_reduce_in_fp32", "overlap_grad_reduce"}))


def test_nano_transformer_config_carries_the_gpu_settings():
    nano = HybridConfig.from_json_file(NANO / "config.json")
    gpu = dataclasses.replace(ALL_ON, moe_permute_fusion=False)  # Megatron checks TE's permute kernels at config time
    tc = config_map.transformer_config(nano, ParallelPlan(tp=2, ep=8, dp=8), Precision("bf16"), cpu=True, speed=gpu)
    assert tc.gradient_accumulation_fusion and tc.cross_entropy_loss_fusion and tc.cross_entropy_fusion_impl == "native"
    flex = dataclasses.replace(gpu, dispatcher="flex", flex_backend="hybridep")
    tc = config_map.transformer_config(nano, ParallelPlan(tp=2, ep=8, dp=8), Precision("bf16"), cpu=True, speed=flex)
    assert tc.moe_token_dispatcher_type == "flex" and tc.moe_flex_dispatcher_backend == "hybridep"
    off = config_map.transformer_config(nano, ParallelPlan(tp=2, ep=8, dp=8), Precision("bf16"), cpu=True)
    assert not off.gradient_accumulation_fusion and not off.cross_entropy_loss_fusion
    assert off.moe_token_dispatcher_type == "alltoall"


# ----------------------------------------------------------------------------- checkpoints
LAYOUT = {"tp": 2, "pp": 1, "vpp": None, "cp": 1, "ep": 1, "etp": 2, "dp": 1, "distributed_optimizer": True}


def _meta(sharding: str, **layout) -> dict:
    return {"distrib_optim_sharding_type": sharding, "hebtron_layout": {**LAYOUT, **layout}}


def test_dp_reshardable_optimizer_state_reloads_only_at_its_model_parallel_layout():
    check_resume_layout(_meta("dp_reshardable"), LAYOUT, "ckpt")
    check_resume_layout(_meta("dp_reshardable"), {**LAYOUT, "dp": 4}, "ckpt")  # Megatron reshards dp
    with pytest.raises(CheckpointError) as err:
        check_resume_layout(_meta("dp_reshardable"), {**LAYOUT, "tp": 1, "etp": 1, "dp": 2}, "ckpt/megatron")
    line = _one_line(err)
    assert line.startswith("ckpt/megatron: the optimizer state is dp_reshardable, saved at tp=2 etp=2")
    assert "this run: tp=1 etp=1" in line and "checkpoint.reshardable: true" in line
    with pytest.raises(CheckpointError, match="saved at ep=1"):
        check_resume_layout(_meta("dp_reshardable"), {**LAYOUT, "ep": 2}, "ckpt")
    # fully reshardable, and checkpoints from before the metadata existed (they were fully reshardable)
    check_resume_layout(_meta("fully_reshardable"), {**LAYOUT, "tp": 1, "ep": 2, "pp": 2}, "ckpt")
    check_resume_layout(None, {**LAYOUT, "tp": 1}, "ckpt")
    check_resume_layout({"distrib_optim_sharding_type": "dp_reshardable"}, {**LAYOUT, "tp": 1}, "ckpt")
    with pytest.raises(CheckpointError, match="saved with megatron.distributed_optimizer: true"):
        check_resume_layout(_meta("fully_reshardable"), {**LAYOUT, "distributed_optimizer": False}, "ckpt")


def test_megatron_core_names_the_checkpoint_format_as_hebtron_writes_it():
    import inspect

    from megatron.core.dist_checkpointing import serialization
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from hebtron.backends.megatron import step

    source = inspect.getsource(DistributedOptimizer.sharded_state_dict)
    assert f"'{step.SHARDING_KEY}'" in source
    assert f"'{step.DP_RESHARDABLE}'" in source and f"'{step.FULLY_RESHARDABLE}'" in source
    assert serialization._CONTENT_METADATA_KEY == step.CONTENT_METADATA


# ----------------------------------------------------------------------------- versions
def test_compat_refuses_cuda_and_other_versions_with_one_line(monkeypatch):
    assert compat.refusal(False, compat.TESTED_VERSION) is None
    cuda = compat.refusal(True, compat.TESTED_VERSION)
    assert "CUDA is available" in cuda and "never patches" in cuda and "\n" not in cuda
    other = compat.refusal(False, "0.19.2")
    assert other.startswith("megatron-core 0.19.2 is installed") and f"tested with {compat.TESTED_VERSION}" in other
    if not compat.is_applied():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(UserError, match="CUDA is available"):
            compat.apply()
        assert not compat.is_applied()


def test_gpu_mixer_clamps_dt_with_the_installed_megatron_core():
    assert dt_clamp_problem() is None  # MambaMixer._ssm_training calls the fused kernel by name
    from packaging.version import Version

    # 0.19 holds the Mamba conv as parameters conv1d_weight / conv1d_bias, 0.16-0.18 as an nn.Conv1d
    assert conv_as_parameters() is (Version(compat.installed_version()) >= Version("0.19"))


def test_preflight_reports_the_gpu_path_as_warnings_only(monkeypatch):
    from hebtron.backends.megatron import preflight, specs

    nano = HybridConfig.from_json_file(NANO / "config.json")
    settings = config_map.settings_from_recipe(load_recipe(NANO / "cpt-h200.yaml", check_paths=False))
    rows = {r["check"]: r for r in preflight.gpu_warnings(settings, nano, distributed_optimizer=True)}
    assert rows["GPU Mamba dt clamp"]["ok"] and not rows["GPU Mamba dt clamp"]["warning"]
    assert "time_step_min" in rows["GPU Mamba dt clamp"]["detail"]
    speed = rows["GPU speed settings"]
    assert speed["ok"] and "overlap_grad_reduce" in speed["detail"] and "off in the CPU run" in speed["detail"]
    monkeypatch.setattr(specs, "dt_clamp_problem", lambda: "MambaMixer._ssm_training no longer calls it")
    rows = {r["check"]: r for r in preflight.gpu_warnings(settings, nano, distributed_optimizer=True)}
    assert rows["GPU Mamba dt clamp"]["ok"] and rows["GPU Mamba dt clamp"]["warning"]  # a warning, not a failure
    assert "will NOT clamp dt" in rows["GPU Mamba dt clamp"]["detail"]
    report = preflight.PreflightReport("r.yaml", settings.plan, settings.plan, settings.plan,
                                       list(rows.values()), 1.0)
    assert report.ok and "[warn] GPU Mamba dt clamp" in report.table()
