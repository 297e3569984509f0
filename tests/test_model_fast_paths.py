"""The fast paths equal their references (fp32, CPU): document attention without a dense mask
(per-document SDPA, FlexAttention's block mask, the varlen glue), grouped-GEMM experts vs the
per-expert loop, and the chunked head + cross-entropy vs full logits. Each comparison is also
shown to fail when the thing it guards is broken (plain causal masks, a host sync)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.nn.attention.flex_attention import create_block_mask

from hebtron.kernels.chunked_ce import chunked_linear_cross_entropy, linear_cross_entropy_reference
from hebtron.model import HybridConfig, HybridModel
from hebtron.model import attention as attn
from hebtron.model import decoder
from hebtron.model.moe import MoE
from hebtron.train.loss import token_loss_sum, token_loss_sum_from_hidden
from tests.conftest import TINY_CONFIGS

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # eager flex on CPU (tests only: skips a ~20 s compile per shape) warns that it is unfused
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

LENGTHS = [[13, 29, 7, 21], [40, 5, 25]]  # two rows of 70 tokens, documents crossing chunk boundaries
LOGIT_TOL = 1e-5
GRAD_TOL = 1e-4  # relative (norm of the difference / norm of the reference), per parameter


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seqlen = sum(LENGTHS[0])
    ids = torch.randint(0, vocab, (len(LENGTHS), seqlen), generator=gen)
    seq_idx = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in LENGTHS])
    labels = torch.where(seq_idx[:, 1:] == seq_idx[:, :-1], ids[:, 1:], -100)
    labels = torch.cat([labels, torch.full((len(LENGTHS), 1), -100)], dim=1)
    labels[0, 3:9] = -100  # prompt tokens: no loss
    loss_mask = (labels != -100).float() * torch.rand(labels.shape, generator=gen)  # float weights (SFT sample mode)
    return {"input_ids": ids, "seq_idx": seq_idx, "labels": labels, "loss_mask": loss_mask}


def _set_experts(model: HybridModel, grouped: bool) -> None:
    for module in model.modules():
        if isinstance(module, MoE):
            module.experts.grouped = grouped


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).norm().item() / max(b[n].norm().item(), 1e-30), n) for n in b)


def _model(name: str) -> HybridModel:
    torch.manual_seed(0)
    return HybridModel(HybridConfig(**TINY_CONFIGS[name]))


# ------------------------------------------------------------------------- the whole model
def _step(model: HybridModel, batch: dict[str, torch.Tensor], fast: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits, summed loss and gradients: the new paths (auto attention, grouped experts, chunked
    loss in chunks of 16 tokens) or the references (dense mask, expert loop, full logits)."""
    model.attention_impl = "auto" if fast else "dense"
    _set_experts(model, grouped=fast)
    model.zero_grad()
    with torch.no_grad():
        logits = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
    if fast:
        hidden = model(batch["input_ids"], seq_idx=batch["seq_idx"], return_hidden=True).hidden
        loss = token_loss_sum_from_hidden(hidden, model.lm_head.weight, batch["labels"], batch["loss_mask"], chunk_size=16)
    else:
        out = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
        loss = token_loss_sum(out, batch["labels"], batch["loss_mask"])
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_fast_paths_equal_references_on_packed_rows(name: str):
    model = _model(name)
    assert {"mamba", "attention", "moe"} <= set(model.config.layer_types)
    batch = _batch(model.config.vocab_size)
    assert attn.attention_path(torch.device("cpu"), torch.float32, 16, True) == "segments"
    logits_f, loss_f, grads_f = _step(model, batch, fast=True)
    logits_r, loss_r, grads_r = _step(model, batch, fast=False)
    assert (logits_f - logits_r).abs().max().item() <= LOGIT_TOL
    assert abs(loss_f.item() - loss_r.item()) <= 1e-6 * abs(loss_r.item())
    worst, param = _relative(grads_f, grads_r)
    assert worst <= GRAD_TOL, f"{param}: relative gradient error {worst:.2e}"


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_attention_paths_equal_dense_mask(name: str, monkeypatch):
    """Per-document SDPA (the CPU training path) and FlexAttention (forward: torch has no flex
    backward on CPU; eager here, the same block mask and mask_mod a GPU compiles) vs the dense mask."""
    monkeypatch.setattr(attn, "flex_compiled", False)
    model = _model(name)
    batch = _batch(model.config.vocab_size)
    out = {}
    for impl in ("dense", "segments", "flex"):
        model.attention_impl = impl
        with torch.no_grad():
            out[impl] = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
    for impl in ("segments", "flex"):
        assert (out[impl] - out["dense"]).abs().max().item() <= LOGIT_TOL, impl


