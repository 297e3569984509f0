"""Noise-scale estimator against closed-form answers, batch-size policies and the plan."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from hebtron.recipe.units import parse_ramp
from hebtron.train.batch_size import BatchSizePolicy, NoiseScaleEstimator, lr_scale_for
from hebtron.train.plan import make_plan


def _regression_gradients(delta: torch.Tensor, sigma: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """Per-example gradients of 0.5 (x.w - y)^2 at w = w* + delta, x ~ N(0, I), noise N(0, sigma^2)."""
    x = torch.randn(n, delta.numel(), generator=gen, dtype=torch.float64)
    eps = torch.randn(n, generator=gen, dtype=torch.float64) * sigma
    return x * (x @ delta - eps)[:, None]


def test_estimator_matches_closed_form_noise_scale():
    # G = delta, Sigma = (|delta|^2 + sigma^2) I + delta delta^T  =>  B = (d (|d|^2 + s^2) + |d|^2) / |d|^2
    d, sigma = 10, 1.0
    delta = torch.ones(d, dtype=torch.float64) / math.sqrt(d)
    true_b = (d * (1 + sigma**2) + 1) / 1
    gen = torch.Generator().manual_seed(0)
    est = NoiseScaleEstimator(beta=0.999)  # per-step estimates are heavy-tailed: smooth over ~1000 steps
    b_small, b_big = 16, 64
    for _ in range(4000):
        grads = _regression_gradients(delta, sigma, b_big, gen)
        g_small = grads[:b_small].mean(0)
        g_big = grads.mean(0)
        est.update(float(g_small @ g_small), float(g_big @ g_big), b_small, b_big)
    assert abs(est.b_simple - true_b) / true_b < 0.10
    assert abs(est.g2 - 1.0) < 0.15


def test_unbiased_estimates_are_exact_in_expectation():
    g2, trace = NoiseScaleEstimator.unbiased(g_small_sq=3.0, g_big_sq=1.5, b_small=1, b_big=4)
    # E|G_b|^2 = |G|^2 + tr/b: solving 3 = g + t, 1.5 = g + t/4 gives t = 2, g = 1
    assert g2 == pytest.approx(1.0) and trace == pytest.approx(2.0)


def test_estimator_state_round_trip():
    est = NoiseScaleEstimator(0.9)
    for i in range(5):
        est.update(1.8 + 0.1 * i, 1.5, 2, 8)
    again = NoiseScaleEstimator(0.9)
    again.load_state_dict(json.loads(json.dumps(est.state_dict())))
    assert math.isfinite(est.b_simple) and again.b_simple == est.b_simple and again.updates == 5


def test_a_gradient_spike_is_left_out_of_the_estimate():
    def feed(est, spike_at):
        for i in range(60):
            scale = 4000.0 if i == spike_at else 1.0  # a step with a gradient norm ~63x the usual
            est.update(2.0 * scale, 0.8 * scale, 1, 4)
        return est

    clean, spiked = feed(NoiseScaleEstimator(0.98), None), feed(NoiseScaleEstimator(0.98), 30)
    assert spiked.spikes == 1 and clean.spikes == 0 and spiked.updates == clean.updates - 1
    assert spiked.b_simple == pytest.approx(clean.b_simple) == pytest.approx(4.0)
    unguarded = feed(NoiseScaleEstimator(0.98, spike_factor=1e9), 30)
    assert unguarded.spikes == 0 and abs(unguarded.trace / clean.trace) > 10  # what the guard prevents


def test_lr_scaling_rules():
    assert lr_scale_for(8 * 256, 256, "sqrt") == pytest.approx(math.sqrt(8))  # 8x batch -> ~2.83x LR
    assert lr_scale_for(512, 256, "linear") == 2.0
    assert lr_scale_for(512, 256, "none") == 1.0


def test_steps_policy_follows_ramp():
    policy = BatchSizePolicy("steps", start=8, granularity=8, maximum=32, ramp=parse_ramp("0:8 1k:16 2k:32"))
    sizes = [policy.decide(s, tokens, math.nan, 0) for s, tokens in enumerate([0, 999, 1000, 1999, 2000, 5000])]
    assert sizes == [8, 8, 16, 16, 32, 32]
    with pytest.raises(ValueError, match="first item"):
        parse_ramp("1k:16")


def test_adaptive_policy_is_monotone_rounded_bounded_and_waits():
    policy = BatchSizePolicy("adaptive", start=8, granularity=4, minimum=8, maximum=64, k=1.0, interval=10,
                             warmup_updates=5, max_growth=4.0)
    assert policy.decide(step=20, tokens=0, b_noise_sequences=30.0, estimator_updates=4) == 8  # not warmed up
    assert policy.decide(step=20, tokens=0, b_noise_sequences=30.0, estimator_updates=5) == 28  # rounded down to 4s
    assert policy.decide(step=25, tokens=0, b_noise_sequences=50.0, estimator_updates=9) == 28  # interval not due
    assert policy.decide(step=30, tokens=0, b_noise_sequences=12.0, estimator_updates=9) == 28  # never shrinks
    assert policy.decide(step=40, tokens=0, b_noise_sequences=500.0, estimator_updates=9) == 64  # capped
    assert policy.lr_scale() == pytest.approx(math.sqrt(64 / 8))


def test_adaptive_policy_grows_at_most_max_growth_per_decision():
    policy = BatchSizePolicy("adaptive", start=4, granularity=2, maximum=64, interval=5, warmup_updates=1)
    sizes = [policy.decide(step, 0, 1000.0, 10) for step in range(0, 30, 5)]
    assert sizes == [4, 8, 16, 32, 64, 64]  # default max_growth 2: one noisy estimate cannot jump to the max
    with pytest.raises(ValueError, match="max_growth"):
        BatchSizePolicy("adaptive", start=4, granularity=2, maximum=64, max_growth=1.0)


def test_adaptive_policy_resume_reproduces_future_sizes():
    def run(policy, steps):
        return [policy.decide(s, 0, 6.0 + s, 100) for s in steps]

    full = BatchSizePolicy("adaptive", start=4, granularity=2, maximum=40, interval=3)
    sizes = run(full, range(30))
    first = BatchSizePolicy("adaptive", start=4, granularity=2, maximum=40, interval=3)
    run(first, range(12))
    resumed = BatchSizePolicy("adaptive", start=4, granularity=2, maximum=40, interval=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run(resumed, range(12, 30)) == sizes[12:]


def test_policy_rejects_sizes_that_do_not_split_into_micro_batches():
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        BatchSizePolicy("fixed", start=12, granularity=8)


def test_plan_reproduces_the_reference_story():
    plan = make_plan(250 * 10**9, 8192, gpus=64, extra_batches=(244, 1280))
    rows = {r.global_batch: r for r in plan.rows}
    assert rows[244].steps == pytest.approx(125_000, rel=0.01) and not rows[244].in_range  # ~2M-token batches
    assert rows[1280].steps == pytest.approx(24_000, rel=0.01) and rows[1280].in_range  # 10.5M-token batches
    assert rows[1280].lr_scale == pytest.approx(math.sqrt(1280 / 256))
    assert plan.recommended.in_range and plan.recommended.global_batch % 64 == 0


def test_plan_cli_json_and_bad_input():
    ok = subprocess.run([sys.executable, "-m", "hebtron.cli", "plan", "--tokens", "250B", "--seq-len", "8192",
                         "--gpus", "64", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["recommended"]["in_range"] is True
    bad = subprocess.run([sys.executable, "-m", "hebtron.cli", "plan", "--tokens", "lots", "--seq-len", "8192",
                          "--gpus", "8"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
