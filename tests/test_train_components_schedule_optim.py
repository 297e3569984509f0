"""Token-based LR schedules against analytic values; AdamW grouping; gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hebtron.train.optim import build_adamw, clip_grad_norm, param_groups
from hebtron.train.schedule import TokenSchedule, set_lr

PEAK, FLOOR = 1e-3, 1e-5


def wsd(shape: str = "linear") -> TokenSchedule:
    return TokenSchedule("wsd", PEAK, FLOOR, warmup_tokens=100, total_tokens=1000,
                         decay_tokens=200, decay_shape=shape)


@pytest.mark.parametrize("tokens, expected", [
    (0, 0.0),
    (50, PEAK / 2),
    (100, PEAK),
    (500, PEAK),
    (800, PEAK),                              # decay starts at total - decay = 800
    (900, FLOOR + (PEAK - FLOOR) * 0.5),
    (950, FLOOR + (PEAK - FLOOR) * 0.25),
    (1000, FLOOR),
    (5000, FLOOR),
])
def test_wsd_linear(tokens: int, expected: float) -> None:
    assert wsd().lr(tokens) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("tokens, progress", [(800, 0.0), (850, 0.25), (900, 0.5), (1000, 1.0)])
def test_wsd_one_minus_sqrt(tokens: int, progress: float) -> None:
    expected = FLOOR + (PEAK - FLOOR) * (1 - math.sqrt(progress))
    assert wsd("1-sqrt").lr(tokens) == pytest.approx(expected, rel=1e-12)


def test_one_minus_sqrt_drops_faster_than_linear_early_in_decay() -> None:
    assert wsd("1-sqrt").lr(820) < wsd("linear").lr(820)


@pytest.mark.parametrize("tokens, expected", [
    (0, 0.0),
    (25, PEAK / 4),
    (100, PEAK),
    (350, FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi / 4))),
    (600, (PEAK + FLOOR) / 2),
    (1100, FLOOR),
    (9999, FLOOR),
])
def test_cosine(tokens: int, expected: float) -> None:
    s = TokenSchedule("cosine", PEAK, FLOOR, warmup_tokens=100, total_tokens=1100)
    assert s.lr(tokens) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_constant_and_no_warmup() -> None:
    s = TokenSchedule("constant", PEAK, warmup_tokens=1000)
    assert s.lr(500) == pytest.approx(PEAK / 2)
    assert s.lr(10**12) == PEAK
    assert TokenSchedule("constant", PEAK).lr(0) == PEAK


def test_lr_scale_multiplies_and_round_trips() -> None:
    s = wsd()
    s.lr_scale = math.sqrt(8)  # 8x batch -> ~2.83x LR
    assert s.lr(500) == pytest.approx(PEAK * math.sqrt(8))
    assert s.lr(1000) == pytest.approx(FLOOR * math.sqrt(8))
    fresh = wsd()
    fresh.load_state_dict(s.state_dict())
    assert fresh.lr(900) == s.lr(900)


def _closed_form_wsd(t: float) -> float:
    """wsd() by hand: warmup 0..100 linear, flat to 800, linear decay to FLOOR at 1000."""
    if t < 100:
        return PEAK * t / 100
    if t < 800:
        return PEAK
    if t < 1000:
        return FLOOR + (PEAK - FLOOR) * (1 - (t - 800) / 200)
    return FLOOR


def _closed_form_cosine(t: float) -> float:
    """Cosine with warmup 100 and total 1100, by hand."""
    if t < 100:
        return PEAK * t / 100
    if t < 1100:
        return FLOOR + 0.5 * (PEAK - FLOOR) * (1 + math.cos(math.pi * (t - 100) / 1000))
    return FLOOR


def test_changing_batch_size_does_not_distort_schedule() -> None:
    """The LR follows tokens, not steps: with a batch that grows 5x at 300 tokens, each step's LR
    is the closed-form curve at the tokens consumed so far (a step-based schedule, or one that
    counted only the first batch size, would land elsewhere)."""
    batches = [10] * 30 + [50] * 14  # 300 tokens in 30 steps, then 700 in 14
    tokens = [sum(batches[: i + 1]) for i in range(len(batches))]
    assert tokens[29] == 300 and tokens[-1] == 1000
    for schedule, closed_form in ((wsd(), _closed_form_wsd),
                                  (TokenSchedule("cosine", PEAK, FLOOR, warmup_tokens=100, total_tokens=1100),
                                   _closed_form_cosine)):
        for t in tokens:
            assert schedule.lr(t) == pytest.approx(closed_form(t), rel=1e-12, abs=1e-15), t
    # a few steps by hand (step index -> tokens): 0 -> 10, 30 -> 350, 40 -> 850, 43 -> 1000
    s = wsd()
    assert s.lr(tokens[0]) == pytest.approx(1e-4, rel=1e-12)           # warmup: 1e-3 * 10/100
    assert s.lr(tokens[30]) == pytest.approx(PEAK, rel=1e-12)          # 350: stable
    assert s.lr(tokens[40]) == pytest.approx(7.525e-4, rel=1e-12)      # 850: 1e-5 + 0.99e-3 * 0.75
    assert s.lr(tokens[42]) == pytest.approx(2.575e-4, rel=1e-12)      # 950: 1e-5 + 0.99e-3 * 0.25
    assert s.lr(tokens[43]) == pytest.approx(FLOOR, rel=1e-12)         # 1000: end of decay
    c = TokenSchedule("cosine", PEAK, FLOOR, warmup_tokens=100, total_tokens=1100)
    assert c.lr(tokens[35]) == pytest.approx(5.05e-4, rel=1e-12)       # 600: halfway, (PEAK + FLOOR) / 2
    assert c.lr(tokens[43]) == pytest.approx(1e-5 + 0.495e-3 * (1 + math.cos(0.9 * math.pi)), rel=1e-12)
    # the step-based reading differs: step 40 of 44 would be 91% through the run in steps, but only
    # 850 / 1000 tokens have been consumed; the scheduler must not use the step fraction
    assert s.lr(tokens[40]) != pytest.approx(_closed_form_wsd(1000 * 41 / 44))


@pytest.mark.parametrize("kwargs", [
    dict(kind="wsd", peak_lr=1e-3, total_tokens=100, warmup_tokens=60, decay_tokens=60),
    dict(kind="cosine", peak_lr=1e-3),
    dict(kind="cosine", peak_lr=1e-3, total_tokens=10, warmup_tokens=10),
    dict(kind="linear", peak_lr=1e-3),
    dict(kind="constant", peak_lr=1e-3, min_lr=1e-2),
    dict(kind="wsd", peak_lr=1e-3, total_tokens=100, decay_tokens=10, decay_shape="cubic"),
])
def test_invalid_schedules_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TokenSchedule(**kwargs)


class Tiny(nn.Module):
    """Shapes like a hybrid decoder: embedding tied to head, norm, Mamba per-head params."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(11, 4)
        self.norm = nn.LayerNorm(4)
        self.in_proj = nn.Linear(4, 6, bias=True)
        self.A_log = nn.Parameter(torch.zeros(3))
        self.D = nn.Parameter(torch.ones(3))
        self.dt_bias = nn.Parameter(torch.zeros(3))
        self.lm_head = nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.embeddings.weight
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_param_groups_exempt_one_dim_params() -> None:
    m = Tiny()
    groups = param_groups(m, weight_decay=0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(m.embeddings.weight), id(m.in_proj.weight)}  # tied weight listed once
    assert no_decay == {id(p) for p in (m.norm.weight, m.norm.bias, m.in_proj.bias,
                                        m.A_log, m.D, m.dt_bias)}
    named = param_groups(m, 0.1, no_decay_names=("embeddings",))
    assert id(m.embeddings.weight) in {id(p) for p in named[1]["params"]}


