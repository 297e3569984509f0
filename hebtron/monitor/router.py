"""Routing figures per MoE layer and per language: is a language squeezed onto a few experts?

A pretrained MoE that meets a language it saw little of sends that language's tokens to a
handful of experts in its deep layers. The overall load can still look fine (the other
languages fill the other experts), so every figure here is computed per layer *and* per
language, from the router records the model returns:

- ``load_entropy``: entropy of the expert-load distribution / log(E): 1 = uniform, 0 = one
  expert. With top-k routing each token picks k distinct experts, so the floor is log k / log E;
- ``router_entropy``: mean over tokens of the entropy of the token's normalized router scores,
  / log(E) (how undecided the router is, not how the load spreads);
- ``max_share``: the largest expert's share of the assignments (1/E when uniform);
- ``active_fraction``: experts that get at least ``active_threshold`` x the ideal load (N k / E);
- ``cv``: coefficient of variation (population std / mean) of the per-expert load.

Padding never counts. Counts and sums are accumulated on the device without host syncs, summed
over micro-batches, steps and ranks (one all-reduce at logging time), then turned into figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hebtron.lang import LANG_IDS, UNKNOWN_LANG, lang_name

FIGURES = ("load_entropy", "router_entropy", "max_share", "active_fraction", "cv")

# Token slots: one per known language id, then "unknown" (-1 or not in the table), then padding
# (dropped). Language ids are stable (stored on disk), so slot = id.
NUM_LANGS = max(LANG_IDS.values()) + 1
UNKNOWN_SLOT = NUM_LANGS
PAD_SLOT = NUM_LANGS + 1
NUM_SLOTS = NUM_LANGS + 2
ALL = "all"


def slot_name(slot: int) -> str:
    return "unknown" if slot == UNKNOWN_SLOT else lang_name(slot)


# ------------------------------------------------------------------------------ token masks
def routing_mask(batch: Mapping[str, torch.Tensor], pad_id: int | None) -> torch.Tensor:
    """True for tokens that count for balancing and monitors, False for padding.

    An explicit ``padding_mask`` (True = padding, Megatron's convention) or ``attention_mask``
    (1 = real, Hugging Face's) wins. Otherwise a token is padding when it has no language
    (-1) *and* is the pad token: a real token of an unknown language still counts.
    """
    ids = batch["input_ids"]
    if "padding_mask" in batch:
        return ~batch["padding_mask"].bool()
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    if "lang" not in batch or pad_id is None:
        return torch.ones_like(ids, dtype=torch.bool)
    return ~((batch["lang"] == UNKNOWN_LANG) & (ids == pad_id))


def token_slots(batch: Mapping[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(N,) slot of every token, batch-major like the router records; padding -> PAD_SLOT."""
    lang = batch.get("lang")
    if lang is None:
        slots = torch.full_like(mask, UNKNOWN_SLOT, dtype=torch.long)
    else:
        lang = lang.long()
        slots = torch.where((lang >= 0) & (lang < NUM_LANGS), lang, UNKNOWN_SLOT)
    return torch.where(mask, slots, PAD_SLOT).reshape(-1)


# ------------------------------------------------------------------------- per micro-batch
def router_probs(scores: torch.Tensor) -> torch.Tensor:
    """Scores normalized to a distribution over experts (sigmoid scores / their sum; softmax
    scores already are one). Differentiable: the aux losses use it too."""
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def assignment_counts(topk_idx: torch.Tensor, slots: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(L, N, k) selected experts and (N,) slots -> (L, NUM_SLOTS, E) int64 assignment counts."""
    layers, n, k = topk_idx.shape
    flat = (slots.view(1, n, 1) * num_experts + topk_idx).reshape(layers, n * k)
    out = torch.zeros(layers, NUM_SLOTS * num_experts, dtype=torch.long, device=topk_idx.device)
    out.scatter_add_(1, flat, torch.ones_like(flat))
    return out.view(layers, NUM_SLOTS, num_experts)


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(..., E) distributions -> (...) entropy / log(E), in [0, 1]."""
    num_experts = probs.shape[-1]
    return -torch.special.xlogy(probs, probs).sum(dim=-1) / math.log(max(num_experts, 2))


def slot_sums(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(L, N) per-token values -> (L, NUM_SLOTS) sums per slot (float64)."""
    out = torch.zeros(values.shape[0], NUM_SLOTS, dtype=torch.float64, device=values.device)
    return out.scatter_add_(1, slots.expand(values.shape[0], -1), values.double())


# ---------------------------------------------------------------------------------- figures
def load_figures(counts: torch.Tensor, active_threshold: float = 0.25) -> dict[str, torch.Tensor]:
    """Load figures of (..., E) expert counts, each of shape (...). NaN where a row is empty."""
    counts = counts.double()
    num_experts = counts.shape[-1]
    total = counts.sum(dim=-1, keepdim=True)
    share = counts / total
    mean = total / num_experts
    return {
        "load_entropy": -torch.special.xlogy(share, share).sum(dim=-1) / math.log(max(num_experts, 2)),
        "max_share": share.max(dim=-1).values,
        "active_fraction": (counts >= active_threshold * mean).double().mean(dim=-1)
        .masked_fill(total.squeeze(-1) == 0, math.nan),
        "cv": counts.std(dim=-1, unbiased=False) / mean.squeeze(-1),
    }


LayerFigures = dict[str, dict[str, Any]]  # lang -> {figure: value, "tokens": n, "load": [shares]}


class RouterStats:
    """Routing counts and router entropies over micro-batches, steps and ranks.

    ``add`` takes what one micro-batch produced (device tensors, no host sync); ``reduce``
    sums over ranks; ``summary`` turns the totals into figures per layer and language.
    """

    def __init__(self, layers: Sequence[int], num_experts: int, device: torch.device | str = "cpu") -> None:
        self.layers = list(layers)
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        n = len(self.layers)
        self.counts = torch.zeros(n, NUM_SLOTS, self.num_experts, dtype=torch.long, device=self.device)
        self.entropy = torch.zeros(n, NUM_SLOTS, dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros(NUM_SLOTS, dtype=torch.long, device=self.device)

    def add(self, counts: torch.Tensor, probs: torch.Tensor, slots: torch.Tensor) -> None:
        """counts (L, NUM_SLOTS, E) from :func:`assignment_counts`, probs (L, N, E), slots (N,)."""
        self.counts += counts
        self.entropy += slot_sums(token_entropy(probs.detach()), slots)
        self.tokens.scatter_add_(0, slots, torch.ones_like(slots))  # no host sync, unlike bincount on CUDA

    def add_records(self, routers: Sequence[Any], batch: Mapping[str, torch.Tensor], pad_id: int | None) -> None:
        """Convenience for inference (the probe): straight from a forward's router records."""
        slots = token_slots(batch, routing_mask(batch, pad_id)).to(self.device)
        topk = torch.stack([r.topk_idx for r in routers]).to(self.device)
        probs = router_probs(torch.stack([r.scores for r in routers]).detach().float().to(self.device))
        self.add(assignment_counts(topk, slots, self.num_experts), probs, slots)

    def reduce(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum over ranks (one collective for everything)."""
        flat = torch.cat([self.counts.double().flatten(), self.entropy.flatten(), self.tokens.double()])
        flat = all_reduce_sum(flat)
        n_counts, n_ent = self.counts.numel(), self.entropy.numel()
        self.counts = flat[:n_counts].round().long().view_as(self.counts)
        self.entropy = flat[n_counts : n_counts + n_ent].view_as(self.entropy).clone()
        self.tokens = flat[n_counts + n_ent :].round().long()

    @property
    def empty(self) -> bool:
        return int(self.tokens[:PAD_SLOT].sum()) == 0

    def summary(self, active_threshold: float = 0.25) -> dict[int, LayerFigures]:
        """{layer: {lang: figures}} for every language with tokens, plus ``all`` (every real token)."""
        counts = self.counts[:, :PAD_SLOT].cpu()
        entropy = self.entropy[:, :PAD_SLOT].cpu()
        tokens = self.tokens[:PAD_SLOT].cpu()
        counts = torch.cat([counts, counts.sum(dim=1, keepdim=True)], dim=1)  # + "all"
        entropy = torch.cat([entropy, entropy.sum(dim=1, keepdim=True)], dim=1)
        tokens = torch.cat([tokens, tokens.sum().view(1)])
        figs = load_figures(counts, active_threshold)
        router_entropy = entropy / tokens.clamp(min=1).double()
        shares = counts.double() / counts.sum(dim=-1, keepdim=True).clamp(min=1)
        names = [slot_name(s) for s in range(PAD_SLOT)] + [ALL]
        present = [s for s in range(len(names)) if int(tokens[s]) > 0]
        out: dict[int, LayerFigures] = {}
        for li, layer in enumerate(self.layers):
            per_lang: LayerFigures = {}
            for s in present:
                row = {name: _num(figs[name][li, s]) for name in ("load_entropy", "max_share", "active_fraction", "cv")}
                row["router_entropy"] = _num(router_entropy[li, s])
                row["tokens"] = int(tokens[s])
                row["load"] = [round(float(x), 6) for x in shares[li, s]]
                per_lang[names[s]] = {k: row[k] for k in (*FIGURES, "tokens", "load")}
            out[layer] = per_lang
        return out

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.cpu().tolist(), "entropy": self.entropy.cpu().tolist(),
                "tokens": self.tokens.cpu().tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = torch.tensor(state["counts"], dtype=torch.long)
        if tuple(counts.shape) != tuple(self.counts.shape):
            raise ValueError(
                f"router monitor state has shape {tuple(counts.shape)}, expected {tuple(self.counts.shape)}"
            )
        self.counts = counts.to(self.device)
        self.entropy = torch.tensor(state["entropy"], dtype=torch.float64, device=self.device)
        self.tokens = torch.tensor(state["tokens"], dtype=torch.long, device=self.device)


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return round(v, 6) if math.isfinite(v) else None


def worst(summary: Mapping[int, LayerFigures], figure: str = "load_entropy") -> tuple[int, str] | None:
    """(layer, lang) with the lowest ``figure`` over named languages (``all`` left out)."""
    best: tuple[float, int, str] | None = None
    for layer, langs in summary.items():
        for lang, row in langs.items():
            value = row.get(figure)
            if lang == ALL or value is None:
                continue
            if best is None or value < best[0]:
                best = (value, layer, lang)
    return None if best is None else (best[1], best[2])


def metrics_fields(summary: Mapping[int, LayerFigures]) -> dict[str, Any]:
    """What a metrics record holds: every figure per layer and language under ``router``, and
    the expert loads of the worst layer under ``router_load`` (all layers' loads would bloat
    metrics.jsonl on a 23-MoE-layer, 128-expert model)."""
    router = {f"layer_{layer}": {lang: {k: v for k, v in row.items() if k != "load"} for lang, row in langs.items()}
              for layer, langs in summary.items()}
    out: dict[str, Any] = {"router": router}
    pick = worst(summary)
    if pick is not None:
        layer, lang = pick
        out["router_load"] = {"layer": layer, "lang": lang,
                              "load": {name: row["load"] for name, row in summary[layer].items()}}
    return out


def format_table(summary: Mapping[int, LayerFigures], mark_below: float | None = None) -> str:
    """The per-layer, per-language table the probe prints (``!`` marks load entropy below a bound)."""
    head = ("layer", "lang", "tokens", *FIGURES)
    rows = [head]
    for layer, langs in summary.items():
        for lang, row in langs.items():
            cells = [str(layer), lang, f"{row['tokens']:,}"]
            for name in FIGURES:
                v = row[name]
                cell = "-" if v is None else f"{v:.3f}"
                if name == "load_entropy" and mark_below is not None and v is not None and v < mark_below:
                    cell += " !"
                cells.append(cell)
            rows.append(tuple(cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
