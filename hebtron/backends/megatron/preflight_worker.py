"""One preflight rank: real Megatron-Core steps on CPU over gloo (started by torchrun).

    python -m torch.distributed.run --nproc_per_node 2 -m hebtron.backends.megatron.preflight_worker SPEC.json

The spec (written by :mod:`.preflight`) holds the shrunk model, the parallel plan to train at
(``plan``), the plan to reshard to (``reshard``), precision, balancing and batch shape. Rank 0
writes ``result.json`` beside the spec: per check, ``ok`` and what was measured. A failed check
raises, so the process exits non-zero and the driver reports it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def synthetic_batch(vocab: int, rows: int, seq_len: int, packed: bool, seed: int) -> dict[str, torch.Tensor]:
    """Token rows with document boundaries (CPT windows) or packed conversations with prompt
    tokens masked (SFT), so the packed path (THD, seq_idx) is what runs."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (rows, seq_len + 1), generator=g)
    seq_idx = torch.zeros(rows, seq_len, dtype=torch.long)
    loss_mask = torch.ones(rows, seq_len, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(torch.randint(4, seq_len - 4, (2 if packed else 1,), generator=g).tolist())
        for c in cuts:
            seq_idx[r, c:] += 1
        if packed:  # the first quarter of each conversation is prompt: no loss
            starts = [0, *cuts]
            ends = [*cuts, seq_len]
            for s, e in zip(starts, ends):
                loss_mask[r, s : s + max(1, (e - s) // 4)] = 0
    position_ids = torch.zeros_like(seq_idx)
    for r in range(rows):
        for d in seq_idx[r].unique():
            where = (seq_idx[r] == d).nonzero().flatten()
            position_ids[r, where] = torch.arange(len(where))
    return {
        "input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": loss_mask,
        "seq_idx": seq_idx,
        "position_ids": position_ids,
    }


class Checks:
    """Ordered check results; rank 0 writes them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, detail: str, **values: Any) -> None:
        self.items.append({"check": name, "ok": bool(ok), "detail": detail, **values})
        if not ok:
            raise AssertionError(f"{name}: {detail}")


def _engine(spec: dict[str, Any], plan_key: str, with_optimizer: bool = True):
    from hebtron.backends.megatron.config_map import MoEBalance, ParallelPlan, Precision
    from hebtron.backends.megatron.step import MegatronEngine, OptimSettings
    from hebtron.model.config import HybridConfig

    cfg = HybridConfig.from_dict(spec["model"])
    bal = spec["balance"]
    return MegatronEngine(
        cfg,
        ParallelPlan(**spec[plan_key]),
        Precision(dtype=spec["precision"]),
        MoEBalance(tuple(bal["loss_types"]), tuple(bal["loss_coeffs"]), bal["z_loss_coeff"], bal["expert_bias"],
                   bal["bias_update_rate"]),
        OptimSettings(lr=spec["lr"], distributed_optimizer=spec["distributed_optimizer"]),
        seed=spec["seed"],
        with_optimizer=with_optimizer,
    )


def _batches(spec: dict[str, Any], engine: Any, step: int):
    rows = spec["micro_batch"] * spec["num_micro"] * engine.dp_size
    batch = synthetic_batch(spec["model"]["vocab_size"], rows, spec["seq_len"], spec["packed"], spec["seed"] + step)
    return engine.micro_inputs(engine.rank_rows(batch), spec["micro_batch"])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[bool, str]:
    if set(a) != set(b):
        return False, f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}"
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return worst == 0.0, f"max |difference| {worst:.3g} over {len(a)} tensors"


def _plan_text(plan: dict[str, Any]) -> str:
    return " ".join(f"{k}={plan[k]}" for k in ("dp", "tp", "ep", "pp") if plan.get(k) is not None)


def _export_roundtrip(cfg: Any, canon: dict[str, torch.Tensor], out: Path) -> tuple[bool, str]:
    """Megatron weights -> HF NemotronH directory -> read back -> Megatron layout: bit-exact."""
    from hebtron.backends.megatron.convert import hf_to_megatron, megatron_to_hf
    from hebtron.model.decoder import HybridModel
    from hebtron.model.hf import load_hf_state_dict, save_hf

    with torch.device("meta"):
        model = HybridModel(cfg)
    model.load_state_dict(megatron_to_hf(canon, cfg), strict=True, assign=True)
    save_hf(model, out)
    back = hf_to_megatron(load_hf_state_dict(out, cfg), cfg)
    same, detail = _same(canon, back)
    return same, f"written with save_hf and read back: {detail}"


def run(spec_path: Path) -> None:
    from hebtron.backends.megatron import compat

    compat.apply()
    from hebtron.backends.megatron.convert import hf_to_megatron
    from hebtron.model.config import HybridConfig
    from hebtron.model.decoder import HybridModel

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    checks = Checks()
    cfg = HybridConfig.from_dict(spec["model"])
    t0 = time.perf_counter()
    engine = _engine(spec, "plan")
    rank = engine.rank
    checks.add("build", True, f"{type(engine.modules[0]).__name__} ({cfg.num_hidden_layers} layers, "
               f"{cfg.num_parameters() / 1e6:.2f}M parameters) at {_plan_text(spec['plan'])} in {time.perf_counter() - t0:.1f}s")

    # shapes: the Megatron weights gathered from all ranks have exactly the layout the HF converter expects
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in hf_to_megatron(HybridModel(cfg).state_dict(), cfg).items()}
    got = {k: tuple(v.shape) for k, v in engine.gather_weights().items()}
    bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
    checks.add("shapes", not bad, f"{len(got)} tensors match the HF NemotronH layout" if not bad else
               f"{bad[0]}: Megatron {got.get(bad[0])} vs HF {expected.get(bad[0])}")

    losses: list[float] = []
    ckpt_root = Path(spec["workdir"])
    saved_weights: dict[str, torch.Tensor] = {}
    for step in range(spec["steps"]):
        if step == spec["steps"] - 1:  # checkpoint before the last step, to replay it after loading
            saved_weights = engine.gather_weights()
            engine.save_checkpoint(ckpt_root / "ckpt")
        t = time.perf_counter()
        result = engine.train_step(_batches(spec, engine, step), spec["lr"])
        ok = math.isfinite(result.loss) and math.isfinite(result.grad_norm) and not result.skipped
        losses.append(result.loss)
        checks.add(f"step {step + 1}", ok, f"loss {result.loss:.4f}, grad norm {result.grad_norm:.3f}, "
                   f"{result.loss_tokens} loss tokens, {time.perf_counter() - t:.1f}s", loss=result.loss)
    eval_sum, eval_tokens = engine.evaluate(_batches(spec, engine, 99))
    eval_loss = eval_sum / max(eval_tokens, 1)
    checks.add("evaluation", math.isfinite(eval_loss), f"forward-only loss {eval_loss:.4f} over {eval_tokens} tokens")

    # resume: reload model + optimizer state at the same plan and replay the last step
    engine.load_checkpoint(ckpt_root / "ckpt")
    replay = engine.train_step(_batches(spec, engine, spec["steps"] - 1), spec["lr"])
    checks.add("checkpoint resume", replay.loss == losses[-1],
               f"last step replayed from the checkpoint: loss {replay.loss:.6f} vs {losses[-1]:.6f}")
    engine.close()

    # reshard: load the same checkpoint at another tp / ep / pp; weights must be equal
    other = _engine(spec, "reshard", with_optimizer=False)
    other.load_checkpoint(ckpt_root / "ckpt", with_optimizer=False)
    same, detail = _same(saved_weights, other.gather_weights())
    checks.add("reshard", same, f"saved at {_plan_text(spec['plan'])}, loaded at {_plan_text(spec['reshard'])}: {detail}")
    if rank == 0:
        checks.add("HF export", *_export_roundtrip(cfg, saved_weights, ckpt_root / "hf"))
    other.close()
    if rank == 0:
        out = {"checks": checks.items, "losses": losses, "eval_loss": eval_loss}
        (spec_path.parent / "result.json").write_text(json.dumps(out, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: preflight_worker SPEC.json", file=sys.stderr)
        return 2
    run(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
