"""The PyTorch reference kernels against the simplest formulations of the same math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hebtron.kernels.causal_conv1d import causal_conv1d_ref
from hebtron.kernels.ssd import segsum, ssd_chunk_scan_ref, ssd_sequential_ref


def _segments(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_matches_sequential_recurrence(chunk: int, packed: bool):
    gen = torch.Generator().manual_seed(chunk)
    b, T, h, p, g, n = 2, 37, 4, 3, 2, 5
    x = torch.randn(b, T, h, p, generator=gen)
    dt = torch.rand(b, T, h, generator=gen) * 0.5
    A = -torch.rand(h, generator=gen) * 3
    B, C = torch.randn(b, T, g, n, generator=gen), torch.randn(b, T, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    seq_idx = torch.stack([_segments([10, 5, 22]), _segments([3, 30, 4])]) if packed else None
    got = ssd_chunk_scan_ref(x, dt, A, B, C, chunk, D=D, dt_softplus=False, seq_idx=seq_idx)
    want = ssd_sequential_ref(x, dt, A, B, C, D=D, seq_idx=seq_idx)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_ssd_packed_equals_documents_alone():
    gen = torch.Generator().manual_seed(0)
    lengths = [9, 17, 6]
    T, h, p, g, n = sum(lengths), 4, 8, 2, 16
    x, dt = torch.randn(1, T, h, p, generator=gen), torch.randn(1, T, h, generator=gen)
    A = -torch.exp(torch.randn(h, generator=gen))
    B, C = torch.randn(1, T, g, n, generator=gen), torch.randn(1, T, g, n, generator=gen)
    args = dict(D=torch.ones(h), dt_bias=torch.zeros(h), dt_limit=(1e-3, float("inf")))
    packed = ssd_chunk_scan_ref(x, dt, A, B, C, 8, seq_idx=_segments(lengths)[None], **args)
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = ssd_chunk_scan_ref(x[:, s], dt[:, s], A, B[:, s], C[:, s], 8, **args)
        torch.testing.assert_close(packed[:, s], alone, atol=1e-6, rtol=1e-5)
        start += length


def test_segsum_is_span_sum():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = segsum(a)
    assert s[3, 1].item() == 7.0 and s[2, 2].item() == 0.0 and s[1, 2].item() == float("-inf")


@pytest.mark.parametrize("kernel", [2, 4])
def test_conv_restarts_at_documents(kernel: int):
    gen = torch.Generator().manual_seed(kernel)
    lengths = [5, 1, 9, 3]
    channels, T = 6, sum(lengths)
    x, w, bias = torch.randn(2, channels, T, generator=gen), torch.randn(channels, kernel), torch.randn(channels)
    seq_idx = _segments(lengths)[None].expand(2, T)
    got = causal_conv1d_ref(x, w, bias, seq_idx=seq_idx)
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        alone = F.silu(F.conv1d(x[..., s], w[:, None], bias, padding=kernel - 1, groups=channels)[..., :length])
        torch.testing.assert_close(got[..., s], alone, atol=1e-6, rtol=1e-5)
        start += length
    unpacked = causal_conv1d_ref(x, w, bias)
    assert not torch.allclose(got, unpacked)  # the boundary really matters here


@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_conv_hand_written_backward_passes_gradcheck(packed: bool):
    """The reference's backward is written out (kernels/causal_conv1d.py): check it numerically."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    bias = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_(True)
    seq_idx = _segments([4, 1, 6])[None].expand(2, 11) if packed else None
    assert torch.autograd.gradcheck(lambda a, b, c: causal_conv1d_ref(a, b, c, seq_idx=seq_idx), (x, w, bias))


@pytest.mark.parametrize("packed", [False, True])
def test_span_decay_hand_written_backward_passes_gradcheck(packed: bool):
    """The SSD's intra-chunk decay has a written-out backward (kernels/ssd.py): check it numerically."""
    from hebtron.kernels.ssd import _SpanDecay

    gen = torch.Generator().manual_seed(3)
    a = (-torch.rand(2, 3, 6, generator=gen, dtype=torch.float64)).requires_grad_(True)
    same_doc = (torch.rand(2, 3, 6, 6, generator=gen) > 0.3) if packed else None
    assert torch.autograd.gradcheck(lambda t: _SpanDecay.apply(t, same_doc), (a,))
