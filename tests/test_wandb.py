"""Weights & Biases mirroring (recipe logging.wandb), in offline mode: the trainer's metrics and
the watcher's eval results land in RUN_DIR/wandb with their keys; without the wandb package a
recipe that asks for it fails in one line; a bad section is one line naming the field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hebtron.errors import UserError
from hebtron.eval.watch import Watcher
from hebtron.recipe import load_recipe
from hebtron.recipe.schema import WandbSection
from hebtron.train.checkpoint import save_checkpoint
from hebtron.train.metrics import METRICS_FILE, MetricsWriter
from hebtron.train.wandb_mirror import flat_scalars, run_id
from tests.test_launch import _cluster_recipe

OFFLINE = WandbSection(project="hebtron-test", mode="offline")


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def _wandb_log(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (``*.wandb``: a ``:W&B`` header, then LevelDB-style
    chunks in 32 KiB blocks: crc32 (4), length (2, little-endian), type (1: full, 2-4: first,
    middle, last)). wandb >= 0.20 has no Python reader, and offline runs keep only this file."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's zero-padded tail
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _history(run_dir: Path, run: str) -> list[dict]:
    """The rows logged to one W&B run, read back from RUN_DIR/wandb/offline-run-*-<id>/."""
    from wandb.proto.wandb_internal_pb2 import Record

    [path] = (run_dir / "wandb").glob(f"offline-run-*-{run_id(run_dir, run)}/*.wandb")
    rows = []
    for raw in _wandb_log(path):
        record = Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def _record(step: int, loss: float) -> dict:
    return {"step": step, "tokens": 256 * step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0,
            "batch_size": 8, "noise_scale": float("nan"),
            "router": {"entropy": {"layer_2": 1.25}, "load_max": {"layer_2": 0.5}}, "val_loss/he": 3.5}


def test_training_metrics_are_mirrored_to_an_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsWriter(run_dir, wandb=OFFLINE) as writer:
        writer.log(_record(1, 4.0))
        writer.log(_record(2, 3.0))
    assert len((run_dir / METRICS_FILE).read_text().splitlines()) == 2  # the record is still the record
    assert [p.name.split("-", 3)[3] for p in (run_dir / "wandb").glob("offline-run-*")] == [run_id(run_dir, "train")]
    rows = _history(run_dir, "train")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 4.0), (2, 3.0)]
    last = rows[-1]
    assert last["tokens"] == 512 and last["batch_size"] == 8 and last["grad_norm"] == 0.5
    assert last["router/entropy/layer_2"] == 1.25 and last["router/load_max/layer_2"] == 0.5
    assert last["val_loss/he"] == 3.5
    assert "noise_scale" not in last  # NaN is null in metrics.jsonl, and left out of W&B


def test_watcher_mirrors_eval_results_to_its_own_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    (run_dir).mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(
        {"logging": {"run_dir": str(run_dir), "wandb": {"project": "hebtron-test", "mode": "offline"}}}))
    for step in (10, 20):
        save_checkpoint(ckpt_dir, step, {"w": torch.zeros(1)}, extra={"tokens": step * 100})

    def evaluate(checkpoint: Path) -> dict:
        acc = 0.25 if checkpoint.name.endswith("10") else 0.5
        return {"results": {"task_a": {"acc,none": acc, "acc_stderr,none": 0.01, "alias": "task_a"}},
                "hebtron": {"status": "ok"}}

    state = Watcher(run_dir, "mini", evaluate, checkpoints=ckpt_dir, poll_s=0.1, say=lambda _: None).run_until_done(once=True)
    assert state.evaluated == {"10": "ok", "20": "ok"}
    rows = _history(run_dir, "eval-mini")
    assert [(r["step"], r["tokens"], r["eval/task_a/acc"]) for r in rows] == [(10, 1000, 0.25), (20, 2000, 0.5)]
    assert rows[-1]["eval/task_a/acc_stderr"] == 0.01


def test_flat_scalars_keeps_numbers_only():
    assert flat_scalars({"step": 3, "kind": "eval", "ok": True, "a": {"b": 1.5, "c": [1, 2]}, "n": None}) == {
        "step": 3, "ok": 1.0, "a/b": 1.5}


def test_missing_wandb_is_one_line_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as info:
        MetricsWriter(run_dir, wandb=OFFLINE)
    assert str(info.value) == ("logging.wandb: the wandb package is not installed; pip install 'hebtron[wandb]' "
                               "or remove logging.wandb from the recipe")
    assert not (run_dir / METRICS_FILE).exists()
    MetricsWriter(run_dir).close()  # without logging.wandb nothing needs it


@pytest.mark.parametrize(("section", "expected"), [
    ({"project": "p", "mode": "sometimes"}, r"r\.yaml: logging\.wandb\.mode: expected 'offline', 'online' or 'disabled'"),
    ({"mode": "offline"}, r"r\.yaml: logging\.wandb\.project: "),
    ({"project": "p", "entitty": "me"}, r"r\.yaml: logging\.wandb\.entitty: unknown key; did you mean 'entity'"),
])
def test_bad_wandb_section_is_one_line(tmp_path, section, expected):
    path = _cluster_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "run"))
    recipe = yaml.safe_load(path.read_text())
    recipe["logging"]["wandb"] = section
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=expected) as info:
        load_recipe(path, check_paths=False)
    assert "\n" not in str(info.value)


def test_wandb_section_defaults_to_offline_and_to_none(tmp_path):
    path = _cluster_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "run"))
    assert load_recipe(path, check_paths=False).logging.wandb is None
    recipe = yaml.safe_load(path.read_text())
    recipe["logging"]["wandb"] = {"project": "p"}
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path, check_paths=False).logging.wandb == WandbSection(project="p", mode="offline")


@pytest.mark.slow  # trains a tiny model for 4 steps
def test_a_training_run_with_logging_wandb_logs_every_step(tmp_path_factory, tmp_path):
    from hebtron.backends.engines import make_trainer
    from hebtron.train.metrics import read_metrics
    from tests.train_fixtures import build_training_fixture, write_recipe

    fixture = build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")
    path = write_recipe(fixture, tmp_path / "run", total_steps=4, eval_interval=2)
    recipe = yaml.safe_load(path.read_text())
    recipe["logging"]["wandb"] = {"project": "hebtron-test"}
    path.write_text(yaml.safe_dump(recipe))
    make_trainer(load_recipe(path)).run()
    records = read_metrics(tmp_path / "run")
    rows = _history(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [r["step"] for r in records] == [1, 2, 3, 4]
    for row, record in zip(rows, records):  # every number of every record: loss, noise scale, batch, val loss
        numbers = flat_scalars(record)
        assert {"loss", "global_batch", "noise/b_simple_tokens"} <= set(numbers)
        assert {k: row.get(k) for k in numbers} == pytest.approx(numbers)
    assert "val_loss" in rows[1] and "val_loss" not in rows[0]
