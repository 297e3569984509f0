"""Nothing executes from a data file: tokenizer directories with custom code and suite files.

A tokenizer directory whose ``tokenizer_config.json`` maps ``AutoTokenizer`` to a ``.py`` file
(``auto_map``) would make transformers ask "Do you wish to run the custom code? [y/N]" and, on
"y", run it. hebtron passes ``trust_remote_code=False`` explicitly, so the load fails in one line
and never asks, even with "y" waiting on standard input; ``--trust-remote-code`` is the only way
in, and using it here shows the payload is real (the test could fail). A suite file cannot turn
remote code on for ``hebtron eval run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hebtron.cli import main
from hebtron.data.tokenizer import train_tokenizer

PAYLOAD = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    text = root / "t.txt"
    text.write_text("\n".join(["שלום עולם, מה שלומך היום?", "hello world"] * 50), encoding="utf-8")
    train_tokenizer([text], 300, root / "plain")
    return root / "plain"


def _with_custom_code(plain: Path, where: Path, keep_local_class: bool) -> tuple[Path, Path]:
    """A copy of ``plain`` whose config maps AutoTokenizer to evil.py; (directory, marker)."""
    directory = where / "custom"
    directory.mkdir()
    for f in plain.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    marker = where / "payload-ran"
    (directory / "evil.py").write_text(PAYLOAD.format(marker=str(marker)), encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    if not keep_local_class:
        config["tokenizer_class"] = "EvilTokenizer"  # no class of transformers' own: only the file's code could load it
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return directory, marker


def _report(tokenizer: Path, text: Path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(text.parent / "modules"))
    return subprocess.run(
        [sys.executable, "-m", "hebtron.cli", *flags, "tokenizer", "report", str(tokenizer), "--text", str(text)],
        input="y\ny\n", capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_a_tokenizer_with_custom_code_fails_in_one_line_and_never_runs_it(plain_tokenizer, tmp_path):
    directory, marker = _with_custom_code(plain_tokenizer, tmp_path, keep_local_class=False)
    text = tmp_path / "t.txt"
    text.write_text("שלום עולם\n", encoding="utf-8")

    refused = _report(directory, text)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert str(directory) in refused.stderr and "--trust-remote-code" in refused.stderr, refused.stderr
    assert "[y/N]" not in refused.stdout + refused.stderr  # never asked
    assert not marker.exists()

    trusted = _report(directory, text, "--trust-remote-code")  # the payload is real: opting in runs it
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.read_text() == "ran"


def test_custom_code_beside_a_known_class_is_ignored(plain_tokenizer, tmp_path, capsys):
    """An auto_map next to transformers' own tokenizer class: the own class loads, the file stays unread."""
    directory, marker = _with_custom_code(plain_tokenizer, tmp_path, keep_local_class=True)
    text = tmp_path / "t.txt"
    text.write_text("שלום עולם\n", encoding="utf-8")
    assert main(["tokenizer", "report", str(directory), "--text", str(text)]) == 0
    assert not marker.exists()


def test_a_suite_file_cannot_turn_on_remote_code(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ntasks: [x]\nmodel_args: {trust_remote_code: true}\n", encoding="utf-8")
    code = main(["eval", "run", "--suite", str(suite), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and str(suite) in err and "model_args" in err and "--trust-remote-code" in err, err


# --------------------------------------------------------------- distributed-checkpoint pickles
class _Payload:
    """Unpickled, it writes ``marker``: proof that a load ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def _crafted_megatron_dir(where: Path) -> tuple[Path, Path]:
    import pickle

    directory = where / "crafted"
    directory.mkdir()
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}), encoding="utf-8")
    marker = where / "metadata-payload-ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return directory, marker


def _convert(directory: Path, where: Path, *flags: str) -> subprocess.CompletedProcess:
    from hebtron.model.config import HybridConfig

    from tests.conftest import TINY_CONFIGS

    config = where / "config.json"
    config.write_text(json.dumps(HybridConfig(**TINY_CONFIGS["nano-like"]).to_hf_dict()), encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "hebtron.cli", *flags, "convert", "megatron-to-hf", str(directory), str(where / "out"),
         "--model-config", str(config)],
        input="y\ny\n", capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_a_crafted_dcp_metadata_fails_in_one_line_and_its_payload_never_runs(tmp_path):
    directory, marker = _crafted_megatron_dir(tmp_path)
    refused = _convert(directory, tmp_path)  # no hebtron manifest vouches for it: not even opened as a pickle
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "--trust-checkpoint" in refused.stderr, refused.stderr
    assert str(directory / ".metadata") in refused.stderr and "pickle" in refused.stderr, refused.stderr
    assert not marker.exists()

    trusted = _convert(directory, tmp_path, "--trust-checkpoint")  # trusted, it still goes through the allow-list
    assert trusted.returncode == 2, trusted.stderr
    assert trusted.stderr.count("\n") == 1 and "refusing to load" in trusted.stderr, trusted.stderr
    assert not marker.exists()


def test_dcp_metadata_changed_after_hebtron_wrote_it_is_refused(tmp_path):
    """A checkpoint hebtron wrote vouches for its ``.metadata`` by sha256; swapped bytes are refused."""
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp

    from hebtron.checkpoints import write_manifest
    from hebtron.errors import CheckpointError
    from hebtron.train.dcp_safe import read_metadata

    step = tmp_path / "step_00000001"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(step / "dcp"), no_dist=True)
    (step / "trainer_state.json").write_text('{"step": 1, "extra": {}}', encoding="utf-8")
    manifest = write_manifest(step, 1)
    assert list(manifest["sha256"]) == ["dcp/.metadata"]
    assert "w" in read_metadata(step / "dcp").state_dict_metadata  # vouched: read

    marker = tmp_path / "ran"
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="sha256 differs") as err:
        read_metadata(step / "dcp")
    assert "\n" not in str(err.value) and not marker.exists()
    pickle.loads((step / "dcp" / ".metadata").read_bytes())  # the payload is real: a plain unpickling runs it
    assert marker.read_text() == "ran"
