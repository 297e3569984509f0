"""What the loop does for MoE routers in one optimizer step: aux losses, expert bias, monitor, alarms.

The native engine holds one :class:`MoEStep`. Its ``accumulate_gradients`` calls ``begin`` with this rank's
micro-batches and ``micro_batch_loss`` after each forward (the returned aux loss is added to the
micro-batch's loss before backward); ``finish_step`` runs once after backward. Every aux term is
summed over real tokens (or rows) and divided by the *global* count, like the LM loss, so the
sequence, global-batch and z losses do not depend on how a step is split into micro-batches
and ranks; the micro-batch loss is by definition per micro-batch and is token-weighted.

The global-batch loss needs the step's expert counts. Its logged value is exact (counts and
probabilities summed over all micro-batches and ranks). Its gradient cannot wait for the last
micro-batch, so, as in Megatron-Core, each micro-batch uses the counts of the step so far,
summed over ranks with one small all-reduce: exact with one micro-batch per rank, a running
estimate under gradient accumulation.

``finish_step`` sums this step's counts over ranks and moves the expert bias (the same update on
every rank), and every ``monitor.interval`` steps turns the accumulated routing statistics into
figures per layer and language, checks the collapse rules and acts on them. Everything that
changes later steps (raised coefficients, alarm streaks, a partly filled monitor interval) is
in :meth:`state_dict` for exact resume; the bias itself is a model buffer, saved with the weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hebtron.monitor.alarm import AlarmEvent, CollapseAlarm
from hebtron.monitor.router import (
    PAD_SLOT,
    RouterStats,
    assignment_counts,
    metrics_fields,
    router_probs,
    routing_mask,
    token_slots,
)
from hebtron.recipe.schema import MoESection
from hebtron.train.balance import balance_loss, row_balance_losses, update_expert_bias, z_loss_sums
from hebtron.train.engine import ProcessGroupOps

AUX_TYPES = ("micro_batch", "sequence", "global_batch", "z")


class MoEStep:
    def __init__(self, settings: MoESection, model: nn.Module, backend: ProcessGroupOps, pad_id: int | None) -> None:
        self.settings = settings
        self.backend = backend
        self.pad_id = pad_id
        config = model.config
        self.layers = [i for i, kind in enumerate(config.layer_types) if kind == "moe"]
        self.gates = [model.backbone.layers[i].mixer.gate for i in self.layers]
        self.num_experts = int(config.n_routed_experts) if self.layers else 0
        self.top_k = int(config.num_experts_per_tok) if self.layers else 0
        self.coeffs = {name: float(getattr(settings.aux_loss, name)) for name in AUX_TYPES}
        self.multiplier = [1.0] * len(self.layers)  # per layer, raised by raise_aux alarms
        self.device = backend.device
        interval = settings.monitor.interval
        self.monitor = RouterStats(self.layers, self.num_experts, self.device) if self.layers and interval else None
        self.alarm = CollapseAlarm(settings.alarms, self.num_experts, self.top_k) if self.monitor else None
        self.messages: list[str] = []
        self.stop_message: str | None = None
        self._reset_step()

    @property
    def active(self) -> bool:
        return bool(self.layers)

    @property
    def has_aux(self) -> bool:
        return any(v > 0 for v in self.coeffs.values())

    def note(self) -> str | None:
        """A line for the log when the recipe's MoE settings cannot apply to this model."""
        s = self.settings
        if not self.layers and (self.has_aux or s.bias_rate > 0 or s.alarms):
            return "note: the model has no MoE layers; the recipe's moe aux losses, bias and alarms do nothing"
        return None

    # ------------------------------------------------------------- coefficients
    def layer_coeffs(self, name: str) -> torch.Tensor:
        """(L,) effective coefficient of one aux term per layer (raise_aux alarms scale the
        balancing terms of a layer; ``_act`` keeps them within the rule's bound)."""
        base = self.coeffs[name]
        values = [base if name == "z" else base * m for m in self.multiplier]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    # -------------------------------------------------------------- per step
    def _reset_step(self) -> None:
        n, e = len(self.layers), self.num_experts
        self.values = torch.zeros(len(AUX_TYPES), n, dtype=torch.float64, device=self.device)
        self.step_counts = torch.zeros(n, e, dtype=torch.long, device=self.device)
        self.run_counts = torch.zeros(n, e, dtype=torch.float64, device=self.device)  # global so far
        self.prob_sums = torch.zeros(n, e, dtype=torch.float64, device=self.device)
        self.global_tokens = 1.0
        self.global_rows = 1.0
        self._coeff_cache = {name: self.layer_coeffs(name) for name in AUX_TYPES} if self.layers else {}

    def begin(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Global counts of real tokens and of rows with any, for the aux-loss denominators."""
        if not self.layers or not self.has_aux:
            return
        local = torch.zeros(2, dtype=torch.float64)
        for micro in micro_batches:
            mask = routing_mask(micro, self.pad_id)
            local[0] += mask.sum()
            local[1] += mask.any(dim=-1).sum()
        total = self.backend.all_reduce_sum(local.to(self.device)).cpu()
        self.global_tokens, self.global_rows = max(float(total[0]), 1.0), max(float(total[1]), 1.0)

    def micro_batch_loss(self, routers: Sequence[Any], micro: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Accumulate this micro-batch's routing; return the aux loss to add before backward
        (already divided by the global token / row counts), or None when nothing is on."""
        if not self.layers or not routers:
            return None
        mask2d = routing_mask(micro, self.pad_id)
        mask = mask2d.reshape(-1)
        slots = token_slots(micro, mask2d)
        topk = torch.stack([r.topk_idx for r in routers])  # (L, N, k)
        counts = assignment_counts(topk, slots, self.num_experts)  # (L, slots, E)
        valid_counts = counts[:, :PAD_SLOT].sum(dim=1)  # (L, E)
        self.step_counts += valid_counts
        c = self.coeffs
        balancing = bool(c["micro_batch"] or c["sequence"] or c["global_batch"])
        probs = None
        if balancing or self.monitor is not None:
            scores = torch.stack([r.scores for r in routers]).float()  # fp32 even if autocast made them bf16
            probs = router_probs(scores if balancing else scores.detach())  # (L, N, E)
        if self.monitor is not None:
            self.monitor.add(counts, probs, slots)
        if not self.has_aux:
            return None
        weight = mask.to(torch.float32)
        aux = torch.zeros((), device=topk.device)
        k, tokens_g = self.top_k, self.global_tokens
        if c["micro_batch"] or c["global_batch"]:
            prob_sums = (probs * weight[None, :, None]).sum(dim=1)  # (L, E), differentiable
        if c["micro_batch"]:
            tokens_mb = weight.sum()
            term = balance_loss(valid_counts, prob_sums, tokens_mb, k) * (tokens_mb / tokens_g)
            aux = aux + self._add("micro_batch", term)
        if c["sequence"]:
            rows, seq = mask2d.shape
            per_row = row_balance_losses(
                topk.view(len(routers), rows, seq, k), probs.view(len(routers), rows, seq, -1), mask2d, k
            )
            aux = aux + self._add("sequence", per_row.sum(dim=1) / self.global_rows)
        if c["global_batch"]:
            self.run_counts += self.backend.all_reduce_sum(valid_counts.double())
            fraction = self.run_counts / self.run_counts.sum(dim=-1, keepdim=True).clamp(min=1)  # f_i so far
            term = self.num_experts * (fraction.to(prob_sums.dtype) * prob_sums).sum(dim=-1) / tokens_g
            self.prob_sums += prob_sums.detach().double()
            aux = aux + (self._coeff_cache["global_batch"] * term).sum()  # value: exact, in finish_step
        if c["z"]:
            logits = torch.stack([r.logits for r in routers])
            aux = aux + self._add("z", z_loss_sums(logits, mask) / tokens_g)
        return aux

    def _add(self, name: str, per_layer: torch.Tensor) -> torch.Tensor:
        """Record the (unscaled) per-layer value; return its coefficient-weighted sum over layers."""
        self.values[AUX_TYPES.index(name)] += per_layer.detach().double()
        return (self._coeff_cache[name] * per_layer).sum()

    def finish_step(self, step: int, skipped: bool = False) -> dict[str, Any]:
        """After backward: sum over ranks, move the expert bias, and on monitor steps log
        figures and check alarms. Returns fields for the step's metrics record."""
        self.messages, self.stop_message = [], None
        if not self.layers:
            return {}
        s = self.settings
        out: dict[str, Any] = {}
        on = [name for name in AUX_TYPES if self.coeffs[name] > 0]
        if on or s.bias_rate > 0:
            flat = torch.cat([self.values.flatten(), self.step_counts.double().flatten(), self.prob_sums.flatten()])
            flat = self.backend.all_reduce_sum(flat)
            n_val, n_cnt = self.values.numel(), self.step_counts.numel()
            values = flat[:n_val].view_as(self.values)
            counts = flat[n_val : n_val + n_cnt].view_as(self.step_counts)
            if self.coeffs["global_batch"]:
                prob_sums = flat[n_val + n_cnt :].view_as(self.prob_sums)
                t = self.global_tokens
                values[AUX_TYPES.index("global_batch")] = balance_loss(counts, prob_sums, t, self.top_k)
            if on:
                per_type = values.mean(dim=1).cpu().tolist()
                out["moe_aux"] = {name: per_type[AUX_TYPES.index(name)] for name in on}
            if s.bias_rate > 0 and not skipped:
                for gate, layer_counts in zip(self.gates, counts, strict=True):
                    update_expert_bias(gate.e_score_correction_bias, layer_counts, s.bias_rate)
                absmax = torch.stack([g.e_score_correction_bias.abs().max() for g in self.gates]).tolist()
                out["moe_bias_absmax"] = {f"layer_{layer}": v for layer, v in zip(self.layers, absmax, strict=True)}
        if any(m != 1.0 for m in self.multiplier):
            out["moe_aux_multiplier"] = {
                f"layer_{layer}": m for layer, m in zip(self.layers, self.multiplier, strict=True)
            }
        if self.monitor is not None and step % s.monitor.interval == 0:
            self.monitor.reduce(self.backend.all_reduce_sum)
            summary = self.monitor.summary(s.monitor.active_threshold)
            self.monitor.reset()
            out.update(metrics_fields(summary))
            events = self.alarm.check(summary, step) if self.alarm is not None else []
            if events:
                out["router_alarm"] = [self._act(e) for e in events]
        self._reset_step()
        return out

    def _act(self, event: AlarmEvent) -> str:
        rule = self.settings.alarms[event.rule]
        if event.action == "stop":
            text = f"{event.message} -> stopping the run (moe.alarms[{event.rule}].action: stop)"
            self.stop_message = self.stop_message or text
        elif event.action == "raise_aux":
            i = self.layers.index(event.layer)
            base = max(self.settings.aux_loss.balancing.values())
            cap = float(rule.max_coeff) / base
            before = self.multiplier[i]
            self.multiplier[i] = max(before, min(before * rule.raise_factor, cap))
            raised = {name: v * self.multiplier[i] for name, v in self.settings.aux_loss.balancing.items()}
            what = ", ".join(f"{name} {v:.3g}" for name, v in raised.items())
            if self.multiplier[i] > before:
                text = f"{event.message} -> layer {event.layer} aux coefficients raised to {what}"
            else:
                text = f"{event.message} -> layer {event.layer} aux coefficients already at the bound ({what})"
        else:
            text = f"{event.message} -> warning only (moe.alarms[{event.rule}].action: warn)"
        self.messages.append(text)
        return text

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for the checkpoint's ``extra``. Collective: call on every rank."""
        state: dict[str, Any] = {"layers": self.layers, "multiplier": list(self.multiplier)}
        if self.monitor is not None:
            self.monitor.reduce(self.backend.all_reduce_sum)  # a partly filled interval, summed over ranks
            state["monitor"] = self.monitor.state_dict()
            if self.backend.rank != 0:  # keep the sum once, so the next reduce does not count it twice
                self.monitor.reset()
        if self.alarm is not None:
            state["alarm"] = self.alarm.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state or list(state.get("layers", [])) != self.layers:
            return
        self.multiplier = [float(m) for m in state["multiplier"]]
        if self.monitor is not None and "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
            if self.backend.rank != 0:
                self.monitor.reset()
        if self.alarm is not None and "alarm" in state:
            self.alarm.load_state_dict(state["alarm"])
        self._reset_step()
