"""``bench/gpu_smoke.py --cpu-tiny``: the GPU smoke script's stages at toy sizes on CPU, so the
script that proves the GPU path cannot rot between the runs on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_passes_at_toy_sizes(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_smoke.py"), "--cpu-tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(out.read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["env", "mamba kernels", "attention", "experts", "loss", "train", "resume"]
    assert report["ok"] and all(s["ok"] for s in stages.values()), report
    assert stages["mamba kernels"]["documents"][:5] == [1, 37, 13, 29, 50]
    assert set(stages["attention"]) >= {"segments float32", "flex float32"}
    assert stages["train"]["last loss"] < stages["train"]["first loss"]
    assert stages["resume"]["replayed loss"] == stages["resume"]["original loss"]
    assert "all ok" in proc.stdout


def test_without_cuda_and_without_the_flag_it_says_so_in_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_smoke.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no CUDA device; run with --cpu-tiny for the toy-size version"
