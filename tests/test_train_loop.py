"""The CPT loop end to end on a tiny model: progress, exact resume, loss normalization."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hebtron.recipe import load_recipe
from hebtron.backends.engines import make_trainer
from hebtron.backends.native_engine import NativeEngine
from hebtron.train.loop import Trainer
from hebtron.train.metrics import read_metrics
from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.mktemp("cpt-fixture"))


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hebtron.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.slow
def test_run_trains_checkpoints_and_logs(fixture_dir, tmp_path, capsys):
    recipe = load_recipe(write_recipe(fixture_dir, tmp_path / "run"))
    trainer = make_trainer(recipe)
    assert type(trainer) is Trainer and type(trainer.engine) is NativeEngine  # one loop for every engine
    kernels = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("kernels: "))
    assert kernels == ("kernels: attention segments (packed rows), sdpa_causal (one-document rows), SSD scan PyTorch "
                       "reference, conv1d PyTorch reference, experts grouped_mm, loss chunked linear cross-entropy, "
                       "gradient formed in forward")
    result = trainer.run()
    assert result.steps == 12 and result.tokens == 12 * 8 * 32
    assert result.val_loss_end["he_valid"] < result.val_loss_start["he_valid"] - 0.5
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert "val_loss" in records[3] and "val_loss" not in records[2]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000008", "step_00000012"]  # keep_last 2
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000012"


@pytest.mark.slow
def test_sigkill_and_resume_auto_reproduces_losses(fixture_dir, tmp_path, one_thread):
    from hebtron.cli import main as hebtron_main

    overrides = ["train.total_steps=24", "train.micro_batch=1", "checkpoint.interval=3"]
    reference = tmp_path / "reference"  # in this process (one thread, like the subprocesses): one start fewer
    assert hebtron_main(["train", str(write_recipe(fixture_dir, reference)), *overrides]) == 0

    run = tmp_path / "killed"
    recipe = write_recipe(fixture_dir, run)
    proc = _cli("train", str(recipe), *overrides, "--resume", "auto")
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = len(read_metrics(metrics))
    assert 10 <= killed_at < 24, "the run should have been killed midway"

    proc = _cli("train", str(recipe), *overrides, "--resume", "auto")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed from" in out
    ours, theirs = read_metrics(metrics), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in ours] == list(range(1, 25))
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]  # bitwise
    assert [r["phase"] for r in ours] == [r["phase"] for r in theirs]


def _varied_batch(vocab: int, rows: int = 8, seqlen: int = 24) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (rows, seqlen + 1), generator=gen)
    loss_mask = torch.zeros(rows, seqlen, dtype=torch.long)
    for r in range(rows):  # very different numbers of loss tokens per row
        loss_mask[r, : 2 + 3 * r] = 1
    seq_idx = (torch.arange(seqlen) >= 10).long().expand(rows, seqlen).contiguous()
    position_ids = torch.where(seq_idx == 0, torch.arange(seqlen), torch.arange(seqlen) - 10)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": loss_mask, "seq_idx": seq_idx,
            "position_ids": position_ids}


@pytest.mark.slow
def test_accumulation_split_does_not_change_gradients():
    from hebtron.backends.native import NativeBackend
    from hebtron.model import HybridConfig, HybridModel
    from hebtron.backends.native_engine import accumulate_gradients
    from hebtron.train.engine import split_rows
    from tests.conftest import TINY_CONFIGS

    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**TINY_CONFIGS["all-types-grouped"]))
    batch = _varied_batch(model.config.vocab_size)
    tokens = int(batch["loss_mask"].sum())
    backend = NativeBackend(1)
    grads = {}
    for micro in (8, 1):
        model.zero_grad()
        micro_batches = [split_rows(batch, s, s + micro) for s in range(0, 8, micro)]
        accumulate_gradients(model, micro_batches, tokens, backend)
        grads[micro] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads[8].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)
    # and the per-micro-batch mean (the common mistake) really is different here
    model.zero_grad()
    micro_batches = [split_rows(batch, s, s + 1) for s in range(8)]
    for mb in micro_batches:
        accumulate_gradients(model, [mb], int(mb["loss_mask"].sum()) * 8, backend)
    wrong = model.backbone.embeddings.weight.grad
    assert not torch.allclose(wrong, grads[8]["backbone.embeddings.weight"], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_early_kill_stops_a_diverging_run(fixture_dir, tmp_path):
    recipe = write_recipe(fixture_dir, tmp_path / "doomed")
    proc = _cli("train", str(recipe), "train.lr=3.0", "train.min_lr=0", "train.warmup_tokens=0", "train.grad_clip=0",
                "train.early_kill={enabled: true, window_steps: 12, margin: 0.02, beta: 0.5}")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, out + err
    assert "loss rising early" in out and "Traceback" not in err


@pytest.mark.slow
def test_export_loads_in_transformers(fixture_dir, tmp_path):
    from transformers import AutoTokenizer, NemotronHForCausalLM

    from hebtron.model.hf import load_hf

    make_trainer(load_recipe(write_recipe(fixture_dir, tmp_path / "run", total_steps=2))).run()
    proc = _cli("export", str(tmp_path / "run" / "checkpoints"), "--hf", str(tmp_path / "hf"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    hf = NemotronHForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = torch.tensor([tok("שלום עולם hello world")["input_ids"]])
    ours = load_hf(tmp_path / "run" / "checkpoints" / "step_00000002").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "nemotron_h"
