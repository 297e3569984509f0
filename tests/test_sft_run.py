"""SFT through the training loop: recipes, the batch provider, exact resume, packed files,
starting from a checkpoint, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hebtron.cli import main as cli
from hebtron.data.packing import PackedRows, pack
from hebtron.data.sft import SFTBatches
from hebtron.errors import UserError
from hebtron.recipe import load_recipe
from hebtron.backends.engines import make_trainer
from hebtron.train.metrics import read_metrics
from tests.sft_fixtures import build_chat_tokenizer, chat_records, write_chat_jsonl, write_sft_recipe
from tests.test_packing import _examples


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-run")
    tok = build_chat_tokenizer(root)
    train = write_chat_jsonl(root / "train.jsonl", chat_records(160, seed=1, hi=3))
    valid = write_chat_jsonl(root / "valid.jsonl", chat_records(24, seed=2, hi=3))
    return root, tok, train, valid


def _pool(name: str, n: int, seed: int) -> tuple[str, PackedRows, float]:
    rows = pack(_examples(n, seed, lo=5, hi=30), 48)
    return name, PackedRows.from_rows(rows, 48), 1.0


def test_batches_resume_exactly_and_follow_weights():
    pools = [(_pool("a", 60, 1)[0], _pool("a", 60, 1)[1], 3.0), (_pool("b", 40, 2)[0], _pool("b", 40, 2)[1], 1.0)]
    ref = SFTBatches(pools, seed=5)
    batches = [ref.next_batch(n) for n in (4, 8, 4, 12, 8)]
    assert ref.counts == [27, 9]  # 3:1 at every prefix (Megatron's blending rule)
    run = SFTBatches(pools, seed=5)
    for n in (4, 8):
        run.next_batch(n)
    state = json.loads(json.dumps(run.state_dict()))  # plain JSON, as in a checkpoint
    resumed = SFTBatches(pools, seed=5)
    resumed.load_state_dict(state)
    for n, want in zip((4, 12, 8), batches[2:], strict=True):
        got = resumed.next_batch(n)
        assert all(torch.equal(got[k], want[k]) for k in want)
    other = SFTBatches([pools[0]], seed=5)
    with pytest.raises(UserError, match="sources"):
        other.load_state_dict(state)


def test_every_row_once_per_epoch_then_reshuffled():
    name, rows, _ = _pool("a", 80, 3)
    batches = SFTBatches([(name, rows, 1.0)], seed=1)
    n = len(rows)
    epoch1 = batches.next_batch(n)["input_ids"]
    epoch2 = batches.next_batch(n)["input_ids"]
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(epoch1) == key(epoch2) == key(torch.from_numpy(rows.input_ids.astype(np.int64)))
    assert not torch.equal(epoch1, epoch2)


def test_sft_recipe_checks(fx, tmp_path):
    root, tok, train, valid = fx
    path = write_sft_recipe(tmp_path, tmp_path / "run", train, valid, tok)
    recipe = load_recipe(path)
    assert recipe.sft is not None and recipe.sft.loss_average == "token" and recipe.data.sources[0].format == "jsonl"
    cases = [
        ("data.phases=[{name: a, tokens: 1k}]", "data.phases: SFT runs have no data phases"),
        ("sft.pad_to_multiple_of=7", "sft.pad_to_multiple_of: must divide data.seq_len (128)"),
        ("sft.loss_average=mean", "sft.loss_average"),
        (f"sft.template_file={path}", "set template or template_file"),
    ]
    for override, message in cases:
        extra = ["sft.template=chatml"] if "template_file" in override else []
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(path, [override, *extra])


def test_sft_runs_learns_and_resumes_bitwise(fx, tmp_path):
    root, tok, train, valid = fx
    recipe = load_recipe(write_sft_recipe(tmp_path, tmp_path / "a", train, valid, tok))
    trainer = make_trainer(recipe)
    assert trainer.data.phase_name == "sft" and trainer.data.reports[0].pack.fill > 0.9
    result = trainer.run()
    assert result.steps == 8
    assert result.val_loss_end["chat_valid"] < result.val_loss_start["chat_valid"] - 0.5
    ref = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert all(0 < r["loss_tokens"] < 8 * 128 for r in ref)
    # a new run resumed from the step-4 checkpoint repeats steps 5-8 bit for bit
    resumed = make_trainer(load_recipe(write_sft_recipe(tmp_path, tmp_path / "b", train, valid, tok)),
                      resume=str(tmp_path / "a" / "checkpoints" / "step_00000004"))
    resumed.run()
    again = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in again] == [5, 6, 7, 8]
    assert [r["loss"] for r in again] == [r["loss"] for r in ref[4:]]


def test_sample_averaging_runs_through_the_loop(fx, tmp_path):
    root, tok, train, valid = fx
    recipe = load_recipe(write_sft_recipe(tmp_path, tmp_path / "s", train, valid, tok,
                                          sft={"loss_average": "sample"}, total_steps=2, eval_interval=0))
    trainer = make_trainer(recipe)
    fresh = SFTBatches([(trainer.data.names[0], trainer.data.pools[0], 1.0)], seed=recipe.train.seed,
                       loss_average="sample")
    batch = fresh.next_batch(8)  # what the trainer's first step sees
    conversations = sum(int(torch.unique(s[m > 0]).numel()) for s, m in zip(batch["seq_idx"], batch["loss_mask"]))
    assert float(batch["loss_mask"].double().sum()) == pytest.approx(conversations, abs=1e-4)
    trainer.run()
    first = read_metrics(tmp_path / "s" / "metrics.jsonl")[0]
    assert first["loss_tokens"] == pytest.approx(conversations, abs=1e-4)  # the normalizer: conversations


def test_pack_command_and_sft_from_packed_file_and_checkpoint(fx, tmp_path, capsys):
    root, tok, train, valid = fx
    packed = tmp_path / "train.parquet"
    assert cli(["data", "pack", "--input", str(train), "--tokenizer", str(tok), "--seq-len", "128",
                "--out", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "160 conversations ->" in out and "fill" in out
    from_jsonl = load_recipe(write_sft_recipe(tmp_path, tmp_path / "j", train, valid, tok))
    from_packed = load_recipe(write_sft_recipe(tmp_path, tmp_path / "p", packed, valid, tok))
    a, b = make_trainer(from_jsonl).data.next_batch(8), make_trainer(from_packed).data.next_batch(8)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # hebtron sft: run, then a second SFT that starts from the first one's checkpoints directory
    assert cli(["sft", str(write_sft_recipe(tmp_path, tmp_path / "first", packed, valid, tok, total_steps=2,
                                            eval_interval=0))]) == 0
    out = capsys.readouterr().out
    assert "packing (best-fit decreasing):" in out and "done: 2 steps" in out
    ckpts = tmp_path / "first" / "checkpoints"
    # the export carries the chat template the SFT run rendered with (here hebtron's ChatML)
    assert cli(["export", str(ckpts), "--hf", str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer

    from hebtron.data.chat import DEFAULT_TEMPLATE

    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert exported.chat_template == DEFAULT_TEMPLATE
    assert "<|im_start|>assistant" in exported.apply_chat_template([{"role": "user", "content": "שלום"}],
                                                                  tokenize=False, add_generation_prompt=True)
    recipe = write_sft_recipe(tmp_path, tmp_path / "second", train, valid, tok, model={"hf_path": str(ckpts)},
                              total_steps=1, eval_interval=0)
    raw = recipe.read_text().replace(f"tokenizer:\n  path: {tok}\n", "")  # the checkpoint names its tokenizer
    recipe.write_text(raw)
    loaded = load_recipe(recipe)
    assert loaded.model.hf_path == ckpts / "step_00000002"
    trainer = make_trainer(loaded)
    assert len(trainer.tokenizer) == len(make_trainer(from_jsonl).tokenizer)
    from hebtron.model.hf import load_hf

    start = load_hf(ckpts / "step_00000002")
    for (name, p), q in zip(trainer.engine.model.named_parameters(), start.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_pack_reports_bad_data_or_stops_in_strict_mode(fx, tmp_path, capsys):
    root, tok, train, valid = fx
    lines = train.read_text(encoding="utf-8").splitlines()[:20]
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    lines[9] = json.dumps({"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = ["data", "pack", "--input", str(bad), "--tokenizer", str(tok), "--seq-len", "128"]
    assert cli([*args, "--out", str(tmp_path / "ok.parquet")]) == 0
    out = capsys.readouterr().out
    assert "read 20, kept 18, truncated 0, dropped 2: no assistant turn 1, unknown role 1" in out
    assert f"first unknown role: {bad}:10: messages[0].role: unknown role 'robot'" in out
    assert cli([*args, "--out", str(tmp_path / "strict.parquet"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}:5: no assistant turn (nothing to train on)\n"
    assert not (tmp_path / "strict.parquet").exists() and not list(tmp_path.glob("*.tmp-*"))
    # a packed file fixes seq_len: a run with another one is refused
    recipe = load_recipe(write_sft_recipe(tmp_path, tmp_path / "r", tmp_path / "ok.parquet", valid, tok),
                         ["data.seq_len=64"])
    with pytest.raises(UserError, match="packed with seq_len 128, but this run uses 64"):
        make_trainer(recipe)


def test_sft_command_refuses_a_cpt_recipe_and_indexed_sources(fx, tmp_path, capsys):
    root, tok, train, valid = fx
    path = write_sft_recipe(tmp_path, tmp_path / "r", train, valid, tok)
    text = path.read_text()
    cpt = tmp_path / "cpt.yaml"
    cpt.write_text(text.replace("sft: {}\n", ""))
    assert cli(["sft", str(cpt)]) == 2
    assert "needs an sft: section" in capsys.readouterr().err
    (tmp_path / "idx.bin").write_bytes(b"")
    (tmp_path / "idx.idx").write_bytes(b"")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(str(train), str(tmp_path / "idx")))
    assert cli(["sft", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.sources[0].path: an SFT recipe reads chat data" in err