def test_plain_causal_masks_fail_the_comparison(monkeypatch):
    """The comparison above can fail: with every row one document (the mask plain causal), the
    segment and flex paths let later documents see earlier ones."""
    monkeypatch.setattr(attn, "flex_compiled", False)
    model = _model("all-types-grouped")
    batch = _batch(model.config.vocab_size)
    model.attention_impl = "dense"
    with torch.no_grad():
        reference = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
    monkeypatch.setattr(attn, "document_runs", lambda seq_idx: torch.zeros_like(seq_idx))
    for impl in ("segments", "flex"):
        model.attention_impl = impl
        with torch.no_grad():
            leaky = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
        assert (leaky - reference).abs().max().item() > 1e-3, impl


@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_document_block_mask_equals_create_block_mask(block_size: int):
    """The block mask built from block-level run extremes (no dense mask, no compile) is the one
    torch's create_block_mask finds by evaluating the mask everywhere: same live and full blocks."""
    for trial in range(12):
        gen = torch.Generator().manual_seed(trial)
        seqlen = int(torch.randint(1, 300, (1,), generator=gen))
        docs = int(torch.randint(1, 9, (1,), generator=gen))
        seq_idx = torch.sort(torch.randint(0, docs, (3, seqlen), generator=gen), dim=1).values
        runs = attn.document_runs(seq_idx)
        ours = attn.document_block_mask(runs, block_size)
        ref = create_block_mask(lambda b, h, q, kv: (runs[b, q] == runs[b, kv]) & (kv <= q), 3, None, seqlen, seqlen,
                                device="cpu", BLOCK_SIZE=block_size)
        for field in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
            assert torch.equal(getattr(ours, field), getattr(ref, field)), (trial, field)
        assert torch.equal(ours.to_dense(), ref.to_dense()), trial
        for indices, counts in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks")):
            n = getattr(ours, counts)
            for row in range(3):
                for q_block in range(n.shape[-1]):
                    k = int(n[row, 0, q_block])
                    mine = sorted(getattr(ours, indices)[row, 0, q_block, :k].tolist())
                    assert mine == sorted(getattr(ref, indices)[row, 0, q_block, :k].tolist()), (trial, indices)


def test_document_runs_split_where_seq_idx_changes():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 7, 7], [3, 3, 0, 0, 3, 3]])
    assert attn.document_runs(seq_idx).tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 2, 2]]


