"""Collapse alarms: recipe rules over the router figures, e.g. "load entropy of `he` below 0.5
in any MoE layer for 3 monitor records in a row".

A rule keeps a streak per layer: a record past the bound extends it, a record within the bound
ends it, and a record with too few tokens of the language says nothing (small samples look
collapsed: 20 tokens cannot spread over 128 experts). When a streak reaches ``intervals`` the
rule fires and the streak starts over, so a collapse that persists fires again every
``intervals`` records. What firing does (warn, stop, raise the aux coefficient) is the
caller's; this module decides when and writes the message naming layer, language and figures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hebtron.monitor.router import ALL, FIGURES, LayerFigures


class Rule(Protocol):
    """What a rule needs (``hebtron.recipe.schema.CollapseRule`` has it)."""

    metric: str
    lang: str | None
    below: float | None
    above: float | None
    intervals: int
    min_tokens: int | None
    action: str


@dataclass
class AlarmEvent:
    rule: int
    layer: int
    lang: str
    action: str
    value: float
    message: str


class CollapseAlarm:
    def __init__(self, rules: Sequence[Rule], num_experts: int, top_k: int) -> None:
        self.rules = list(rules)
        self.default_min_tokens = math.ceil(20 * num_experts / max(top_k, 1))
        self.streaks: list[dict[int, int]] = [{} for _ in self.rules]
        self.fired = 0

    def check(self, summary: Mapping[int, LayerFigures], step: int) -> list[AlarmEvent]:
        """Feed one monitor record (``RouterStats.summary``); returns the rules that fired."""
        events = []
        for i, rule in enumerate(self.rules):
            lang = rule.lang or ALL
            need = rule.min_tokens if rule.min_tokens is not None else self.default_min_tokens
            for layer, langs in summary.items():
                row = langs.get(lang)
                value = None if row is None else row.get(rule.metric)
                if row is None or value is None or row["tokens"] < need:
                    continue  # no evidence either way: the streak neither grows nor ends
                past = value < rule.below if rule.below is not None else value > rule.above  # type: ignore[operator]
                streak = self.streaks[i].get(layer, 0) + 1 if past else 0
                if streak >= rule.intervals:
                    message = _message(rule, layer, lang, row, step)
                    events.append(AlarmEvent(i, layer, lang, rule.action, value, message))
                    self.fired += 1
                    streak = 0
                self.streaks[i][layer] = streak
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"streaks": [{str(k): v for k, v in s.items()} for s in self.streaks], "fired": self.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        streaks = list(state.get("streaks", []))
        if len(streaks) != len(self.rules):  # the recipe's rules changed: start the streaks over
            streaks = [{} for _ in self.rules]
        self.streaks = [{int(k): int(v) for k, v in s.items()} for s in streaks]
        self.fired = int(state.get("fired", 0))


def _message(rule: Rule, layer: int, lang: str, row: Mapping[str, Any], step: int) -> str:
    sign, bound = ("<", rule.below) if rule.below is not None else (">", rule.above)
    figures = ", ".join(f"{name} {row[name]:.3f}" for name in FIGURES if row.get(name) is not None)
    return (
        f"routing collapse: layer {layer}, lang {lang}: {rule.metric} {row[rule.metric]:.3f} {sign} {bound:g} "
        f"for {rule.intervals} monitor record(s) in a row (step {step}); {figures}; {row['tokens']:,} tokens"
    )
