"""The native training step waits on the device nowhere: run it under a dispatch mode that fails
on every op that on a GPU needs the device's result on the host (``.item()``, ``bool()``,
``float()`` go through ``_local_scalar_dense``; ``nonzero``, ``masked_select`` and ``unique``
have data-dependent shapes). On CPU these ops are cheap, which is why only a check like this
one shows them; on a GPU each one stalls the launch queue.

Covered: the model forward and backward on packed rows (every layer type; attention on its
dense reference path, since FlexAttention has no CPU backward; the flex block mask is built
under the same mode), the chunked loss, the MoE aux losses and router figures, and the noise
probe. Not covered: the ``varlen`` path's one copy of the document boundaries to the host per
forward (``hebtron.model.attention._flat_segments``), and the copies a host tensor makes on its
way to the device (host data, nothing to wait for).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hebtron.backends.native import NativeBackend
from hebtron.backends.native_engine import accumulate_gradients
from hebtron.model import HybridConfig, HybridModel
from hebtron.model import attention as attn
from hebtron.train.engine import split_rows
from tests.conftest import TINY_CONFIGS
from tests.test_train_loop import _varied_batch

pytestmark = pytest.mark.usefixtures("one_thread")
_aten = torch.ops.aten
SYNCING = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
           _aten._unique2.default, _aten.unique_consecutive.default, _aten.unique_dim.default}


class NoHostSync(TorchDispatchMode):
    """Fails on a syncing op unless every tensor it reads is host data: the batch as collated, and
    what is computed from it alone. ``to_device`` stands in for the copy to the GPU: what comes
    out of it, like the parameters and everything computed from them, is device data."""

    def __init__(self, host: list[torch.Tensor]) -> None:
        super().__init__()
        self.host = {t.untyped_storage()._cdata for t in host}

    def _is_host(self, t: torch.Tensor) -> bool:
        return t.untyped_storage()._cdata in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        from_host = bool(tensors) and all(self._is_host(t) for t in tensors)
        if func in SYNCING and not from_host:
            raise AssertionError(f"{func} reads a device result on the host")
        out = func(*args, **(kwargs or {}))
        if from_host:
            self.host.update(t.untyped_storage()._cdata for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    def to_device(self, micro: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        moved = {k: v.clone() for k, v in micro.items()}
        for v in moved.values():
            self.host.discard(v.untyped_storage()._cdata)
        return moved


@pytest.mark.parametrize("name", ["all-types-grouped", "nano-like"])
def test_a_packed_step_never_reads_the_device_on_the_host(name, monkeypatch):
    from hebtron.backends.native_noise import GradientNoiseProbe
    from hebtron.backends import native_engine
    from hebtron.model import decoder
    from hebtron.train.engine import to_device as engine_to_device

    monkeypatch.setattr(decoder, "_on_host", lambda t: False)  # as on a GPU: the model's tensors are the device's

    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**TINY_CONFIGS[name]))
    model.attention_impl = "dense"
    backend = NativeBackend(1)
    batch = _varied_batch(model.config.vocab_size)
    micro = [split_rows(batch, s, s + 4) for s in range(0, 8, 4)]
    tokens = float(batch["loss_mask"].sum())  # the trainer counts them on the host batch
    probe = GradientNoiseProbe(model, backend)
    probe.begin_step(True)
    mode = NoHostSync([t for m in micro for t in m.values()])
    monkeypatch.setattr(native_engine, "to_device", lambda m, device: mode.to_device(engine_to_device(m, device)))
    with mode:
        loss = accumulate_gradients(model, micro, tokens, backend, noise=probe)
        attn.prepare_documents(mode.to_device({"s": batch["seq_idx"]})["s"], "flex")
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
