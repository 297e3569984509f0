"""Metrics file consistency on resume, progress output, loss guards, PNG report."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from hebtron.monitor.plots import line_figure
from hebtron.train import report
from hebtron.train.guards import EarlyKillGuard, NanGuard, TrainingAborted
from hebtron.train.metrics import MetricsWriter, Progress, read_metrics, truncate_metrics


def rec(step: int, **extra) -> dict:
    return {"step": step, "tokens": step * 1000, "loss": 5.0 / step, "lr": 1e-4,
            "grad_norm": 1.0 + step, "tokens_per_s": 900.0, **extra}


def test_resume_truncates_replayed_steps(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w:
        for s in range(1, 11):
            w.log(rec(s))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 11, "lo')  # torn line from a crash
    with MetricsWriter(tmp_path, resume_step=6) as w:
        for s in range(7, 9):
            w.log(rec(s, val_loss=1.5))
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, 9))
    assert read_metrics(tmp_path)[-1]["val_loss"] == 1.5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line) for line in lines)


def test_fresh_run_starts_empty_and_truncate_helper(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w:
        w.log(rec(1))
        w.log(rec(2))
    with MetricsWriter(tmp_path) as w:
        w.log(rec(1))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert truncate_metrics(tmp_path / "metrics.jsonl", 0) == 1
    assert truncate_metrics(tmp_path / "missing.jsonl", 0) == 0


def test_values_are_plain_strict_json(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as w:
        w.log(rec(1, loss=torch.tensor(float("nan")), grad_norm=float("inf"),
                  router={"layer_1": {"entropy": torch.tensor(0.5)}}, load=[0.25, 0.75]))
        with pytest.raises(KeyError, match="grad_norm"):
            w.log({"step": 2, "tokens": 1, "loss": 1.0, "lr": 1.0, "tokens_per_s": 1.0})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    r = json.loads(line)
    assert r["loss"] is None and r["grad_norm"] is None
    assert r["router"] == {"layer_1": {"entropy": 0.5}} and r["load"] == [0.25, 0.75]


def test_disabled_writer_touches_nothing(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "run", tensorboard=True, enabled=False)
    w.log({"step": 1})  # not even validated: non-zero ranks stay cheap
    w.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_mirror_and_purge_on_resume(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path, tensorboard=True) as w:
        for s in range(1, 6):
            w.log(rec(s, router={"entropy": 0.1 * s}))
    with MetricsWriter(tmp_path, tensorboard=True, resume_step=3) as w:
        w.log(rec(4, loss=42.0))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "router/entropy"} <= set(acc.Tags()["scalars"])
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(loss) == [1, 2, 3, 4] and loss[4] == 42.0


def test_progress_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    p = Progress(total_tokens=1000, enabled=True, plain_every_s=0.0, stream=out)
    p.update(step=1, tokens=250, loss=2.5, lr=3e-4)
    p.update(step=4, tokens=1000, loss=2.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()
    assert "step 1 loss 2.5000 lr 3.00e-04" in lines[0] and "(25.0%)" in lines[0]
    assert "eta" in lines[0]
    throttled = io.StringIO()
    q = Progress(total_tokens=1000, plain_every_s=3600.0, stream=throttled)
    for t in range(1, 10):
        q.update(step=t, tokens=t)
    assert len(throttled.getvalue().splitlines()) == 1
    silent = io.StringIO()
    Progress(total_tokens=10, enabled=False, stream=silent).update(1, 5)
    assert silent.getvalue() == ""


def test_progress_eta() -> None:
    p = Progress(total_tokens=1000, start_tokens=100, enabled=False)
    p._t0 -= 10.0  # 10 s elapsed
    assert p.eta_s(300) == pytest.approx(35.0, rel=0.05)  # 200 tok in 10 s, 700 left
    assert math.isinf(p.eta_s(100))


def test_nan_guard_consecutive_budget() -> None:
    g = NanGuard(max_skips=2)
    assert g.check(1.0, 1.0) is False
    assert g.check(float("nan"), 1.0) is True
    assert g.check(1.0, torch.tensor(float("inf"))) is True
    assert g.check(torch.tensor(0.5), 2.0) is False  # streak reset
    assert g.check(float("nan"), 1.0) and g.check(float("nan"), 1.0)
    with pytest.raises(TrainingAborted, match="step 9: 3 consecutive"):
        g.check(float("nan"), float("nan"), step=9)
    assert g.total == 5


def test_nan_guard_total_budget_and_resume() -> None:
    g = NanGuard(max_skips=10, max_total=2)
    assert g.check(float("nan"), 1.0)
    resumed = NanGuard(max_skips=10, max_total=2)
    resumed.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert resumed.check(1.0, 1.0) is False
    assert resumed.check(float("nan"), 1.0)
    with pytest.raises(TrainingAborted, match="3 steps skipped in total"):
        resumed.check(float("nan"), 1.0)
    with pytest.raises(TrainingAborted):
        NanGuard(max_skips=0).check(float("nan"), 0.0)
    assert issubclass(TrainingAborted, RuntimeError)


def falling_then_rising(n_fall: int = 30, n_rise: int = 30) -> list[float]:
    return [4.0 - 0.05 * i for i in range(n_fall)] + [2.55 + 0.05 * i for i in range(n_rise)]


def run_guard(guard: EarlyKillGuard, losses: list[float], start: int = 1) -> int | None:
    for i, loss in enumerate(losses, start=start):
        try:
            guard.update(i, loss)
        except TrainingAborted:
            return i
    return None


def test_early_kill_on_rising_loss() -> None:
    g = EarlyKillGuard(window_steps=100, margin=0.05, beta=0.8)
    with pytest.raises(TrainingAborted) as exc:
        for i, loss in enumerate(falling_then_rising(), start=1):
            g.update(i, loss)
    msg = str(exc.value)
    assert "doomed" in msg and "smoothed loss" in msg and "minimum" in msg and "5% relative" in msg
    assert g.smoothed > g.minimum * 1.05


def test_early_kill_spares_falling_noisy_and_late() -> None:
    falling = [4.0 - 0.01 * i for i in range(200)]
    assert run_guard(EarlyKillGuard(window_steps=200), falling) is None
    spiky = [3.0 - 0.01 * i for i in range(100)]
    spiky[50] = 3.5  # one bad batch: +30 %, smoothed away
    assert run_guard(EarlyKillGuard(window_steps=100, margin=0.05, beta=0.9), spiky) is None
    assert run_guard(EarlyKillGuard(window_steps=100, margin=0.05, beta=0.0), spiky) == 51
    nan_first = [float("nan")] * 5 + falling
    assert run_guard(EarlyKillGuard(window_steps=100, beta=0.9), nan_first) is None
    # the same rise after the window is not the early guard's business
    assert run_guard(EarlyKillGuard(window_steps=30, beta=0.8), falling_then_rising()) is None


def test_early_kill_absolute_margin() -> None:
    losses = [2.0] * 20 + [2.3] * 30
    loose = EarlyKillGuard(window_steps=100, margin=0.5, margin_mode="absolute")
    tight = EarlyKillGuard(window_steps=100, margin=0.1, margin_mode="absolute")
    assert run_guard(loose, losses) is None
    # bias-corrected EMA after k steps at 2.3: 2.0 + 0.3 * (1 - 0.9**k) / (1 - 0.9**(20 + k));
    # k=3 gives 2.089 (< 2.1), k=4 gives 2.112, so the kill lands on step 24
    assert run_guard(tight, losses) == 24


def test_early_kill_resume_is_exact() -> None:
    losses = falling_then_rising()
    straight = run_guard(EarlyKillGuard(window_steps=100, beta=0.8), losses)
    assert straight is not None
    first = EarlyKillGuard(window_steps=100, beta=0.8)
    assert run_guard(first, losses[:20]) is None
    second = EarlyKillGuard(window_steps=100, beta=0.8)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run_guard(second, losses[20:], start=21) == straight
    fresh = EarlyKillGuard(window_steps=10)
    fresh.load_state_dict(json.loads(json.dumps(fresh.state_dict())))  # inf minimum survives JSON
    assert math.isinf(fresh.minimum)


def test_early_kill_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        EarlyKillGuard(window_steps=10, beta=1.0)
    with pytest.raises(ValueError):
        EarlyKillGuard(window_steps=10, margin_mode="percent")  # type: ignore[arg-type]


PNG = b"\x89PNG\r\n\x1a\n"


def test_report_writes_pngs_and_accepts_new_plots(tmp_path: Path, monkeypatch) -> None:
    with MetricsWriter(tmp_path) as w:
        for s in range(1, 21):
            w.log(rec(s, **({"val_loss": 4.0 / s} if s % 5 == 0 else {})))
        w.log(rec(21, loss=float("nan")))  # skipped step: null, must not break plots
    seen = {}

    def router_plot(records, run_dir):
        seen["n"] = len(records)
        return line_figure("router", "x", {"a": ([1.0, 2.0], [3.0, 4.0])})

    monkeypatch.setitem(report.PLOTS, "router_entropy", router_plot)
    paths = report.write_report(tmp_path)
    assert {p.name for p in paths} == {"loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png",
                                       "router_entropy.png"}
    assert all(p.read_bytes().startswith(PNG) and p.parent == tmp_path / "report" for p in paths)
    assert seen["n"] == 21
    only = report.write_report(tmp_path, out_dir=tmp_path / "r2", only=["lr"])
    assert [p.name for p in only] == ["lr.png"]


def test_report_on_empty_run_writes_nothing(tmp_path: Path) -> None:
    assert report.write_report(tmp_path) == []
    assert not (tmp_path / "report").exists()
