"""Router figures per layer and language: analytic values, masks, aggregation, alarms, probe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hebtron.lang import LANG_IDS
from hebtron.monitor.alarm import CollapseAlarm
from hebtron.monitor.router import (
    NUM_SLOTS,
    PAD_SLOT,
    UNKNOWN_SLOT,
    RouterStats,
    assignment_counts,
    load_figures,
    metrics_fields,
    routing_mask,
    token_entropy,
    token_slots,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def figures(counts: list[float], threshold: float = 0.25) -> dict[str, float]:
    return {k: float(v) for k, v in load_figures(torch.tensor(counts, dtype=torch.float64), threshold).items()}


# ---------------------------------------------------------------------------- analytic figures
@pytest.mark.parametrize("experts", [2, 8, 128])
def test_uniform_load_is_entropy_one(experts: int) -> None:
    f = figures([7.0] * experts)
    assert f["load_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert f["max_share"] == pytest.approx(1 / experts)
    assert f["active_fraction"] == 1.0 and f["cv"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("experts", [2, 8, 128])
def test_one_expert_is_entropy_zero(experts: int) -> None:
    f = figures([0.0] * (experts - 1) + [50.0])
    assert f["load_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert f["max_share"] == 1.0
    assert f["active_fraction"] == pytest.approx(1 / experts)
    assert f["cv"] == pytest.approx(math.sqrt(experts - 1))  # std/mean of (0, ..., 0, E*m)


def test_known_splits() -> None:
    f = figures([3, 1, 0, 0], threshold=0.5)  # shares .75 .25; ideal load 1
    assert f["load_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert f["max_share"] == 0.75
    assert f["active_fraction"] == 0.5  # 3 and 1 are >= 0.5 x 1
    assert f["cv"] == pytest.approx(math.sqrt((4 + 0 + 1 + 1) / 4))
    f = figures([1, 1, 0, 0])  # half the experts, evenly
    assert f["load_entropy"] == pytest.approx(0.5)
    f = figures([2, 2, 2, 2, 1, 1, 1, 1], threshold=0.6)  # ideal 1.5: 0.6 x 1.5 = 0.9 <= 1
    p = [1 / 6] * 4 + [1 / 12] * 4
    assert f["load_entropy"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(8))
    assert f["active_fraction"] == 1.0
    assert figures([2, 2, 2, 2, 1, 1, 1, 1], threshold=0.7)["active_fraction"] == 0.5  # 1.05 > 1


def test_token_entropy_bounds() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(token_entropy(probs), torch.tensor([1.0, 0.0, 0.5]))


# ------------------------------------------------------------------------ masks and slots
def test_padding_never_counts_but_unknown_language_does() -> None:
    pad = 3
    batch = {"input_ids": torch.tensor([[5, 6, 3, 3], [3, 7, 8, 9]]),
             "lang": torch.tensor([[0, 0, -1, -1], [1, -1, -1, 99]])}
    mask = routing_mask(batch, pad)
    # trailing pads with lang -1 are padding; token id 3 with a language is real; lang -1 real ids count
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    slots = token_slots(batch, mask)
    assert slots.tolist() == [0, 0, PAD_SLOT, PAD_SLOT, LANG_IDS["en"], UNKNOWN_SLOT, UNKNOWN_SLOT, UNKNOWN_SLOT]
    explicit = dict(batch, padding_mask=torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]]).bool())
    assert routing_mask(explicit, pad).tolist() == [[True, False, True, True], [True] * 4]
    assert routing_mask({"input_ids": batch["input_ids"]}, pad).all()


def test_assignment_counts_and_stats_summary() -> None:
    # one layer, E=4, k=2; tokens: he, he, en, pad
    topk = torch.tensor([[[0, 1], [0, 1], [2, 3], [0, 1]]])
    slots = torch.tensor([0, 0, 1, PAD_SLOT])
    counts = assignment_counts(topk, slots, 4)
    assert counts.shape == (1, NUM_SLOTS, 4)
    assert counts[0, 0].tolist() == [2, 2, 0, 0] and counts[0, 1].tolist() == [0, 0, 1, 1]
    assert counts[0, PAD_SLOT].tolist() == [1, 1, 0, 0]
    stats = RouterStats([5], 4)
    probs = torch.full((1, 4, 4), 0.25)
    stats.add(counts, probs, slots)
    stats.add(counts, probs, slots)  # a second micro-batch
    summary = stats.summary()
    assert set(summary[5]) == {"he", "en", "all"}
    he, en, both = summary[5]["he"], summary[5]["en"], summary[5]["all"]
    assert he["tokens"] == 4 and en["tokens"] == 2 and both["tokens"] == 6  # padding left out
    assert he["load_entropy"] == pytest.approx(0.5) and en["load_entropy"] == pytest.approx(0.5)
    assert both["load_entropy"] == pytest.approx(
        -(2 * (1 / 3) * math.log(1 / 3) + 2 * (1 / 6) * math.log(1 / 6)) / math.log(4), abs=1e-6)
    assert he["router_entropy"] == pytest.approx(1.0) and he["load"] == [0.5, 0.5, 0.0, 0.0]
    fields = metrics_fields(summary)
    assert fields["router"]["layer_5"]["he"]["max_share"] == 0.5 and "load" not in fields["router"]["layer_5"]["he"]
    assert fields["router_load"]["layer"] == 5 and fields["router_load"]["load"]["en"] == [0.0, 0.0, 0.5, 0.5]
    # resume: the state round-trips through JSON exactly
    clone = RouterStats([5], 4)
    clone.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert clone.summary() == summary


def test_stats_reduce_sums_over_ranks() -> None:
    stats = RouterStats([1, 3], 8)
    stats.add(assignment_counts(torch.randint(0, 8, (2, 10, 2)), torch.zeros(10, dtype=torch.long), 8),
              torch.full((2, 10, 8), 1 / 8), torch.zeros(10, dtype=torch.long))
    before = stats.summary()
    stats.reduce(lambda t: t * 2)  # two identical ranks
    after = stats.summary()
    assert after[1]["he"]["tokens"] == 2 * before[1]["he"]["tokens"]
    assert after[3]["he"]["load_entropy"] == before[3]["he"]["load_entropy"]


# ---------------------------------------------------------------------------------- alarms
def rule(**kw) -> SimpleNamespace:
    base = dict(metric="load_entropy", lang="he", below=0.5, above=None, intervals=2, min_tokens=10, action="warn")
    return SimpleNamespace(**{**base, **kw})


def record(he4: float, tokens: int = 100, he2: float = 0.9) -> dict:
    row = dict(load_entropy=None, router_entropy=0.9, max_share=0.5, active_fraction=0.5, cv=1.0, tokens=tokens)
    return {2: {"he": {**row, "load_entropy": he2}}, 4: {"he": {**row, "load_entropy": he4}}}


def test_alarm_needs_consecutive_records_and_names_the_layer() -> None:
    alarm = CollapseAlarm([rule()], num_experts=8, top_k=2)
    assert alarm.check(record(0.3), 10) == []
    assert alarm.check(record(0.6), 20) == []  # back within the bound: the streak ends
    assert alarm.check(record(0.3), 30) == []
    assert alarm.check(record(0.3, tokens=5), 40) == []  # too few tokens: no evidence either way
    events = alarm.check(record(0.3), 50)
    assert [(e.layer, e.lang) for e in events] == [(4, "he")]
    msg = events[0].message
    assert "layer 4" in msg and "lang he" in msg and "load_entropy 0.300 < 0.5" in msg and "max_share 0.500" in msg
    assert "layer 2" not in msg
    assert alarm.check(record(0.3), 60) == []  # fired: the streak starts over
    state = json.loads(json.dumps(alarm.state_dict()))
    again = CollapseAlarm([rule()], num_experts=8, top_k=2)
    again.load_state_dict(state)
    assert [e.layer for e in again.check(record(0.3), 70)] == [4]


def test_alarm_above_and_default_min_tokens() -> None:
    alarm = CollapseAlarm([rule(metric="max_share", below=None, above=0.4, intervals=1, min_tokens=None)], 8, 2)
    assert alarm.default_min_tokens == 80
    assert alarm.check(record(0.3, tokens=79), 1) == []
    assert {e.layer for e in alarm.check(record(0.3, tokens=80), 2)} == {2, 4}


# ------------------------------------------------------------------------------------ probe
@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from hebtron.model import HybridConfig, HybridModel
    from hebtron.model.hf import save_hf
    from hebtron.monitor.skew import language_token_ids, skew_routing
    from hebtron.data.tokenizer import load_hf_tokenizer
    from tests.collapse_scenario import shared_fixture
    from tests.train_fixtures import TINY_MODEL

    root = tmp_path_factory.mktemp("probe")
    fixture = shared_fixture(tmp_path_factory)
    tok = load_hf_tokenizer(fixture / "tokenizer")
    torch.manual_seed(0)
    model = HybridModel(HybridConfig(**{**TINY_MODEL, "hybrid_override_pattern": "M*EME", "n_routed_experts": 8,
                                        "vocab_size": len(tok)}))
    skew_routing(model, language_token_ids(tok), layers=[4], experts=[0, 1], logit=3.0, embed_norm=1.0)
    save_hf(model, root / "hf")
    tok.save_pretrained(str(root / "hf"))
    data = root / "mixed.jsonl"
    data.write_text((fixture / "he_valid.jsonl").read_text(encoding="utf-8")
                    + (fixture / "en_valid.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return root / "hf", data


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI entry point in-process (same parsing, error lines and exit codes, no interpreter start)."""
    from hebtron.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_probe_finds_the_skewed_layer(probe_inputs, capsys) -> None:
    hf, data = probe_inputs
    code, out, err = _cli(capsys, "monitor", "probe", "--checkpoint", str(hf), "--data", str(data), "--seq-len", "64",
                          "--json")
    assert code == 0, err
    result = json.loads(out)
    layers = {entry["layer"]: entry["lang"] for entry in result["layers"]}
    assert set(layers) == {2, 4} and {"he", "en", "all"} <= set(layers[4])
    he4, he2, en4 = layers[4]["he"], layers[2]["he"], layers[4]["en"]
    assert he4["load_entropy"] < 0.45 < en4["load_entropy"] and he2["load_entropy"] > 0.7
    assert he4["max_share"] > 0.45 and set(he4) >= {"load_entropy", "router_entropy", "max_share",
                                                    "active_fraction", "cv", "tokens"}
    assert he4["tokens"] > 300 and en4["tokens"] > 300
    code, out, err = _cli(capsys, "monitor", "probe", "--checkpoint", str(hf), "--data", str(data), "--seq-len", "64")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.split()[:2] == ["4", "he"])
    assert "!" in line and f"{he4['load_entropy']:.3f}" in line


def test_probe_errors_are_one_line(probe_inputs, tmp_path, capsys) -> None:
    hf, data = probe_inputs
    code, _, err = _cli(capsys, "monitor", "probe", "--checkpoint", str(tmp_path), "--data", str(data))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "שלום", "lang": "he"}\n{"txt": 1}\n', encoding="utf-8")
    code, _, err = _cli(capsys, "monitor", "probe", "--checkpoint", str(hf), "--data", str(bad))
    assert code == 2 and err.strip() == f"error: {bad}:2: field 'text' is missing"
    code, _, err = _cli(capsys, "monitor", "probe", "--checkpoint", str(hf), "--data", str(data), "--batches", "0")
    assert code == 2 and "--batches: expected a positive integer" in err
