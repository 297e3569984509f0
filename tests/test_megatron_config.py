"""Megatron backend, no processes: HybridConfig/recipe -> TransformerConfig, parallel-size checks,
preflight planning, version detection and the compat layer's version pin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hebtron.backends.megatron import compat, config_map
from hebtron.backends.megatron.config_map import MoEBalance, ParallelPlan, Precision, transformer_config
from hebtron.backends.megatron.preflight import check_full_size, model_config_for, shrink, tiny_plans
from hebtron.backends.megatron.runtime import check_world
from hebtron.errors import ConfigError, UserError
from hebtron.model.config import HybridConfig
from hebtron.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:megatron.*")
NANO = REPO / "recipes" / "nemotron3-nano"


@pytest.fixture(scope="module")
def nano() -> HybridConfig:
    return HybridConfig.from_json_file(NANO / "config.json")


def test_nano_recipes_encode_the_real_architecture(nano):
    assert nano.hybrid_override_pattern == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    kinds = nano.layer_types
    assert (len(kinds), kinds.count("mamba"), kinds.count("moe"), kinds.count("attention")) == (52, 23, 23, 6)
    assert (nano.hidden_size, nano.vocab_size, nano.n_routed_experts, nano.num_experts_per_tok) == (2688, 131072, 128, 6)
    assert (nano.num_attention_heads, nano.num_key_value_heads, nano.attn_head_dim) == (32, 2, 128)
    assert (nano.mamba_num_heads, nano.mamba_head_dim, nano.ssm_state_size, nano.n_groups) == (64, 64, 128, 8)
    assert (nano.moe_intermediate_size, nano.n_shared_experts, nano.moe_shared_expert_intermediate_size) == (1856, 1, 3712)
    assert nano.router_score_function == "sigmoid" and nano.routed_scaling_factor == 2.5
    assert 31.0e9 < nano.num_parameters() < 32.0e9


def test_nemotron_router_and_parallel_mapping(nano):
    tc = transformer_config(nano, ParallelPlan(tp=2, ep=8, dp=8), Precision("bf16"), MoEBalance(), cpu=True)
    assert tc.num_layers == 52 and tc.hidden_size == 2688 and tc.kv_channels == 128 and tc.num_query_groups == 2
    assert (tc.mamba_num_heads, tc.mamba_head_dim, tc.mamba_state_dim, tc.mamba_num_groups) == (64, 64, 128, 8)
    assert tc.num_moe_experts == 128 and tc.moe_router_topk == 6 and tc.moe_ffn_hidden_size == 1856
    assert tc.moe_shared_expert_intermediate_size == 3712
    assert tc.moe_router_score_function == "sigmoid" and tc.moe_router_enable_expert_bias
    assert tc.moe_router_topk_scaling_factor == 2.5 and tc.moe_router_dtype == "fp32"
    assert tc.moe_router_load_balancing_type == ["seq_aux_loss"] and tc.moe_aux_loss_coeff == [1e-4]
    assert tc.moe_router_bias_update_rate == 1e-3
    assert tc.tensor_model_parallel_size == 2 and tc.expert_model_parallel_size == 8
    assert tc.expert_tensor_parallel_size == 1 and tc.sequence_parallel  # MoE + TP needs SP
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and tc.calculate_per_token_loss
    assert tc.activation_func(torch.tensor([-1.0, 3.0])).tolist() == [0.0, 9.0]  # squared ReLU


def test_recipe_settings_follow_the_moe_and_megatron_sections():
    recipe = load_recipe(NANO / "cpt-h200.yaml", check_paths=False)
    s = config_map.settings_from_recipe(recipe)
    assert s.plan == ParallelPlan(tp=2, ep=8, etp=1, pp=1, cp=1, dp=8, vpp=None, sequence_parallel=True)
    assert s.precision.dtype == "bf16" and s.precision.fp8 == "hybrid"
    assert s.balance.loss_types == ("seq_aux_loss",) and s.balance.bias_update_rate == 1e-3
    sft = config_map.settings_from_recipe(load_recipe(NANO / "sft-b300.yaml", check_paths=False))
    assert sft.balance.bias_update_rate == 0.0 and sft.plan.tp == 1 and sft.plan.ep == 8
    mixed = load_recipe(NANO / "cpt-b300.yaml", ["moe.aux_loss={micro_batch: 0.01, global_batch: 0.001, z: 0.001}"],
                        check_paths=False)
    b = config_map.balance_from_recipe(mixed)
    assert b.loss_types == ("aux_loss", "global_aux_loss") and b.loss_coeffs == (0.01, 0.001) and b.z_loss_coeff == 0.001


def test_softmax_router_and_groups_map_to_megatron_flags():
    base = dict(vocab_size=64, hidden_size=32, hybrid_override_pattern="ME", mamba_num_heads=4, mamba_head_dim=8,
                ssm_state_size=8, n_groups=2, n_routed_experts=8, num_experts_per_tok=4, moe_intermediate_size=16,
                moe_shared_expert_intermediate_size=16)
    soft = transformer_config(HybridConfig(**base, router_score_function="softmax", norm_topk_prob=False), cpu=True)
    assert soft.moe_router_score_function == "softmax" and soft.moe_router_pre_softmax
    assert not soft.moe_router_enable_expert_bias
    grouped = transformer_config(HybridConfig(**base, n_group=4, topk_group=2), cpu=True)
    assert grouped.moe_router_num_groups == 4 and grouped.moe_router_group_topk == 2
    with pytest.raises(ConfigError, match="topk_group"):  # Megatron scores groups by top-(k/groups), not top-2
        transformer_config(HybridConfig(**{**base, "num_experts_per_tok": 2}, n_group=4, topk_group=2), cpu=True)
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        transformer_config(HybridConfig(**base, norm_topk_prob=False), cpu=True)
    with pytest.raises(UserError, match="Transformer Engine"):
        transformer_config(HybridConfig(**base), precision=Precision("bf16", fp8="hybrid"), te=False, cpu=True)


def test_parallel_sizes_get_one_clear_line(nano):
    with pytest.raises(UserError, match=r"^parallel\.tp: tp=3 must divide"):
        config_map.check_divisibility(nano, ParallelPlan(tp=3))
    with pytest.raises(UserError, match=r"parallel\.ep: ep=48 must divide n_routed_experts \(128\)"):
        config_map.check_divisibility(nano, ParallelPlan(ep=48))
    with pytest.raises(UserError, match=r"parallel\.pp: pp=5 must divide the 52 layers"):
        config_map.check_divisibility(nano, ParallelPlan(pp=5))
    with pytest.raises(UserError, match="2 x 4 x 1 x 1 = 8 ranks, but 16 were started"):
        check_world(ParallelPlan(dp=2, tp=4), 16)
    with pytest.raises(UserError, match="ep x expert-tp = 16 x 1 does not fit the 8 ranks"):
        check_world(ParallelPlan(dp=4, tp=2, ep=16), 8)
    check_world(ParallelPlan(dp=4, tp=2, ep=8), 8)


def test_preflight_rejects_a_plan_that_does_not_fit_the_cluster(nano):
    recipe_path = NANO / "cpt-h200.yaml"
    recipe = load_recipe(recipe_path, check_paths=False)
    assert model_config_for(recipe, recipe_path).hybrid_override_pattern == nano.hybrid_override_pattern
    assert check_full_size(recipe, nano, 16, str(recipe_path)).world_size == 16
    with pytest.raises(UserError) as err:
        check_full_size(recipe, nano, 8, str(recipe_path))
    assert str(err.value) == (f"{recipe_path}: parallel: dp x tp x pp x cp = 8 x 2 x 1 x 1 = 16 GPUs, "
                              "but the cluster has 8")
    bad = load_recipe(recipe_path, ["parallel.ep=32"], check_paths=False)
    with pytest.raises(UserError, match="ep x expert-tp = 32 x 1 does not fit"):
        check_full_size(bad, nano, None, str(recipe_path))


def test_preflight_shrinks_keeping_pattern_and_router(nano):
    tiny, reshard = tiny_plans(ParallelPlan(tp=2, ep=8, dp=8))
    assert (tiny.tp, tiny.ep, tiny.dp, tiny.world_size) == (2, 2, 1, 2)
    assert (reshard.tp, reshard.ep, reshard.dp) == (1, 2, 2)
    assert tiny_plans(ParallelPlan(pp=4, dp=2))[0] == ParallelPlan(pp=2, dp=1)
    small = shrink(nano, tiny)
    assert small.hybrid_override_pattern == nano.hybrid_override_pattern
    assert small.router_score_function == "sigmoid" and small.routed_scaling_factor == 2.5
    assert small.num_experts_per_tok == 4 and small.n_routed_experts == 8 and small.n_shared_experts == 1
    assert small.num_parameters() < 2e6
    config_map.check_divisibility(small, tiny)


def test_model_class_detection_matches_the_installed_megatron():
    from hebtron.backends.megatron.model import model_class

    from packaging.version import Version

    cls, spec_arg, pattern_arg = model_class()
    version = Version(compat.installed_version())
    if version < Version("0.17"):
        assert (cls.__name__, spec_arg, pattern_arg) == ("MambaModel", "mamba_stack_spec", "hybrid_override_pattern")
    elif version < Version("0.18"):  # the pattern argument renamed, the class not yet
        assert (cls.__name__, spec_arg, pattern_arg) == ("MambaModel", "mamba_stack_spec", "hybrid_layer_pattern")
    else:  # megatron.core.models.hybrid.hybrid_model (MambaModel is a deprecated wrapper of it)
        assert (cls.__name__, spec_arg, pattern_arg) == ("HybridModel", "hybrid_stack_spec", "hybrid_layer_pattern")
        assert cls.__module__ == "megatron.core.models.hybrid.hybrid_model"


def test_compat_layer_is_pinned_to_the_tested_version(monkeypatch):
    monkeypatch.setattr(compat, "installed_version", lambda: "0.17.0")
    with pytest.raises(UserError, match=f"tested with {compat.TESTED_VERSION}"):
        compat.apply()
    assert not compat.is_applied()


def test_megatron_backend_lifts_the_parallel_restriction():
    demo = REPO / "recipes" / "demo" / "cpt.yaml"
    with pytest.raises(UserError, match="needs backend: megatron"):
        load_recipe(demo, ["parallel.tp=2"], check_paths=False)
    recipe = load_recipe(demo, ["backend=megatron", "parallel.tp=2", "parallel.ep=2"], check_paths=False)
    assert recipe.backend == "megatron" and recipe.parallel.tp == 2


def test_compat_imports_megatron_with_no_compiled_function_and_no_inductor():
    """A fresh process: after ``compat.apply()`` megatron's fused ops are plain functions (the
    math runs eagerly, nothing compiles at first call) and dynamo/inductor were never imported."""
    import subprocess
    import sys

    probe = (
        "import sys, types\n"
        "from hebtron.backends.megatron import compat\n"
        "compat.apply()\n"
        "from megatron.core import jit\n"
        "from megatron.core.fusions import fused_bias_geglu\n"
        "compiled = [f'{n}.{a}' for n, m in list(sys.modules.items()) if n.startswith('megatron.core') and m\n"
        "            for a, v in vars(m).items()\n"
        "            if isinstance(v, types.FunctionType) and hasattr(v, '_torchdynamo_orig_callable')]\n"
        "assert not compiled, compiled\n"
        "assert isinstance(fused_bias_geglu.geglu, types.FunctionType), fused_bias_geglu.geglu\n"
        "assert jit.jit_fuser(len) is len\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules and 'torch._dynamo' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
