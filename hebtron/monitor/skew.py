"""Inject a language-specific routing collapse into a model, to rehearse monitors and balancing.

A real base model that saw little Hebrew routes Hebrew tokens to a few experts in deep layers.
To reproduce that on a toy model (tests, demos, tuning alarm thresholds before a cluster run),
give the chosen tokens a shared direction ``v`` in embedding space and point the chosen
experts' router rows along ``v`` in the chosen layers (every other router row is made
orthogonal to ``v``): those tokens then score high on exactly those experts there, and
nowhere else. Other tokens are left as they were.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

HEBREW = re.compile(r"[\u0590-\u05FF]")


def language_token_ids(tokenizer, pattern: re.Pattern[str] = HEBREW) -> list[int]:
    """Ids of vocabulary entries whose text contains a character of ``pattern`` (Hebrew letters)."""
    return [i for i in range(len(tokenizer)) if pattern.search(tokenizer.decode([i]))]


@torch.no_grad()
def skew_routing(
    model: nn.Module,
    token_ids: Sequence[int],
    layers: Sequence[int],
    experts: Sequence[int],
    logit: float = 3.0,
    embed_norm: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Send ``token_ids`` to ``experts`` in the MoE ``layers``; returns the direction ``v``.

    Those tokens' embeddings become ``embed_norm * (v + u_t)``, with ``u_t`` their own direction
    orthogonal to ``v``: they share ``v`` yet stay distinct, so routers blind to ``v`` still
    spread them. ``embed_norm`` must dominate what the layers below add to the residual stream
    (random init: ~0.02 sqrt(hidden) for embeddings, more for mixer outputs). ``logit`` is
    about the router logit the chosen experts give a token whose layer input is all ``v``.
    """
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=gen)
    v /= v.norm()
    emb = model.backbone.embeddings.weight
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=emb.device)
    own = emb[ids].float()
    own = own - torch.outer(own @ v.to(own.device), v.to(own.device))  # token-specific part, orthogonal to v
    own = own / own.norm(dim=-1, keepdim=True).clamp_min(1e-12) * embed_norm
    emb[ids] = (own + embed_norm * v.to(own.device)).to(emb)
    for block in model.backbone.layers:
        if block.kind == "moe":  # every router blind to v, so v alone decides nothing elsewhere
            w = block.mixer.gate.weight
            w -= torch.outer(w.float() @ v.to(w.device), v.to(w.device)).to(w)
    for layer in layers:
        gate = model.backbone.layers[layer].mixer.gate
        for e in experts:
            gate.weight[e] = (logit / math.sqrt(hidden) * v).to(gate.weight)
    return v