def test_build_adamw_decays_only_matrices() -> None:
    m = Tiny()
    opt = build_adamw(m, lr=0.1, weight_decay=0.5)
    before_w, before_b = m.in_proj.weight.detach().clone(), m.in_proj.bias.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # zero grad: only weight decay can move weights
    opt.step()
    assert torch.allclose(m.in_proj.weight, before_w * (1 - 0.1 * 0.5))
    assert torch.equal(m.in_proj.bias, before_b)
    set_lr(opt, 0.123)
    assert all(g["lr"] == 0.123 for g in opt.param_groups)


def test_clip_grad_norm_returns_pre_clip_norm() -> None:
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1, 1))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([[4.0]])
    assert clip_grad_norm([a, b], max_norm=1.0) == pytest.approx(5.0)
    post = torch.cat([a.grad.flatten(), b.grad.flatten()]).norm()
    assert post.item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm([a, b], max_norm=None) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_below_threshold_and_non_finite_untouched() -> None:
    a = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([0.3, 0.4])
    assert clip_grad_norm([a], max_norm=1.0) == pytest.approx(0.5)
    assert torch.allclose(a.grad, torch.tensor([0.3, 0.4]))
    a.grad = torch.tensor([float("nan"), 1.0])
    assert math.isnan(clip_grad_norm([a], max_norm=1.0))
    assert a.grad[1].item() == 1.0
    assert clip_grad_norm([nn.Parameter(torch.zeros(1))], 1.0) == 0.0  # no grads at all
