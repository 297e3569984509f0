"""Grouped-query attention as in Nemotron-H: no positional encoding (the Mamba layers carry order),
no biases, causal; with ``seq_idx`` a token attends only inside its own document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hebtron.model.config import HybridConfig


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, 1, T, T) boolean mask: causal and same document."""
    seqlen = seq_idx.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=seq_idx.device).tril()
    return (causal & (seq_idx[:, :, None] == seq_idx[:, None, :])).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attn_head_dim
        h, hd, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` is a (b, 1, T, T) boolean document-causal mask, or None for plain causal."""
        batch, seqlen, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.num_heads != self.num_kv_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))
