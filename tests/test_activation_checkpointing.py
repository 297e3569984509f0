"""Activation checkpointing applied from outside the model: the same gradients as the plain
run, and less memory held between forward and backward (full < selective < none), measured as
the bytes of the storages still alive after the forward (exact, no allocator involved)."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hebtron.backends.activation_checkpointing import apply_activation_checkpointing
from hebtron.model import HybridConfig, HybridModel
from hebtron.train.loss import token_loss_sum_from_hidden
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")


class LiveStorages(TorchDispatchMode):
    """Every storage an op creates while active (not those of ``existing`` tensors, e.g. the
    parameters, whose views ops return); ``live_bytes`` sums those still referenced."""

    def __init__(self, existing=()) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.existing = {t.untyped_storage()._cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage()._cdata not in self.existing:
                storage = t.untyped_storage()
                known = self.refs.get(storage._cdata)
                if known is None or known[0].expired():
                    self.refs[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.refs.values() if not ref.expired())


def _packed_rows(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, 96), generator=gen)
    seq_idx = torch.stack([torch.cat([torch.zeros(40), torch.ones(56)]), torch.cat([torch.zeros(70), torch.ones(26)])])
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "seq_idx": seq_idx.long(), "labels": ids.roll(-1, 1), "loss_mask": mask}


def _run(mode: str) -> tuple[int, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**TINY_CONFIGS["all-types-grouped"]))
    apply_activation_checkpointing(model, mode)
    batch = _packed_rows(model.config.vocab_size)
    tracker = LiveStorages([*model.parameters(), *model.buffers()])
    with tracker:
        hidden = model(batch["input_ids"], seq_idx=batch["seq_idx"], return_hidden=True).hidden
    held = tracker.live_bytes()
    loss = token_loss_sum_from_hidden(hidden, model.lm_head.weight, batch["labels"], batch["loss_mask"])
    loss.backward()
    return held, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_full_and_selective_give_the_plain_gradients_and_hold_less():
    held_none, grads_none = _run("none")
    held_selective, grads_selective = _run("selective")
    held_full, grads_full = _run("full")
    for name, grad in grads_none.items():
        for other in (grads_selective, grads_full):
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert held_full < held_selective < held_none, (held_full, held_selective, held_none)
    assert held_full < 0.35 * held_none, (held_full, held_none)  # the blocks keep only their inputs


def test_parameter_names_are_unchanged_and_evaluation_does_not_checkpoint():
    model = HybridModel(HybridConfig(**TINY_CONFIGS["nano-like"]))
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model, "full")
    assert [n for n, _ in model.named_parameters()] == names and set(model.state_dict()) >= set(names)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ValueError, match="expected one of none, full, selective"):
        apply_activation_checkpointing(model, "some")
