"""hebtron's router monitor on Megatron's routers: load per layer and language, over ranks.

Forward hooks on Megatron's ``TopKRouter`` see, per micro-batch, the router input (this rank's
tokens: its sequence shard under sequence parallelism, sequence-major) and the routing map.
:class:`MegatronRouterMonitor` lines those tokens up with the micro-batch's language ids and
adds them to :class:`hebtron.monitor.router.RouterStats`, the same statistics the native loop
keeps, so figures, metrics fields and collapse alarms read the same on both backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hebtron.monitor.router import RouterStats, assignment_counts, router_probs, slot_sums, token_entropy


def _routers(modules: Sequence[torch.nn.Module]) -> list[tuple[int, Any]]:
    from megatron.core.transformer.moe.router import TopKRouter

    found = []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, TopKRouter):
                found.append((int(sub.layer_number) - 1, sub))  # Megatron numbers layers from 1
    return sorted(found, key=lambda x: x[0])


class MegatronRouterMonitor:
    """Routing statistics from Megatron's routers for :class:`RouterStats` (per step, all ranks)."""

    def __init__(self, modules: Sequence[torch.nn.Module], moe_layers: Sequence[int], num_experts: int, top_k: int,
                 tp_rank: int, tp_size: int, sequence_parallel: bool, count_tokens: bool,
                 device: torch.device | str = "cpu") -> None:
        # on the model's device: the hooks add to it without a host sync; the figures are
        # copied to the host once per monitor interval (RouterStats.summary)
        self.stats = RouterStats(moe_layers, num_experts, device)
        self.layer_row = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts, self.top_k = num_experts, top_k
        self.tp_rank, self.tp_size, self.sp = tp_rank, tp_size, sequence_parallel
        self.count_tokens = count_tokens  # this rank holds the model's first MoE layer
        self.first_layer = min(moe_layers) if moe_layers else -1
        self.slots: list[torch.Tensor] = []  # per micro-batch, (b, T) or (1, b*T) language slots
        self.calls: dict[int, int] = {}
        self.handles = [router.register_forward_hook(self._hook) for _, router in _routers(modules)]

    def begin(self, slots: list[torch.Tensor]) -> None:
        """Before a step's forward-backward: the slot (language) of every token of each micro-batch,
        in the layout the model receives (see :func:`hebtron.monitor.router.token_slots`), moved to
        the device once here rather than in every layer's hook."""
        self.slots = [s.to(self.stats.device, non_blocking=True) for s in slots]
        self.calls = {}

    @torch.no_grad()
    def _hook(self, router: Any, inputs: tuple, outputs: tuple) -> None:
        if not router.training or not self.slots:
            return  # evaluation passes are not part of a training step's figures
        layer = int(router.layer_number) - 1
        micro = self.calls.get(layer, 0)
        self.calls[layer] = micro + 1
        if micro >= len(self.slots):
            return
        hidden = inputs[0]
        _, routing_map = outputs
        slots = self.slots[micro]  # (b, s) in the model's layout
        if self.sp and self.tp_size > 1:  # this rank routes its shard of the sequence
            per = slots.shape[1] // self.tp_size
            slots = slots[:, self.tp_rank * per : (self.tp_rank + 1) * per]
        slots = slots.transpose(0, 1).reshape(-1).to(hidden.device)  # sequence-major, like Megatron's tokens
        logits = hidden.reshape(-1, hidden.shape[-1]).float() @ router.weight.float().t()
        scores = logits.sigmoid() if router.score_function == "sigmoid" else logits.softmax(dim=-1)
        topk = routing_map.float().topk(self.top_k, dim=-1).indices
        row = self.layer_row[layer]
        slots = slots.long()
        self.stats.counts[row] += assignment_counts(topk[None], slots, self.num_experts)[0]
        self.stats.entropy[row] += slot_sums(token_entropy(router_probs(scores))[None], slots[None])[0]
        if self.count_tokens and layer == self.first_layer:
            self.stats.tokens.scatter_add_(0, slots, torch.ones_like(slots))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def micro_slots(rows: dict[str, torch.Tensor], inputs: Any, pad_id: int | None) -> torch.Tensor:
    """The slot of every token of one micro-batch, shaped like the tokens Megatron gets."""
    from hebtron.monitor.router import routing_mask, token_slots

    slots = token_slots(rows, routing_mask(rows, pad_id)).view(rows["input_ids"].shape)
    return slots.reshape(inputs.tokens.shape)

