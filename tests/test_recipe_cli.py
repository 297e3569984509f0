"""``hebtron recipe show|schema`` as a user runs them: exit codes, one-line errors, no tracebacks.

The commands run in this process through ``hebtron.cli.main`` (what the ``hebtron`` script and
``python -m hebtron.cli`` call), with stdout and stderr captured; an exception that escapes
``main`` fails the test like a traceback would. One test runs the real ``python -m hebtron.cli``.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hebtron.cli import main
from tests.test_recipe_helpers import valid_tree, write_recipe

REPO = Path(__file__).resolve().parents[1]


def hebtron(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return subprocess.CompletedProcess(["hebtron", *args], code, out.getvalue(), err.getvalue())


def test_show_prints_the_resolved_recipe(tmp_path: Path) -> None:
    path = write_recipe(tmp_path)
    run = hebtron("recipe", "show", str(path), "train.lr=2e-4", "data.phases=null", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    shown = yaml.safe_load(run.stdout)
    assert shown["train"]["lr"] == 2e-4 and shown["data"]["phases"] == []
    assert shown["data"]["sources"][0]["path"] == str(tmp_path / "data" / "he")
    assert shown["checkpoint"]["dir"] == str(tmp_path / "out" / "checkpoints")


def test_show_demo_recipe_before_its_data_exists() -> None:
    run = hebtron("recipe", "show", "recipes/demo/cpt.yaml", "--no-check-paths")
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["model"]["init"]["hybrid_override_pattern"] == "M*EM-E"


@pytest.mark.parametrize(
    ("field", "value", "overrides", "expected"),
    [
        ("train.lrr", 1e-3, [], "train.lrr: unknown key; did you mean 'lr'?"),
        ("data.seq_len", "long", [], "data.seq_len: expected an integer, got 'long'"),
        ("train.lr", -0.1, [], "train.lr: must be > 0, got -0.1"),
        ("train.micro_batch", 3, [], "train.micro_batch x parallel.dp = 3 x 1 must divide train.global_batch (8)"),
        ("data.sources.0.path", "data/gone", [], "data.sources[0].path: indexed dataset (.bin + .idx) 'data/gone'"),
        (None, None, ["train.lr"], "override 'train.lr': expected key=value"),
    ],
)
def test_bad_recipe_exits_2_with_one_line(
    tmp_path: Path, field: str | None, value: object, overrides: list[str], expected: str
) -> None:
    tree = valid_tree()
    if field is not None:
        *parents, last = field.split(".")
        node = tree
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    path = write_recipe(tmp_path, tree)
    run = hebtron("recipe", "show", str(path), *overrides)
    assert run.returncode == 2
    assert run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr
    line = run.stderr.rstrip("\n")
    prefix = "error: " if overrides else f"error: {path}: "
    assert line.startswith(prefix + expected), line


def test_yaml_syntax_error_exits_2_naming_the_line(tmp_path: Path) -> None:
    path = write_recipe(tmp_path)
    path.write_text(path.read_text() + "train: [\n")
    run = hebtron("recipe", "show", str(path))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: {path}:") and "YAML" in run.stderr and run.stderr.count("\n") == 1


def test_schema_is_json_for_editors() -> None:
    run = hebtron("recipe", "schema")
    assert run.returncode == 0, run.stderr
    schema = json.loads(run.stdout)
    assert "extends" in schema["properties"] and "train" in schema["properties"]


def test_python_m_hebtron_cli_is_the_same_command(tmp_path: Path) -> None:
    """The module entry point in a real process: exit code 2 and one line for a bad recipe."""
    path = write_recipe(tmp_path)
    path.write_text(path.read_text() + "train: [\n")
    run = subprocess.run([sys.executable, "-m", "hebtron.cli", "recipe", "show", str(path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith(f"error: {path}:") and run.stderr.count("\n") == 1


def test_a_typo_in_model_init_is_named_with_the_override(tmp_path: Path, capsys) -> None:
    """Unknown keys under model.init were once kept silently as HF extras (the default then won)."""
    path = write_recipe(tmp_path)
    assert main(["recipe", "show", str(path), "model.init.hiden_size=64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "override 'model.init.hiden_size=64'" in err, err
    assert "model.init.hiden_size" in err and "did you mean 'hidden_size'?" in err, err
