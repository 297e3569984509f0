"""Packed SFT is exact: a packed batch's loss and gradients, through the training loop's own
accumulation, equal those of the same conversations run one by one, unpacked (fp32, a model
with Mamba2, attention, MLP and MoE layers). Without the document boundaries they do not."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from hebtron.backends.native import NativeBackend
from hebtron.data.chat import encode_chat
from hebtron.data.packing import Encoded, collate, pack
from hebtron.model import HybridConfig, HybridModel
from hebtron.backends.native_engine import accumulate_gradients
from hebtron.train.engine import split_rows
from tests.conftest import TINY_CONFIGS
from tests.sft_fixtures import build_chat_tokenizer, conversation

SEQ_LEN = 128
TOLERANCE = 1e-5  # relative, fp32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(build_chat_tokenizer(tmp_path_factory.mktemp("exact-tok")))
    rng = random.Random(0)
    examples = []
    while len(examples) < 12:
        ids, mask = encode_chat(conversation(rng, hi=3), tok)
        if len(ids) <= SEQ_LEN:
            examples.append(Encoded(ids, mask, lang=0))
    rows = pack(examples, SEQ_LEN, pad_id=tok.pad_token_id)
    assert len(rows) >= 3 and sum(r.doc_lens.size >= 2 for r in rows) >= 3  # really packed
    torch.manual_seed(0)
    config = HybridConfig(**{**TINY_CONFIGS["all-types-grouped"], "vocab_size": len(tok)})
    assert {"mamba", "attention", "mlp", "moe"} <= set(config.layer_types)
    return HybridModel(config), examples, rows


def _packed(model, rows, mode: str, keep_boundaries: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients the way the loop computes them: global normalizer, micro-batches of 2 rows."""
    batch = collate(rows, mode)
    if not keep_boundaries:  # what a packer that forgets seq_idx (and position_ids) hands the model
        batch = {k: v for k, v in batch.items() if k not in ("seq_idx", "position_ids")}
    norm = float(batch["loss_mask"].double().sum())
    micro = [split_rows(batch, s, s + 2) for s in range(0, len(rows), 2)]
    model.zero_grad()
    total = accumulate_gradients(model, micro, norm, NativeBackend(1))
    return float(total) / norm, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _unpacked(model, examples, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Each conversation alone (no seq_idx, no packing), losses combined by the same rule."""
    weights = [1.0 / int(e.assistant_mask[1:].sum()) if mode == "sample" else 1.0 for e in examples]
    norm = len(examples) if mode == "sample" else sum(int(e.assistant_mask[1:].sum()) for e in examples)
    model.zero_grad()
    total = 0.0
    for e, w in zip(examples, weights, strict=True):
        ids = torch.from_numpy(e.input_ids.astype("int64"))
        logits = model(ids[None]).logits[0, :-1]
        target = torch.from_numpy(e.assistant_mask[1:])
        loss = F.cross_entropy(logits[target], ids[1:][target], reduction="sum") * w
        (loss / norm).backward()
        total += float(loss.detach())
    return total / norm, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worst_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).norm().item() / max(b[n].norm().item(), 1e-30), n) for n in b)


@pytest.mark.parametrize("mode", ["token", "sample"])
def test_packed_loss_and_gradients_equal_unpacked(setup, mode):
    model, examples, rows = setup
    loss_p, grads_p = _packed(model, rows, mode)
    loss_u, grads_u = _unpacked(model, examples, mode)
    assert abs(loss_p - loss_u) / loss_u <= TOLERANCE, (loss_p, loss_u)
    worst, name = _worst_relative(grads_p, grads_u)
    assert worst <= TOLERANCE, f"{name}: relative gradient error {worst:.2e}"


def test_without_document_boundaries_the_comparison_fails(setup):
    """Withholding seq_idx (and position_ids, from which hebtron's model would rebuild it)
    lets later conversations see earlier ones through attention and Mamba state."""
    model, examples, rows = setup
    loss_p, grads_p = _packed(model, rows, "token", keep_boundaries=False)
    loss_u, grads_u = _unpacked(model, examples, "token")
    worst, name = _worst_relative(grads_p, grads_u)
    assert worst > 1e-2, f"{name}: {worst:.2e}"  # the comparison above fails by orders of magnitude
    # at initialization the loss moves little (logits are nearly uniform), but still far beyond
    # float noise (~1e-9 with the boundaries)
    assert abs(loss_p - loss_u) / loss_u > 1e-7
