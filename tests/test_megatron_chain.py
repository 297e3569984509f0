"""The Megatron-backend chain end to end on CPU: a tiny hybrid (Mamba, attention, MoE) trained at
tp=2 on 2 gloo ranks for 6 steps, then every command that takes a checkpoint, on that checkpoint.

- ``hebtron export`` of the checkpoints directory loads in transformers (with its tokenizer), and
  its logits equal the Megatron model's (the checkpoint reloaded by Megatron-Core at tp=1) within
  1e-4 in fp32; ``convert megatron-to-hf`` writes the same directory; ``monitor probe`` reads it.
- The HF conversion is made once and cached in ``step_N/hf/``, also under concurrent callers.
- ``eval run --suite hebrew-mini`` on the Megatron checkpoint scores what it scores on the export;
  ``eval gate`` accepts (and marks the step KEEP) or rejects as the policy says.
- SFT starts from the Megatron checkpoints directory on both backends with the same losses, and
  each SFT checkpoint's export carries the ChatML template it trained with.
- Bad input (no model config, a refused pickle in ``.metadata``, not a Megatron checkpoint) gets
  one line and exit 2.

Megatron-Core runs in child processes: its CPU compatibility layer patches torch.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hebtron.cli import main
from tests.train_fixtures import build_training_fixture, write_recipe

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]  # torchrun ranks of Megatron
TEXTS = ["שלום עולם ספר בית ילד מים אור לחם עיר דרך שמש ים הר עץ שלום עולם",
         "hello world book house child water light bread city road sun sea hill tree hello world"]
CHATML = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nשלום<|im_end|>\n"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def cpt(tmp_path_factory) -> dict[str, Path]:
    """The Megatron CPT run (tp=2, 2 ranks, checkpoints at steps 3 and 6) and its export."""
    fixture = build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")
    root = tmp_path_factory.mktemp("megatron-chain")
    recipe = write_recipe(fixture, root / "cpt", total_steps=6, eval_interval=0, schedule="constant")
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    data["backend"] = "megatron"
    data["model"]["init"]["n_groups"] = 2  # tp=2 splits the Mamba groups
    data["checkpoint"] = {"interval": 3, "keep_last": 2}
    recipe.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "hebtron.cli", "train", str(recipe), "parallel.tp=2", "parallel.dp=1"])
    ckpts = root / "cpt" / "checkpoints"
    step = ckpts / "step_00000006"
    assert (step / "megatron" / "metadata.json").is_file() and (ckpts / "step_00000003" / "COMPLETE").is_file()
    assert not list(step.glob("*.safetensors"))
    export = root / "export"
    assert main(["export", str(ckpts), "--hf", str(export)]) == 0
    return {"root": root, "fixture": fixture, "recipe": recipe, "ckpts": ckpts, "step": step, "export": export}


def _metrics(path: Path) -> dict[str, float]:
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["hebtron"]["status"] == "ok", payload["hebtron"]
    return {f"{task} {key}": value for task, row in payload["results"].items() for key, value in row.items()
            if "," in key and isinstance(value, float)}


def test_export_loads_in_transformers_with_the_megatron_logits(cpt, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, NemotronHForCausalLM

    export = cpt["export"]
    assert {p.name for p in export.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    width = min(len(r) for r in rows)
    assert width >= 16
    ids = [r[:width] for r in rows]
    model = NemotronHForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits

    (tmp_path / "ids.json").write_text(json.dumps(ids), encoding="utf-8")
    _run([sys.executable, __file__, "logits", str(cpt["recipe"]), str(cpt["step"]), str(tmp_path / "ids.json"),
          str(tmp_path / "logits.safetensors")], timeout=300)
    mega = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert mega.shape == theirs.shape
    diff = float((mega - theirs).abs().max())
    with capsys.disabled():
        print(f"\nmax |Megatron - transformers| logits: {diff:.3g}")
    assert diff < 1e-4, diff

    # convert megatron-to-hf takes the checkpoints directory too, and writes the same directory
    again = tmp_path / "converted"
    assert main(["convert", "megatron-to-hf", str(cpt["ckpts"]), str(again)]) == 0
    a, b = load_file(str(export / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.json").read_bytes() == (export / "tokenizer.json").read_bytes()

    capsys.readouterr()
    fixture = cpt["fixture"]
    assert main(["monitor", "probe", "--checkpoint", str(cpt["ckpts"]), "--data", str(fixture / "he_valid.jsonl"),
                 str(fixture / "en_valid.jsonl"), "--batches", "2", "--batch-size", "2", "--seq-len", "32",
                 "--json"]) == 0
    probe = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert probe["checkpoint"] == str(cpt["step"]) and [entry["layer"] for entry in probe["layers"]] == [2]


def test_conversion_is_made_once_and_shared_by_concurrent_callers(cpt):
    step = cpt["ckpts"] / "step_00000003"
    assert not (step / "hf").exists()
    code = "import sys; from hebtron.backends.hf_dirs import hf_directory; print('DIR', hf_directory(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(step)], cwd=REPO, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = {line for out, _ in outs for line in out.splitlines() if line.startswith("DIR ")}
    assert dirs == {f"DIR {step / 'hf'}"}
    assert sum(err.count("converting Megatron checkpoint") for _, err in outs) == 1  # the other waited, then reused
    assert sorted(p.name for p in step.iterdir() if p.name.startswith("hf")) == ["hf", "hf.lock"]  # no scratch left
    from hebtron.backends.hf_dirs import hf_directory

    weights = step / "hf" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert hf_directory(step) == step / "hf" and weights.stat().st_mtime_ns == before


def test_eval_scores_the_megatron_checkpoint_like_its_export_and_the_gate_decides(cpt, tmp_path, capsys):
    from hebtron.demo.minisuite import build_mini_suite
    from tests.test_eval_fixtures import write_demo_corpus

    build_mini_suite(write_demo_corpus(tmp_path / "data"), tmp_path / "eval")
    common = ["--suite", "hebrew-mini", "--tasks-dir", str(tmp_path / "eval" / "tasks"), "--device", "cpu",
              "--limit", "6"]
    mega, exported = tmp_path / "mega.json", tmp_path / "export.json"
    assert main(["eval", "run", "--checkpoint", str(cpt["ckpts"]), "--out", str(mega), *common]) == 0
    assert main(["eval", "run", "--checkpoint", str(cpt["export"]), "--out", str(exported), *common]) == 0
    ours, theirs = _metrics(mega), _metrics(exported)
    assert len(ours) == 12 and ours == theirs
    meta = json.loads(mega.read_text(encoding="utf-8"))["hebtron"]
    assert meta["checkpoint"] == str(cpt["step"]) and meta["step"] == 6 and meta["weights"] == str(cpt["step"] / "hf")

    policy = REPO / "eval" / "suites" / "hebrew-mini.gate.yaml"
    capsys.readouterr()
    assert main(["eval", "gate", "--candidate", str(mega), "--baseline", str(exported), "--policy", str(policy),
                 "--mark-keep"]) == 0
    assert "ACCEPT" in capsys.readouterr().out and (cpt["step"] / "KEEP").is_file()
    strict = yaml.safe_load(policy.read_text(encoding="utf-8"))
    strict["aggregate"] = {"min_gain": 0.5}  # the candidate must beat the baseline by 0.5: an equal one fails
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(strict), encoding="utf-8")
    assert main(["eval", "gate", "--candidate", str(mega), "--baseline", str(exported),
                 "--policy", str(tmp_path / "strict.yaml")]) == 1
    assert "REJECT" in capsys.readouterr().out


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def _renders_chatml(export: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "שלום"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == CHATML


def test_sft_starts_from_the_megatron_checkpoint_on_both_backends(cpt, tmp_path):
    from transformers import NemotronHForCausalLM

    from tests.sft_fixtures import chat_records, write_chat_jsonl, write_sft_recipe

    train = write_chat_jsonl(tmp_path / "train.jsonl", chat_records(64, seed=1, hi=3))
    valid = write_chat_jsonl(tmp_path / "valid.jsonl", chat_records(8, seed=2, hi=3))
    recipe = write_sft_recipe(tmp_path, tmp_path / "native", train, valid, cpt["ckpts"],
                              model={"hf_path": str(cpt["ckpts"])}, total_steps=2, eval_interval=0)
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    del data["tokenizer"]  # the checkpoint names the tokenizer its run used
    data["checkpoint"] = {"interval": 2, "keep_last": 1}
    recipe.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    assert main(["sft", str(recipe)]) == 0
    native = _losses(tmp_path / "native")
    _run([sys.executable, "-m", "hebtron.cli", "sft", str(recipe), "backend=megatron",
          f"logging.run_dir={tmp_path / 'mega'}"])  # with validation: packed SFT batches on Megatron too
    mega = _losses(tmp_path / "mega")
    assert sorted(native) == sorted(mega) == [1, 2]
    for step in (1, 2):  # the same starting weights and data on both engines
        assert abs(native[step] - mega[step]) < 2e-4 * native[step], (native, mega)

    for run in ("native", "mega"):
        export = tmp_path / f"{run}-export"
        assert main(["export", str(tmp_path / run / "checkpoints"), "--hf", str(export)]) == 0
        _renders_chatml(export)
    NemotronHForCausalLM.from_pretrained(str(tmp_path / "mega-export"))


def test_bad_megatron_inputs_get_one_line(cpt, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(cpt["step"] / "megatron", bare)
    capsys.readouterr()
    assert main(["convert", "megatron-to-hf", str(bare), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model-config" in err, err
    capsys.readouterr()
    assert main(["convert", "megatron-to-hf", str(bare), str(tmp_path / "out"),
                 "--model-config", str(cpt["step"] / "config.json")]) == 2  # no manifest vouches for its .metadata
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trust-checkpoint" in err and "pickle" in err, err
    assert main(["convert", "megatron-to-hf", str(bare), str(tmp_path / "out"),
                 "--model-config", str(cpt["step"] / "config.json"), "--trust-checkpoint"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "tokenizer.json").exists()

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (bare / ".metadata").write_bytes(pickle.dumps(Evil()))
    capsys.readouterr()
    assert main(["convert", "megatron-to-hf", str(bare), str(tmp_path / "x"), "--model-config",
                 str(cpt["step"] / "config.json"), "--trust-checkpoint"]) == 2  # trusted, still allow-listed
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to load" in err and "system" in err, err

    assert main(["convert", "megatron-to-hf", str(cpt["export"]), str(tmp_path / "y")]) == 2
    assert "not a Megatron checkpoint" in capsys.readouterr().err


def _megatron_logits(recipe: Path, step: Path, ids_file: Path, out: Path) -> None:
    """Megatron-Core's logits of checkpoint ``step`` (saved at tp=2), reloaded on one process at tp=1."""
    import torch

    from hebtron.backends.megatron import compat

    compat.apply()
    from safetensors.torch import save_file

    from hebtron.backends.megatron.batches import to_megatron, unflatten
    from hebtron.backends.megatron.config_map import ParallelPlan, settings_from_recipe
    from hebtron.backends.megatron.step import MegatronEngine
    from hebtron.model.config import HybridConfig
    from hebtron.recipe import load_recipe

    settings = settings_from_recipe(load_recipe(recipe))
    engine = MegatronEngine(HybridConfig.from_json_file(step / "config.json"), ParallelPlan(),
                            precision=settings.precision, balance=settings.balance, with_optimizer=False)
    engine.load_checkpoint(step / "megatron", with_optimizer=False)
    ids = torch.tensor(json.loads(ids_file.read_text(encoding="utf-8")))
    inputs = to_megatron({"input_ids": ids, "labels": ids, "loss_mask": torch.ones_like(ids)})
    with torch.no_grad():
        logits = unflatten(engine.logits(inputs), inputs)
    save_file({"logits": logits.contiguous()}, str(out))
    engine.close()


if __name__ == "__main__":
    if sys.argv[1] == "logits":
        _megatron_logits(*map(Path, sys.argv[2:6]))
