"""hebtron data mix-search: the regression and its minimum on analytic losses, the spec's errors,
the Slurm array script, and one small real search (4 proxy runs through `hebtron train`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from hebtron.cli import main
from hebtron.launch.mix.proxies import ProxyRun
from hebtron.launch.mix.regression import choose, minimise, project, top_k_mean
from hebtron.launch.mix.slurm_array import render_array
from hebtron.recipe import load_recipe
from tests.train_fixtures import build_training_fixture, write_recipe


def test_linear_losses_pick_linear_and_the_bounded_vertex():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), size=16)
    slopes = np.array([3.0, 2.0, 2.5])
    y = w @ slopes + rng.normal(0, 1e-3, 16)
    best, fits = choose(w, y, "auto")
    assert {f.kind for f in fits} == {"linear", "quadratic"}
    assert best.loo_spearman > 0.98
    lower, upper = np.array([0.1, 0.0, 0.1]), np.array([1.0, 0.7, 1.0])
    proposal = minimise(best, lower, upper, np.vstack([np.full(3, 1 / 3), w]))
    # analytic: as much of source 1 as allowed (0.7), the rest to the cheaper of the others, at its minimum
    assert proposal == pytest.approx([0.1, 0.7, 0.2], abs=0.01)


def test_quadratic_losses_find_the_interior_minimum():
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(3), size=20)
    target = np.array([0.5, 0.3, 0.2])
    y = 4.0 + ((w - target) ** 2).sum(axis=1)
    best, _ = choose(w, y, "auto")
    assert best.kind == "quadratic" and best.loo_spearman > 0.95
    proposal = minimise(best, np.zeros(3), np.ones(3), np.full((1, 3), 1 / 3))
    assert proposal == pytest.approx(target, abs=0.03)


def test_top_k_mean_finds_the_interior_minimum_and_stays_off_the_corners():
    """RegMix's proposal: near an interior minimum like the argmin; for a linear fit, whose argmin is
    a corner of the bounds, it leans the same way but stays where the prior's draws lie."""
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(3), size=20)
    target = np.array([0.5, 0.3, 0.2])
    bowl, _ = choose(w, 4.0 + ((w - target) ** 2).sum(axis=1), "quadratic")
    assert top_k_mean(bowl, np.zeros(3), np.ones(3), 1.0, 0, top=100) == pytest.approx(target, abs=0.05)

    line, _ = choose(w, w @ np.array([3.0, 2.0, 2.5]), "linear")
    lower, upper = np.array([0.1, 0.0, 0.1]), np.array([1.0, 0.7, 1.0])
    p = top_k_mean(line, lower, upper, 1.0, 0, top=100)
    assert p.sum() == pytest.approx(1.0) and np.all(p >= lower) and np.all(p <= upper)
    assert p[1] == max(p) and p[1] < 0.7 - 1e-3 and p[0] < p[2]  # towards the cheap source, short of the vertex
    assert np.array_equal(p, top_k_mean(line, lower, upper, 1.0, 0, top=100))  # seeded


def test_project_onto_the_bounded_simplex():
    p = project(np.array([0.9, 0.9, -0.3]), np.array([0.0, 0.0, 0.1]), np.array([0.6, 1.0, 1.0]))
    assert p.sum() == pytest.approx(1.0) and p[0] <= 0.6 + 1e-9 and p[2] >= 0.1 - 1e-9


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return build_training_fixture(tmp_path_factory.mktemp("mixfix"))


def _spec(tmp: Path, fixture: Path, **search) -> Path:
    proxy = write_recipe(fixture, tmp / "proxy_run", total_steps=6, eval_interval=0, eval_batches=1)
    tree = {
        "proxy": {"recipe": str(proxy), "overrides": ["checkpoint.interval=0", "logging.tensorboard=false"]},
        "sources": [{"name": "he", "path": str(fixture / "data" / "he_train"), "lang": "he", "min": 0.1},
                    {"name": "en", "path": str(fixture / "data" / "en_train"), "lang": "en", "min": 0.1}],
        "targets": [{"name": "he_target", "path": str(fixture / "data" / "he_valid"), "lang": "he"}],
        "search": {"runs": 4, "seed": 0, "model": "linear", **search},
    }
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, expected", [
    ({"search": {"runs": 2}}, "search.runs"),
    ({"sources": [{"name": "a", "path": "nope"}, {"name": "b", "path": "nope"}]}, "sources.0.path: no indexed dataset"),
    ({"bogus": 1}, "bogus"),
])
def test_spec_errors_are_one_line(tmp_path, fixture_dir, capsys, edit, expected):
    path = _spec(tmp_path, fixture_dir)
    tree = yaml.safe_load(path.read_text())
    tree.update(edit)
    path.write_text(yaml.safe_dump(tree))
    assert main(["data", "mix-search", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and str(path) in err


def test_slurm_array_script_quotes_every_value(tmp_path):
    runs = [ProxyRun(f"proxy_{i:02d}", {}, tmp_path / "it's; $(rm -rf x)" / f"proxy_{i:02d}") for i in range(3)]
    script = render_array("local", runs, ["train.lr=1e-3"], tmp_path)
    assert "#SBATCH --array=0-2" in script
    assert "'" + str(tmp_path) + "/it'\"'\"'s; $(rm -rf x)/proxy_00'" in script
    if shutil.which("shellcheck"):
        path = tmp_path / "array.sbatch"
        path.write_text(script)
        done = subprocess.run(["shellcheck", "-S", "warning", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


@pytest.mark.slow
def test_small_search_end_to_end_and_resume(tmp_path, fixture_dir, capsys):
    spec = _spec(tmp_path, fixture_dir)
    out = tmp_path / "search"
    assert main(["data", "mix-search", str(spec), "--out", str(out), "--parallel", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 4 and all(np.isfinite(r["objective"]) for r in report["runs"])
    weights = report["proposal"]["weights"]
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6) and min(weights.values()) >= 0.1 - 1e-6
    assert "held-out (leave-one-out) Spearman" in (out / "report.md").read_text()
    # the fragment is a usable parent: a recipe that extends it trains on the proposed weights
    child = tmp_path / "child.yaml"
    proxy_recipe = yaml.safe_load(Path(yaml.safe_load(spec.read_text())["proxy"]["recipe"]).read_text())
    proxy_recipe["data"].pop("sources")
    child.write_text(yaml.safe_dump({"extends": str(out / "proposal.yaml"), **proxy_recipe}))
    recipe = load_recipe(child)
    assert {s.name: s.weight for s in recipe.data.sources} == pytest.approx(
        {k: v for k, v in weights.items() if v > 1e-6})
    # resume: nothing is trained again, the same plan and results come back
    mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    capsys.readouterr()
    assert main(["data", "mix-search", str(spec), "--out", str(out)]) == 0
    assert "to train" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")} == mtimes
    # a different plan in the same directory is refused
    tree = yaml.safe_load(spec.read_text())
    tree["search"]["seed"] = 5
    spec.write_text(yaml.safe_dump(tree))
    assert main(["data", "mix-search", str(spec), "--out", str(out)]) == 2