def test_dispatch_takes_varlen_only_on_cuda(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attn.attention_path(cpu, torch.bfloat16, 128, has_documents=False) == "sdpa_causal"
    assert attn.attention_path(cuda, torch.bfloat16, 128, has_documents=False) == "sdpa_causal"
    assert attn.attention_path(cpu, torch.bfloat16, 128, has_documents=True) == "segments"
    assert attn.attention_path(cpu, torch.float32, 128, has_documents=True) == "segments"
    with pytest.raises(ValueError, match="needs CUDA"):
        attn.attention_path(cpu, torch.bfloat16, 128, True, requested="varlen")
    with pytest.raises(ValueError, match="expected one of"):
        attn.attention_path(cpu, torch.float32, 128, True, requested="sdpa")
    monkeypatch.setattr(attn, "_varlen_api", lambda: (lambda *a, **k: None, frozenset({"window_size"})))
    assert attn.attention_path(cuda, torch.bfloat16, 128, True) == "varlen"
    assert attn.attention_path(cuda, torch.float32, 128, True) == "flex"  # flash takes fp16/bf16 only
    assert attn.attention_path(cuda, torch.bfloat16, 12, True) == "flex"  # head dim not a multiple of 8
    monkeypatch.setattr(attn, "_varlen_api", lambda: None)
    assert attn.attention_path(cuda, torch.bfloat16, 128, True) == "flex"


def test_cpu_forward_never_reaches_varlen(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("varlen called on CPU")

    monkeypatch.setattr(attn, "_varlen", refuse)
    model = _model("nano-like")
    batch = _batch(model.config.vocab_size)
    model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits.sum().backward()


def _fake_varlen(params: frozenset[str], calls: list[dict]):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn with a given keyword set: causal
    SDPA per cu_seqlens segment, checking what hebtron passes."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        assert set(kwargs) <= params, kwargs
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert kwargs.get("window_size", (-1, 0)) == (-1, 0) and kwargs.get("is_causal", True)
        bounds = cu_q.tolist()
        assert max_q == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if k.shape[1] != q.shape[1]:
            assert kwargs.get("enable_gqa"), "GQA heads passed without enable_gqa"
        calls.append(kwargs)
        return attn._segments(q, k, v, list(zip(bounds[:-1], bounds[1:])), k.shape[1] != q.shape[1])

    return varlen_attn


@pytest.mark.parametrize("params", [frozenset({"window_size", "enable_gqa"}), frozenset({"window_size"}),
                                    frozenset({"is_causal"})])
def test_varlen_glue_builds_cu_seqlens_from_seq_idx(params, monkeypatch):
    """The varlen path's layout (cu_seqlens over the flattened batch, recomputed from seq_idx for
    every micro-batch) and keywords, against the dense mask, for each varlen_attn signature
    torch has had. The flash kernel itself is CUDA-only."""
    calls: list[dict] = []
    monkeypatch.setattr(attn, "_varlen_api", lambda: (_fake_varlen(params, calls), params))
    model = _model("nano-like")  # GQA 8:1
    batch = _batch(model.config.vocab_size)
    model.attention_impl = "dense"
    reference = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
    model.attention_impl = "auto"
    monkeypatch.setattr(decoder, "attention_path", lambda *a, **k: "varlen")  # as on CUDA with bf16
    out = model(batch["input_ids"], seq_idx=batch["seq_idx"]).logits
    assert calls, "varlen path not taken"
    assert (out - reference).abs().max().item() <= LOGIT_TOL
    docs = attn.prepare_documents(batch["seq_idx"], "varlen")
    assert docs.cu_seqlens.tolist() == [0, 13, 42, 49, 70, 110, 115, 140] and docs.max_seqlen == 40


def _block_sets(num: torch.Tensor, idx: torch.Tensor) -> set[tuple[int, int, int]]:
    return {(b, q, int(idx[b, 0, q, i])) for b in range(num.shape[0]) for q in range(num.shape[2])
            for i in range(int(num[b, 0, q]))}


def test_flex_block_mask_is_exact_and_compiles_with_the_dense_mask_result():
    """FlexAttention's kernels trust the block mask: they skip every block not listed and run no
    mask_mod on "full" ones. So, block by block against the dense document mask (T = 400,
    128-token blocks, full blocks inside long documents): listed full blocks are all True, listed
    partial blocks hold a True and a False, unlisted ones are all False. Then flex_attention under
    torch.compile (fullgraph, aot_eager: dynamo traces the mask_mod and the block mask as for
    inductor's GPU kernels, without a 20-40 s CPU C++ compile; the inductor kernel itself runs in
    bench/gpu_smoke.py) equals dense-mask SDPA."""
    gen = torch.Generator().manual_seed(0)
    lengths = [[150, 3, 247], [40, 360]]
    seq_idx = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])
    docs = attn.prepare_documents(seq_idx, "flex")
    mask = attn.document_causal_mask(seq_idx)[:, 0]
    bm, size = docs.block_mask, attn.FLEX_BLOCK_SIZE
    full = _block_sets(bm.full_kv_num_blocks, bm.full_kv_indices)
    partial = _block_sets(bm.kv_num_blocks, bm.kv_indices)
    assert full and partial and not full & partial  # the full-block branch is exercised
    blocks = -(-400 // size)
    for b in range(2):
        for q in range(blocks):
            for k in range(blocks):
                tile = mask[b, q * size:(q + 1) * size, k * size:(k + 1) * size]
                where = (b, q, k)
                if where in full:
                    assert bool(tile.all()), where
                elif where in partial:
                    assert bool(tile.any()), where  # live; all True only in a ragged last block, never full
                    assert not bool(tile.all()) or tile.numel() < size * size, where
                else:
                    assert not bool(tile.any()), where
    q = torch.randn(2, 4, 400, 16, generator=gen)
    k, v = torch.randn(2, 2, 400, 16, generator=gen), torch.randn(2, 2, 400, 16, generator=gen)
    compiled = torch.compile(flex_attention, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, block_mask=bm, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.document_causal_mask(seq_idx), enable_gqa=True)
    assert (out - ref).abs().max().item() <= LOGIT_TOL


# -------------------------------------------------------------------------------- experts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_grouped_experts_equal_the_loop(name: str, dtype: torch.dtype):
    """Logits and gradients; bf16 includes a width grouped_mm cannot take as is (20 * 2 bytes is
    not a multiple of 16: dense-first's experts), which is zero-padded."""
    model = _model(name).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    results = {}
    for grouped in (True, False):
        _set_experts(model, grouped)
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        results[grouped] = logits.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    tol = LOGIT_TOL if dtype == torch.float32 else 1e-2
    assert (results[True][0] - results[False][0]).abs().max().item() <= tol
    worst, param = _relative(results[True][1], results[False][1])
    assert worst <= (GRAD_TOL if dtype == torch.float32 else 1e-2), f"{param}: {worst:.2e}"


def test_grouped_experts_under_autocast():
    """fp32 weights, bf16 autocast (the single-process bf16 recipe): grouped_mm is not on
    autocast's lists, so the experts cast by hand, like the loop's matmuls are cast."""
    model = _model("all-types-grouped")
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    out = {}
    for grouped in (True, False):
        _set_experts(model, grouped)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[grouped] = model(ids).logits
    assert (out[True] - out[False]).abs().max().item() <= 1e-2


def _moe_layer(model: HybridModel) -> MoE:
    return next(m for m in model.modules() if isinstance(m, MoE))


def test_grouped_experts_do_not_read_the_device(monkeypatch):
    """No ``.tolist()`` / ``.item()`` / ``bool()`` in a MoE layer's forward and backward (each a
    host sync on CUDA); the loop reference does read the counts, which this check catches."""
    model = _model("nano-like")
    layer = _moe_layer(model)
    x = torch.randn(2, 37, model.config.hidden_size, requires_grad=True)

    def refuse(self, *args, **kwargs):
        raise AssertionError("host read of a tensor")

    for grouped, expect_sync in ((True, False), (False, True)):
        layer.experts.grouped = grouped
        with monkeypatch.context() as patch:
            for name in ("tolist", "item", "__bool__"):
                patch.setattr(torch.Tensor, name, refuse)
            try:
                out, _ = layer(x)
                out.sum().backward()
                synced = False
            except AssertionError:
                synced = True
        assert synced == expect_sync, grouped
    layer.experts.grouped = True
    _, record = layer(x)
    assert record.tokens_per_expert.device == x.device
    assert torch.equal(record.tokens_per_expert, torch.bincount(record.topk_idx.reshape(-1), minlength=6))


def test_grouped_experts_refuse_float64():
    model = _model("nano-like").double()
    with pytest.raises(TypeError, match="experts.grouped = False"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_cross_entropy_equals_plain(chunk: int | None):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 53, 24, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(97, 24, generator=gen)).requires_grad_()
    labels = torch.randint(0, 97, (2, 53), generator=gen)
    labels[0, ::3] = -100
    weights = torch.rand(2, 53, generator=gen)  # float weights, nonzero even where labels are -100
    ref = linear_cross_entropy_reference(hidden, weight, labels, weights)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    out = chunked_linear_cross_entropy(hidden, weight, labels, weights, chunk)
    grads = torch.autograd.grad(out, (hidden, weight))
    assert abs(out.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).norm().item() <= 1e-6 * r.norm().item()


def test_chunked_cross_entropy_keeps_no_logits_for_backward():
    """What autograd saves: the plain loss keeps (N, V) logits, the chunked one only its inputs
    and one log-sum-exp per token, whatever the number of chunks."""
    gen = torch.Generator().manual_seed(0)
    n, vocab, width = 96, 211, 8
    hidden = torch.randn(n, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    weights = torch.ones(n)

    def saved_elements(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(hidden, weight, labels, weights)
        return sum(seen.values())

    inputs = hidden.numel() + weight.numel() + 3 * n
    assert saved_elements(linear_cross_entropy_reference) >= n * vocab
    assert saved_elements(lambda *a: chunked_linear_cross_entropy(*a, chunk_size=8)) <= inputs + n


def test_chunked_cross_entropy_checks_its_inputs():
    with pytest.raises(ValueError, match="labels"):
        chunked_linear_cross_entropy(torch.zeros(4, 8), torch.zeros(5, 8), torch.zeros(3, dtype=torch.long), torch.ones(4))
    with pytest.raises(ValueError, match="hidden size"):
        chunked_linear_cross_entropy(torch.zeros(4, 8), torch.zeros(5, 6), torch.zeros(4, dtype=torch.long), torch.ones(4))
    for bad in (9, -3):  # a label outside the vocabulary (or negative, not -100) is not silently dropped
        with pytest.raises(RuntimeError, match="out of bounds"):
            chunked_linear_cross_entropy(torch.zeros(4, 8), torch.zeros(5, 8), torch.tensor([0, 1, bad, -100]), torch.ones(4))


def test_return_hidden_leaves_logits_to_the_loss():
    model = _model("all-types-grouped")
    batch = _batch(model.config.vocab_size)
    out = model(batch["input_ids"], seq_idx=batch["seq_idx"], return_hidden=True)
    assert out.logits is None and out.hidden.shape == (*batch["input_ids"].shape, model.config.hidden_size)
    assert len(out.routers) == model.config.layer_types.count("moe")
    full = model(batch["input_ids"], seq_idx=batch["seq_idx"])
    torch.testing.assert_close(model.lm_head(out.hidden).float(), full.logits, rtol=0, atol=0)
