"""FSDP2 on 2 gloo ranks against one process, for the native backend's noise probe, precision
and memory controls:

- 2 ranks give one process's gradients (the loss divided by the global count of loss tokens);
- by default each rank's gradient is one unit of the noise probe (read at the reduce-scatter),
  and 2 ranks measure what one process measures over the same two 4-row micro-batches;

- sharded gradient accumulation (a reduce-scatter after every micro-batch) gives the gradients
  of the default (one reduce-scatter per step), and the noise probe still measures: its units
  become the ranks' micro-batches, so the estimate equals one process's over the same 4
  micro-batches;
- ``precision: bf16`` keeps fp32 master weights (the shards AdamW steps) while forward and
  backward run on bf16 copies (``MixedPrecisionPolicy``), with gradients reduced and kept in
  fp32; it trains (the loss falls) with the losses of one process's autocast within bf16 noise,
  here with full activation checkpointing on every block as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_fixtures import run_two_ranks

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # torchrun ranks

SCRIPT = r"""
import json, math, sys
import torch
sys.path.insert(0, sys.argv[2])
from hebtron.backends.native import NativeBackend
from hebtron.backends.native_engine import accumulate_gradients
from hebtron.backends.native_noise import GradientNoiseProbe
from hebtron.model import HybridConfig, HybridModel
from hebtron.train.engine import split_rows
from hebtron.train.optim import build_adamw, clip_grad_norm
from tests.conftest import TINY_CONFIGS
from tests.test_train_loop import _varied_batch

world = int(sys.argv[3])
config = HybridConfig(**TINY_CONFIGS["all-types-grouped"])
batch = _varied_batch(config.vocab_size)
tokens = float(batch["loss_mask"].sum())
backend = NativeBackend(world)
rows = 8 // world
micro = [split_rows(batch, s, s + 2) for s in range(backend.rank * rows, (backend.rank + 1) * rows, 2)]

def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

out = {}
torch.manual_seed(0)
model = backend.wrap(HybridModel(config))
probe = GradientNoiseProbe(model, backend)

def measured_step(micro=micro):
    probe.begin_step(True)
    accumulate_gradients(model, micro, tokens, backend, noise=probe)
    m = probe.measurement(tokens, clip_grad_norm(model.parameters(), math.inf))
    grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return m.__dict__, grads

out["default"], default_grads = measured_step()
if backend.rank == 0:
    from safetensors.torch import save_file
    save_file({n: g.contiguous() for n, g in default_grads.items()}, sys.argv[1] + ".grads")
if world == 1:  # the units of 2 ranks by default: 2 x 4 rows
    out["rank units"], _ = measured_step([split_rows(batch, s, s + 4) for s in (0, 4)])
backend.sharded_accumulation = backend.sharded
out["sharded"], sharded_grads = measured_step()
out["grad_max_rel_diff"] = max(float((sharded_grads[n] - g).norm() / g.norm().clamp_min(1e-30))
                               for n, g in default_grads.items())

torch.manual_seed(0)
backend.sharded_accumulation = False
model = backend.wrap(HybridModel(config), precision="bf16", activation_checkpointing="full")
seen = []
model.backbone.layers[0].register_forward_pre_hook(lambda m, a: seen.append(str(m.norm.weight.dtype)))
optimizer = build_adamw(model, 3e-3)
losses = []
for _ in range(6):
    loss = accumulate_gradients(model, micro, tokens, backend, precision="bf16")
    losses.append(float(backend.all_reduce_sum(loss)) / tokens)
    grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters()})
    clip_grad_norm(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
out["bf16"] = {"losses": losses, "master": sorted({str(p.dtype) for p in model.parameters()}),
               "optimizer_state": sorted({str(v.dtype) for s in optimizer.state.values() for k, v in s.items()
                                          if k != "step"}),
               "grads": grad_dtypes, "forward_weights": sorted(set(seen))}
if backend.rank == 0:
    open(sys.argv[1], "w").write(json.dumps(out))
backend.close()
"""


def test_sharded_accumulation_and_bf16_compute_over_fp32_master_weights(tmp_path):
    script = tmp_path / "fsdp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.json"), str(REPO), "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_two_ranks(script, str(tmp_path / "two.json"), str(REPO), "2")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())

    for key in ("g_small_sq", "g_big_sq", "b_small", "b_big"):  # the same estimate whatever the number of ranks
        assert b["default"][key] == pytest.approx(a["rank units"][key], rel=1e-4), key
    assert a["default"]["g_small_sq"] > a["default"]["g_big_sq"] > 0  # a smaller batch has a noisier gradient
    from safetensors.torch import load_file

    one_grads, two_grads = load_file(str(tmp_path / "one.json.grads")), load_file(str(tmp_path / "two.json.grads"))
    assert one_grads.keys() == two_grads.keys()
    for name, grad in one_grads.items():  # 2 FSDP ranks x 2 micro-batches: one process's gradient
        torch.testing.assert_close(two_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert b["grad_max_rel_diff"] < 1e-5, b["grad_max_rel_diff"]
    for key in ("g_small_sq", "g_big_sq", "b_small", "b_big"):  # 4 micro-batch units, as one process
        assert b["sharded"][key] == pytest.approx(a["default"][key], rel=1e-4), key
    assert b["default"]["b_small"] == 2 * a["default"]["b_small"]  # by default each rank is one unit

    one_bf16, two_bf16 = a["bf16"], b["bf16"]
    assert two_bf16["master"] == two_bf16["optimizer_state"] == two_bf16["grads"] == ["torch.float32"], two_bf16
    assert two_bf16["forward_weights"] == ["torch.bfloat16"], two_bf16  # MixedPrecisionPolicy's bf16 copies
    assert one_bf16["forward_weights"] == ["torch.float32"]  # one process: fp32 weights under autocast
    losses = two_bf16["losses"]
    assert losses[-1] < losses[0] - 0.05, losses
    for mine, theirs in zip(losses, one_bf16["losses"], strict=True):
        assert mine == pytest.approx(theirs, rel=2e-2), (losses, one_bf16["losses"])
