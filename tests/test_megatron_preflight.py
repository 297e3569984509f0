"""``hebtron preflight`` end to end on a real Nemotron 3 Nano recipe (52-layer pattern, packed SFT,
expert parallelism), and the one-line error for a plan that does not fit the cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # Megatron preflight of a real Nano recipe
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _preflight(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hebtron.cli", "preflight", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_preflight_passes_on_a_nano_recipe():
    proc = _preflight("recipes/nemotron3-nano/sft-b300.yaml", "--gpus", "8", "--steps", "2", "--json")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"]
    names = [c["check"] for c in report["checks"]]
    for needed in ("cluster plan", "shapes", "step 1", "step 2", "checkpoint resume", "reshard", "HF export"):
        assert needed in names, names
    assert "52 layers" in report["checks"][0]["detail"]


def test_preflight_rejects_a_plan_that_does_not_fit_with_one_line():
    proc = _preflight("recipes/nemotron3-nano/cpt-h200.yaml", "--gpus", "8", timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: recipes/nemotron3-nano/cpt-h200.yaml: parallel: dp x tp x pp x cp = 8 x 2 x 1 x 1 = "
                     "16 GPUs, but the cluster has 8"], proc.stderr
