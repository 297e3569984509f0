"""A seeded corpus of hostile inputs through the real command line (``hebtron.cli.main``).

Every case must end in exit 0 or 2 (74 where a disk refuses), and when it fails, in exactly one
stderr line that names the file and the field (or the override that set the value); never a
traceback, never a hang (a per-case ``signal.alarm``), and nothing in an input may execute:
payload cases write a marker file if they ever run, and every case checks it is absent. Input
that a command drops instead of refusing must be counted in what it prints.

Cases run in this process (torch is imported once per worker) and are generated from fixed
seeds, so the corpus is the same on every run. Classes covered (each case id starts with its
class; the failure classes of issue 17's "Why" each have at least one case):

- ``recipe``: wrong types, missing and unknown keys, bad numbers and units, YAML alias bombs
  (billion laughs), deep nesting, ``extends`` cycles and missing targets, invalid UTF-8, empty
  files, lone surrogates, huge integers, python tags (payload), float/bool model dimensions,
  string initializer_range / routed_scaling_factor, seed 1e23, lr 1e300, ramps with negative
  or zero sizes, checkpoint.dir that is a file, data.seq_len: true, 30,000 keys under
  model.init, train.global_batch=1e12, bad values set by overrides (named in the error),
  seeded random mutations of the fixture recipe's fields, and seeded byte mutations of its file.
- ``cpt``: ``data prepare`` / ``data dedup`` on JSONL and Parquet: broken JSON, non-UTF-8,
  missing fields, non-string text, NUL bytes, a 50 MB line, deep nesting, huge integers, lone
  surrogates, wrong Parquet schemas, a damaged or truncated Parquet file, an output prefix under
  a file; ``train`` on an indexed dataset whose sidecars are damaged (``.meta.json`` deep, huge
  ints, not JSON, a list, not UTF-8; ``.idx`` truncated or garbage; ``.lang.npy`` garbage or an
  object array that would unpickle the marker).
- ``tok``: ``tokenizer train`` and ``tokenizer report`` on the same inputs; records without
  usable text are counted in the output line.
- ``chat``: ``data pack`` on chat JSONL/Parquet: broken JSON, non-UTF-8, missing messages,
  non-string content, NUL bytes, deep nesting, huge integers, a 50 MB line, wrong Parquet
  schemas; dropped conversations are counted in the packing report.
- ``ckpt``: ``export``, ``model info``, ``convert hf-to-megatron`` and ``train --resume``:
  truncated safetensors (with and without a manifest that vouches for the new size), bad
  safetensors headers, hebtron_aliases metadata that is deep / a list / not JSON / dangling, wrong
  shapes, a missing tensor, broken config.json (huge ints, deep nesting, a directory, not JSON, a
  list, not UTF-8, float or string dimensions), an index whose weight_map is a list, deep, or
  names a file outside the directory, a bad step / extra / RNG state / token count in
  trainer_state.json (deep, huge ints), a deep COMPLETE manifest, a ``latest`` to nowhere, a
  ``latest`` that is a directory, binary or a path, no complete checkpoint at all, an export
  target that is a file, and optimizer-state pickles (raw and torch.save) whose ``__reduce__``
  writes the marker.
- ``eval``: suite YAMLs, gate policies, results JSON and ``eval table``'s gate verdicts that are
  invalid UTF-8, deeply nested,
  alias bombs, huge integers, empty or of the wrong shape (unusable candidate results are the
  gate's REJECT, exit 1, with the reason; everything else exit 2).
- ``*-bytes-*``: seeded byte mutations (flips, truncation, inserted NUL / bad UTF-8 / brackets
  / aliases / surrogates, repeated slices) of a recipe, a checkpoint's config.json and
  trainer_state.json, and chat JSONL.
- ``payload``: code in files that should be data: a distributed checkpoint's ``.metadata``
  pickle (unvouched, with --trust-checkpoint, and vouched by a forged manifest), a tokenizer
  whose ``auto_map`` names a ``.py`` file, a suite whose model_args turn on trust_remote_code.
  (The optimizer-state pickle and the recipe ``!!python`` tag sit in ``ckpt`` and ``recipe``.)
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from hebtron.cli import main

from tests.train_fixtures import TINY_MODEL, build_training_fixture, write_recipe

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]

CASE_TIMEOUT_S = 30  # a hang is a failure: no command here needs more than a few seconds
SEED = 17
MB50 = 50 * 1024 * 1024


class Hang(BaseException):
    """Raised by SIGALRM: a BaseException, so that no ``except Exception`` in the CLI eats it."""


@dataclass
class Env:
    """What a case may use: its own directory, the shared fixture and a finished run."""

    tmp: Path
    fx: Path
    run: Path  # a finished 4-step run (checkpoints/step_00000002, step_00000004)
    marker: Path

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
        return path

    @property
    def tokenizer(self) -> Path:
        return self.fx / "tokenizer"

    def recipe_tree(self) -> dict[str, Any]:
        tree = yaml.safe_load((self.run.parent / f"{self.run.name}.yaml").read_text(encoding="utf-8"))
        tree["logging"]["run_dir"] = str(self.tmp / "run")
        return tree

    def recipe(self, tree: dict[str, Any] | None = None, name: str = "r.yaml") -> Path:
        return self.write(name, yaml.safe_dump(self.recipe_tree() if tree is None else tree))

    def checkpoint(self, step: int = 4) -> Path:
        """A private copy of the run's checkpoints directory; its ``step_N``."""
        root = self.tmp / "ckpts"
        if not root.exists():
            shutil.copytree(self.run / "checkpoints", root)
        return root / f"step_{step:08d}"


@dataclass
class Expect:
    argv: list[str]
    names: list[str] = field(default_factory=list)  # each must appear in the error line
    codes: tuple[int, ...] = (2,)
    stdout: str | None = None  # when it exits 0: text its output must hold (a count of what it dropped)
    verdicts: tuple[int, ...] = (0,)  # exit codes that are an answer, not an error (the gate's REJECT is 1)
    max_s: float | None = None  # a bound on its wall time, where speed is the point


@dataclass
class Case:
    id: str
    make: Callable[[Env], Expect]


CASES: list[Case] = []


def case(cid: str):
    def register(fn: Callable[[Env], Expect]) -> Callable[[Env], Expect]:
        CASES.append(Case(cid, fn))
        return fn
    return register


def add(cid: str, fn: Callable[[Env], Expect]) -> None:
    CASES.append(Case(cid, fn))


# ---------------------------------------------------------------------------------- helpers
def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_obj(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


HUGE_INT = "9" * 5000
SURROGATE = '"\\ud800"'


def payload_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    return pickle.dumps({"state": Payload()})


def show(path: Path, *overrides: str) -> list[str]:
    return ["recipe", "show", str(path), *overrides]


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return tree


def drop_path(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        node = node[key]
    del node[last]
    return tree


# ---------------------------------------------------------------------------------- recipes
def _field_case(dotted: str, value: Any, names: list[str] | None = None, train: bool = False):
    def make(env: Env) -> Expect:
        path = env.recipe(set_path(env.recipe_tree(), dotted, value))
        argv = ["train", str(path)] if train else show(path)
        return Expect(argv, [str(path), *(names or [dotted])])
    return make


RECIPE_FIELDS: list[tuple[str, str, Any]] = [
    ("wrong-type-lr", "train.lr", "fast"),
    ("wrong-type-sources", "data.sources", "he"),
    ("wrong-type-section", "train", [1, 2]),
    ("unknown-key", "train.lrr", 0.1),
    ("unknown-section", "trian", {"lr": 1}),
    ("bad-unit-tokens", "train.total_tokens", "12 parsecs"),
    ("negative-tokens", "train.warmup_tokens", "-5k"),
    ("nan-lr", "train.lr", float("nan")),
    ("inf-lr", "train.lr", float("inf")),
    ("float-dim", "model.init.hidden_size", 32.5),
    ("bool-dim", "model.init.hidden_size", True),
    ("zero-dim", "model.init.num_attention_heads", 0),
    ("negative-dim", "model.init.mamba_num_heads", -4),
    ("str-init-range", "model.init.initializer_range", "0.02"),
    ("str-routed-scaling", "model.init.routed_scaling_factor", "1.0"),
    ("seed-1e23", "train.seed", 1e23),
    ("seed-bool", "train.seed", True),
    ("lr-1e300", "train.lr", 1e300),
    ("seq-len-true", "data.seq_len", True),
    ("seq-len-huge", "data.seq_len", 10**30),
    ("global-batch-float", "train.global_batch", 8.5),
    ("keep-last-str", "checkpoint.keep_last", "two"),
    ("ramp-negative", "batch_size.ramp", "0:-8"),
    ("ramp-zero", "batch_size.ramp", "0:0 1k:8"),
    ("ramp-garbage", "batch_size.ramp", "0:8 x:y"),
    ("pattern-bad", "model.init.hybrid_override_pattern", "MQ*"),
    ("weight-negative", "data.sources", [{"name": "he", "path": "x", "weight": -1}]),
]
for _cid, _dotted, _value in RECIPE_FIELDS:
    add(f"recipe-{_cid}", _field_case(_dotted, _value, ["batch_size"] if _cid.startswith("ramp") else None))
add("recipe-train-seed-1e23", _field_case("train.seed", 1e23, train=True))
add("recipe-train-global-batch-10-to-12", _field_case("train.global_batch", 10**12, train=True))
add("recipe-train-seq-len-true", _field_case("data.seq_len", True, train=True))
add("recipe-train-bool-dim", _field_case("model.init.hidden_size", True, train=True))
add("recipe-train-str-init-range", _field_case("model.init.initializer_range", "0.02", train=True))


@case("recipe-missing-section")
def _(env: Env) -> Expect:
    path = env.recipe(drop_path(env.recipe_tree(), "tokenizer"))
    return Expect(show(path), [str(path), "tokenizer"])


@case("recipe-missing-key")
def _(env: Env) -> Expect:
    path = env.recipe(drop_path(env.recipe_tree(), "data.seq_len"))
    return Expect(show(path), [str(path), "data.seq_len"])


@case("recipe-empty-file")
def _(env: Env) -> Expect:
    path = env.write("empty.yaml", "")
    return Expect(show(path), [str(path)])


@case("recipe-top-level-list")
def _(env: Env) -> Expect:
    path = env.write("list.yaml", "- 1\n- 2\n")
    return Expect(show(path), [str(path)])


@case("recipe-directory")
def _(env: Env) -> Expect:
    (env.tmp / "adir.yaml").mkdir()
    return Expect(show(env.tmp / "adir.yaml"), [str(env.tmp / "adir.yaml")])


@case("recipe-invalid-utf8")
def _(env: Env) -> Expect:
    path = env.write("bad.yaml", b"train:\n  lr: \xff\xfe\n")
    return Expect(show(path), [str(path)])


@case("recipe-lone-surrogate")
def _(env: Env) -> Expect:
    path = env.write("sur.yaml", f"train:\n  lr: {SURROGATE}\n")
    return Expect(show(path), [str(path), "train.lr"])


@case("recipe-huge-int")
def _(env: Env) -> Expect:
    path = env.write("huge.yaml", f"train:\n  seed: {HUGE_INT}\n")
    return Expect(show(path), [str(path)])


@case("recipe-billion-laughs")
def _(env: Env) -> Expect:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("model: {init: *a9}")
    path = env.write("laughs.yaml", "\n".join(lines) + "\n")
    return Expect(show(path), [str(path)])


@case("recipe-alias-cycle")
def _(env: Env) -> Expect:
    path = env.write("cycle.yaml", "train: &t\n  self: *t\n")
    return Expect(show(path), [str(path)])


@case("recipe-deep-flow")
def _(env: Env) -> Expect:
    path = env.write("deep.yaml", "train: " + deep_json(100_000) + "\n")
    return Expect(show(path), [str(path)])


@case("recipe-deep-block")
def _(env: Env) -> Expect:
    path = env.write("deepb.yaml", "".join(" " * i + "a:\n" for i in range(3000)) + " " * 3000 + "a: 1\n")
    return Expect(show(path), [str(path)])


@case("recipe-python-tag")
def _(env: Env) -> Expect:
    path = env.write("tag.yaml", f"train:\n  lr: !!python/object/apply:builtins.open [{str(env.marker)!r}, w]\n")
    return Expect(show(path), [str(path)])


@case("recipe-duplicate-key")
def _(env: Env) -> Expect:
    path = env.write("dup.yaml", "train:\n  lr: 1\n  lr: 2\n")
    return Expect(show(path), [str(path), "lr"])


@case("recipe-extends-cycle")
def _(env: Env) -> Expect:
    env.write("a.yaml", "extends: b.yaml\n")
    env.write("b.yaml", "extends: a.yaml\n")
    return Expect(show(env.tmp / "a.yaml"), ["a.yaml", "extends"])


@case("recipe-extends-self")
def _(env: Env) -> Expect:
    path = env.write("s.yaml", "extends: s.yaml\n")
    return Expect(show(path), [str(path), "extends"])


@case("recipe-extends-missing")
def _(env: Env) -> Expect:
    path = env.write("m.yaml", "extends: nowhere.yaml\n")
    return Expect(show(path), [str(path), "nowhere.yaml"])


@case("recipe-extends-wrong-type")
def _(env: Env) -> Expect:
    path = env.write("w.yaml", "extends: {a: 1}\n")
    return Expect(show(path), [str(path), "extends"])


@case("recipe-extends-directory")
def _(env: Env) -> Expect:
    (env.tmp / "parent.yaml").mkdir()
    path = env.write("d.yaml", "extends: parent.yaml\n")
    return Expect(show(path), [str(path), "parent.yaml"])


@case("recipe-extends-invalid-utf8")
def _(env: Env) -> Expect:
    env.write("pu.yaml", b"train: \xc3\x28\n")
    path = env.write("cu.yaml", "extends: pu.yaml\n")
    return Expect(show(path), ["pu.yaml"])


@case("recipe-model-init-30000-keys")
def _(env: Env) -> Expect:
    tree = env.recipe_tree()
    tree["model"]["init"].update({f"k{i}": i for i in range(30_000)})  # unknown keys: refused, fast
    path = env.recipe(tree)
    return Expect(show(path), [str(path), "model.init.k0", "29999 more"], codes=(2,), max_s=10)


@case("recipe-checkpoint-dir-is-a-file")
def _(env: Env) -> Expect:
    blocker = env.write("blocker", "a file\n")
    path = env.recipe(set_path(env.recipe_tree(), "checkpoint.dir", str(blocker)))
    return Expect(["train", str(path)], [str(path), "checkpoint.dir"])


@case("recipe-run-dir-under-a-file")
def _(env: Env) -> Expect:
    blocker = env.write("blocker", "a file\n")
    path = env.recipe(set_path(env.recipe_tree(), "logging.run_dir", str(blocker / "run")))
    return Expect(["train", str(path)], [str(path), "logging.run_dir"])


OVERRIDES: list[tuple[str, str]] = [
    ("global-batch-1e12", "train.global_batch=1e12"),
    ("global-batch-10-to-12", "train.global_batch=1000000000000"),
    ("micro-batch-10-to-12", "train.micro_batch=1000000000000"),
    ("total-tokens-huge", "train.total_tokens=1e30"),
    ("lr-abc", "train.lr=abc"),
    ("lr-1e300", "train.lr=1e300"),
    ("seed-1e23", "train.seed=1e23"),
    ("seq-len-true", "data.seq_len=true"),
    ("hidden-float", "model.init.hidden_size=32.5"),
    ("unknown-key", "train.nope=1"),
    ("no-equals", "train.lr"),
    ("into-scalar", "train.lr.x=1"),
    ("ramp-negative", "batch_size.ramp=0:-8"),
    ("huge-int", f"train.seed={HUGE_INT}"),
    ("deep-value", "train.lr=" + deep_json(50_000)),
    ("surrogate", "train.lr=\ud800"),
]
for _cid, _ov in OVERRIDES:
    def _override(env: Env, _ov: str = _ov) -> Expect:
        path = env.recipe()
        key = _ov.split("=", 1)[0]
        return Expect(["train", str(path), _ov], [key, "override" if "=" in _ov else key])
    add(f"recipe-override-{_cid}", _override)


MUTATIONS: list[Any] = ["", "x", -1, 0, 1e400, -1e-300, True, None, [], {}, [1, "a"], {"k": "v"}, "1e999", "3 tokens"]


def _seeded_mutations(n: int) -> list[tuple[str, Any]]:
    """(field, hostile value) pairs drawn with a fixed seed from the fixture recipe's leaves."""
    tree = yaml.safe_load(yaml.safe_dump({"train": {"global_batch": 8, "micro_batch": 4, "lr": 3e-3, "min_lr": 3e-4,
                                                    "warmup_tokens": 256, "total_steps": 12, "seed": 7,
                                                    "eval_interval": 4, "eval_batches": 2},
                                          "model": {"init": TINY_MODEL},
                                          "checkpoint": {"interval": 4, "keep_last": 2},
                                          "logging": {"log_interval": 1}}))
    leaves = [f"{s}.{k}" for s, sec in tree.items() for k in sec if s != "model"]
    leaves += [f"model.init.{k}" for k in TINY_MODEL]
    rng = random.Random(SEED)
    return [(rng.choice(leaves), rng.choice(MUTATIONS)) for _ in range(n)]


def _mutation(dotted: str, value: Any):
    def make(env: Env) -> Expect:
        path = env.recipe(set_path(env.recipe_tree(), dotted, value))
        return Expect(show(path), [str(path), dotted], codes=(0, 2))
    return make


for _i, (_dotted, _value) in enumerate(_seeded_mutations(40)):
    add(f"recipe-mutation-{_i:02d}-{_dotted}", _mutation(_dotted, _value))


# ---------------------------------------------------------------------------------- CPT data
def _jsonl(lines: list[str | bytes]) -> bytes:
    return b"".join((ln if isinstance(ln, bytes) else ln.encode("utf-8", "surrogatepass")) + b"\n" for ln in lines)


GOOD = ['{"text": "שלום עולם hello world", "lang": "he"}', '{"text": "book house child water", "lang": "en"}']

BAD_JSONL: list[tuple[str, list[str | bytes], str | None]] = [
    # (id, lines, field the error names; None: only the file:line)
    ("broken-json", [*GOOD, '{"text": "unterminated'], None),
    ("not-an-object", [*GOOD, "[1, 2, 3]"], "text"),
    ("non-utf8", [*GOOD, b'{"text": "\xff\xfe bad"}'], None),
    ("missing-text", [*GOOD, '{"body": "x"}'], "text"),
    ("text-int", [*GOOD, '{"text": 5}'], "text"),
    ("text-list", [*GOOD, '{"text": ["a", "b"]}'], "text"),
    ("text-null", [*GOOD, '{"text": null}'], "text"),
    ("lang-int", [*GOOD, '{"text": "abc", "lang": 3}'], "lang"),
    ("deep-nesting", [*GOOD, '{"text": "a", "x": ' + deep_json(100_000) + "}"], None),
    ("huge-int", [*GOOD, '{"text": "a", "n": ' + HUGE_INT + "}"], None),
    ("lone-surrogate", [*GOOD, '{"text": ' + SURROGATE + "}"], "text"),
    ("line-50mb-broken", [*GOOD, '{"text": "' + "א" * (MB50 // 2)], None),
]


def _where(path: Path, lines: list) -> str:
    return f"{path}:{len(lines)}"


for _cid, _lines, _field in BAD_JSONL:
    def _prepare(env: Env, _lines=_lines, _field=_field) -> Expect:
        path = env.write("in.jsonl", _jsonl(_lines))
        argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out")]
        return Expect(argv, [_where(path, _lines), *([_field] if _field else [])])
    add(f"cpt-prepare-{_cid}", _prepare)

    def _dedup(env: Env, _lines=_lines, _field=_field) -> Expect:
        path = env.write("in.jsonl", _jsonl(_lines))
        argv = ["data", "dedup", "--input", str(path), "--out", str(env.tmp / "dedup")]
        return Expect(argv, [_where(path, _lines), *([_field] if _field else [])])
    if _cid not in ("lang-int", "line-50mb-broken"):
        add(f"cpt-dedup-{_cid}", _dedup)

    def _tok_train(env: Env, _lines=_lines, _field=_field, _cid=_cid) -> Expect:
        path = env.write("in.jsonl", _jsonl(_lines))
        argv = ["tokenizer", "train", "--input", str(path), "--vocab-size", "300", "--out", str(env.tmp / "tok")]
        if _cid in ("missing-text", "text-int", "text-list", "text-null", "not-an-object"):
            # a record without usable text is skipped, and the skip is counted in the output
            return Expect(argv, [_where(path, _lines), "text"], codes=(0, 2), stdout="skipped 1")
        return Expect(argv, [_where(path, _lines) if _cid != "non-utf8" else str(path)])
    if _cid not in ("lang-int", "line-50mb-broken"):
        add(f"tok-train-{_cid}", _tok_train)


@case("cpt-prepare-nul-bytes")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, json.dumps({"text": "a\u0000b\u0000 שלום"})]))
    argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out")]
    return Expect(argv, [str(path)], codes=(0, 2), stdout="3 documents")


@case("cpt-prepare-raw-nul-bytes")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, b'{"text": "a\x00b"}']))
    argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out")]
    return Expect(argv, [f"{path}:3"])


@case("cpt-prepare-line-50mb-no-text")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, '{"body": "' + "x" * MB50 + '"}']))
    argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out")]
    return Expect(argv, [f"{path}:3", "text"])


@case("cpt-prepare-empty-skipped-is-counted")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, '{"text": "   "}']))
    argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out"),
            "--skip-empty"]
    return Expect(argv, [str(path)], codes=(0,), stdout="skipped 1 empty")


def _parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


PARQUET_TEXT: list[tuple[str, dict[str, list], str]] = [
    ("no-text-column", {"body": ["a", "b"]}, "text"),
    ("text-int-column", {"text": [1, 2]}, "text"),
    ("text-list-column", {"text": [["a"], ["b"]]}, "text"),
    ("text-struct-column", {"text": [{"a": 1}, {"a": 2}]}, "text"),
    ("lang-int-column", {"text": ["a b", "c d"], "lang": [1, 2]}, "lang"),
    ("text-null", {"text": ["a b", None]}, "text"),
]
for _cid, _cols, _field in PARQUET_TEXT:
    def _pq_prepare(env: Env, _cols=_cols, _field=_field) -> Expect:
        path = _parquet(env.tmp / "in.parquet", _cols)
        argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out")]
        return Expect(argv, [str(path), _field])
    add(f"cpt-parquet-{_cid}", _pq_prepare)

    def _pq_dedup(env: Env, _cols=_cols, _field=_field) -> Expect:
        path = _parquet(env.tmp / "in.parquet", _cols)
        return Expect(["data", "dedup", "--input", str(path), "--out", str(env.tmp / "dd")], [str(path), _field])
    if _cid != "lang-int-column":
        add(f"cpt-dedup-parquet-{_cid}", _pq_dedup)


@case("cpt-parquet-damaged")
def _(env: Env) -> Expect:
    path = env.write("in.parquet", b"PAR1" + bytes(random.Random(SEED).randrange(256) for _ in range(300)) + b"PAR1")
    argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out")]
    return Expect(argv, [str(path)])


@case("cpt-parquet-truncated")
def _(env: Env) -> Expect:
    path = _parquet(env.tmp / "good.parquet", {"text": ["a b"] * 100})
    bad = env.write("in.parquet", path.read_bytes()[:-20])
    argv = ["data", "prepare", "--input", str(bad), "--tokenizer", str(env.tokenizer), "--out", str(env.tmp / "out")]
    return Expect(argv, [str(bad)])


@case("cpt-out-under-a-file")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl(GOOD))
    blocker = env.write("blocker", "x")
    argv = ["data", "prepare", "--input", str(path), "--tokenizer", str(env.tokenizer), "--out", str(blocker / "out")]
    return Expect(argv, [str(blocker)])


@case("tok-train-all-records-unusable")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl(['{"body": 1}', '{"text": 3}']))
    argv = ["tokenizer", "train", "--input", str(path), "--vocab-size", "300", "--out", str(env.tmp / "tok")]
    return Expect(argv, [str(path), "text"])


@case("tok-train-nul-bytes")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, json.dumps({"text": "a\u0000b"})]))
    argv = ["tokenizer", "train", "--input", str(path), "--vocab-size", "300", "--out", str(env.tmp / "tok")]
    return Expect(argv, [str(path)], codes=(0,))


@case("tok-report-deep-nesting")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, deep_obj(50_000, '"x"')]))
    return Expect(["tokenizer", "report", "--text", str(path), str(env.tokenizer)], [f"{path}:3"])


@case("tok-report-non-utf8")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, b'{"text": "\xc3\x28"}']))
    return Expect(["tokenizer", "report", "--text", str(path), str(env.tokenizer)], [str(path)])


@case("tok-report-missing-text-is-counted")
def _(env: Env) -> Expect:
    path = env.write("in.jsonl", _jsonl([*GOOD, '{"body": "x"}']))
    return Expect(["tokenizer", "report", "--json", "--text", str(path), str(env.tokenizer)], [f"{path}:3", "text"],
                  codes=(0, 2), stdout="skipped")


# ---------------------------------------------------------------------------------- chat data
CONV = json.dumps({"messages": [{"role": "user", "content": "שלום"}, {"role": "assistant", "content": "hello world"}]},
                  ensure_ascii=False)

BAD_CHAT: list[tuple[str, list[str | bytes]]] = [
    ("broken-json", [CONV, '{"messages": [']),
    ("non-utf8", [CONV, b'{"messages": "\xff"}']),
    ("missing-messages", [CONV, '{"msgs": []}']),
    ("messages-string", [CONV, '{"messages": "hi"}']),
    ("content-int", [CONV, '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}']),
    ("content-list", [CONV, '{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "x"}]}']),
    ("role-missing", [CONV, '{"messages": [{"content": "a"}, {"role": "assistant", "content": "x"}]}']),
    ("not-an-object", [CONV, "42"]),
    ("nul-bytes", [CONV, json.dumps({"messages": [{"role": "user", "content": "a\u0000"},
                                                  {"role": "assistant", "content": "b\u0000c"}]})]),
    ("deep-nesting", [CONV, '{"messages": ' + deep_json(100_000) + "}"]),
    ("huge-int", [CONV, '{"messages": [], "n": ' + HUGE_INT + "}"]),
    ("lone-surrogate", [CONV, '{"messages": [{"role": "user", "content": ' + SURROGATE
                        + '}, {"role": "assistant", "content": "x"}]}']),
    ("line-50mb", [CONV, '{"messages": [{"role": "user", "content": "' + "x" * MB50 + '"}]}']),
]
for _cid, _lines in BAD_CHAT:
    def _pack(env: Env, _lines=_lines, _cid=_cid) -> Expect:
        path = env.write("chat.jsonl", _jsonl(_lines))
        argv = ["data", "pack", "--input", str(path), "--tokenizer", str(env.tokenizer), "--seq-len", "64",
                "--out", str(env.tmp / "packed.parquet"), "--template", "chatml"]
        # a bad conversation is dropped and counted; nul bytes are text like any other
        return Expect(argv, [str(path)], codes=(0,), stdout="kept 1" if _cid != "nul-bytes" else "kept 2")
    add(f"chat-pack-{_cid}", _pack)

    def _pack_strict(env: Env, _lines=_lines, _cid=_cid) -> Expect:
        path = env.write("chat.jsonl", _jsonl(_lines))
        argv = ["data", "pack", "--input", str(path), "--tokenizer", str(env.tokenizer), "--seq-len", "64",
                "--out", str(env.tmp / "packed.parquet"), "--template", "chatml", "--strict"]
        return Expect(argv, [f"{path}:2"], codes=(0, 2) if _cid == "nul-bytes" else (2,))
    if _cid not in ("line-50mb",):
        add(f"chat-pack-strict-{_cid}", _pack_strict)


PARQUET_CHAT: list[tuple[str, dict[str, list]]] = [
    ("no-messages-column", {"text": ["a", "b"]}),
    ("messages-string-column", {"messages": ["hi", "there"]}),
    ("messages-int-column", {"messages": [1, 2]}),
    ("content-int", {"messages": [[{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]]}),
]
for _cid, _cols in PARQUET_CHAT:
    def _pq_pack(env: Env, _cols=_cols, _cid=_cid) -> Expect:
        path = _parquet(env.tmp / "chat.parquet", _cols)
        argv = ["data", "pack", "--input", str(path), "--tokenizer", str(env.tokenizer), "--seq-len", "64",
                "--out", str(env.tmp / "packed.parquet"), "--template", "chatml"]
        if _cid == "no-messages-column":
            return Expect(argv, [str(path), "messages"])
        return Expect(argv, [str(path), "messages"], codes=(2,))
    add(f"chat-parquet-{_cid}", _pq_pack)


# ---------------------------------------------------------------------------------- checkpoints
def _export(env: Env, ckpt: Path) -> list[str]:
    return ["export", str(ckpt), "--hf", str(env.tmp / "hf")]


def _restamp(ckpt: Path) -> None:
    """Rewrite the manifest after a mutation, so that the reader behind the size check is tested."""
    from hebtron.checkpoints import write_manifest

    write_manifest(ckpt, int(ckpt.name.split("_")[1]))


@case("ckpt-truncated-safetensors")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return Expect(_export(env, ckpt), [str(f)])


@case("ckpt-truncated-safetensors-restamped")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _restamp(ckpt)
    return Expect(_export(env, ckpt), [str(f)])


@case("ckpt-safetensors-bad-header")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**15) + data[8:])
    _restamp(ckpt)
    return Expect(_export(env, ckpt), [str(f)])


@case("ckpt-safetensors-header-junk")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    f = ckpt / "model.safetensors"
    junk = b"{" + b"[" * 5000
    f.write_bytes(struct.pack("<Q", len(junk)) + junk)
    _restamp(ckpt)
    return Expect(_export(env, ckpt), [str(f)])


def _reshape_first(ckpt: Path, drop: str | None = None) -> str:
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(f))
    name = sorted(k for k in tensors if tensors[k].dim() == 2)[0]
    if drop:
        name = sorted(tensors)[0]
        del tensors[name]
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(f), metadata=meta)
    _restamp(ckpt)
    return name


@case("ckpt-wrong-shape-export")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    name = _reshape_first(ckpt)
    return Expect(_export(env, ckpt), [name])


@case("ckpt-wrong-shape-resume")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    name = _reshape_first(ckpt)
    return Expect(["train", str(env.recipe()), "--resume", str(ckpt)], [name])


@case("ckpt-missing-tensor-resume")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    _reshape_first(ckpt, drop="first")
    return Expect(["train", str(env.recipe()), "--resume", str(ckpt)], [str(ckpt)])


CONFIG_JSON: list[tuple[str, str | None]] = [
    ("huge-int", '{"hidden_size": ' + HUGE_INT + "}"),
    ("deep-nesting", deep_obj(100_000)),
    ("not-json", "{hidden_size: 32"),
    ("a-list", "[1, 2]"),
    ("non-utf8", None),
    ("hidden-float", None),
    ("hidden-string", None),
]


def _broken_config(env: Env, cid: str, text: str | None) -> tuple[Path, Path]:
    ckpt = env.checkpoint()
    cfg = ckpt / "config.json"
    if cid == "non-utf8":
        cfg.write_bytes(b'{"hidden_size": "\xff"}')
    elif cid == "hidden-float":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hidden_size": 32.5}))
    elif cid == "hidden-string":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hidden_size": "32"}))
    else:
        cfg.write_text(text)
    _restamp(ckpt)
    return ckpt, cfg


for _cid, _text in CONFIG_JSON:
    def _cfg_export(env: Env, _cid=_cid, _text=_text) -> Expect:
        ckpt, cfg = _broken_config(env, _cid, _text)
        return Expect(_export(env, ckpt), [str(cfg), *(["hidden_size"] if _cid.startswith("hidden") else [])])
    add(f"ckpt-config-{_cid}-export", _cfg_export)

    def _cfg_info(env: Env, _cid=_cid, _text=_text) -> Expect:
        _, cfg = _broken_config(env, _cid, _text)
        return Expect(["model", "info", str(cfg)], [str(cfg), *(["hidden_size"] if _cid.startswith("hidden") else [])])
    add(f"ckpt-config-{_cid}-model-info", _cfg_info)


@case("ckpt-config-directory")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    cfg = ckpt / "config.json"
    cfg.unlink()
    cfg.mkdir()
    return Expect(_export(env, ckpt), [str(cfg)])


@case("ckpt-config-directory-model-info")
def _(env: Env) -> Expect:
    d = env.tmp / "hfdir"
    (d / "config.json").mkdir(parents=True)
    return Expect(["model", "info", str(d)], [str(d / "config.json")])


def _hf_dir(env: Env) -> Path:
    """An exported HF directory of the run's last checkpoint."""
    out = env.tmp / "hf_src"
    assert main(_export(env, env.checkpoint())[:2] + ["--hf", str(out)]) == 0
    return out


@case("ckpt-index-weight-map-list")
def _(env: Env) -> Expect:
    hf = _hf_dir(env)
    index = hf / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": ["model.safetensors"]}))
    return Expect(["convert", "hf-to-megatron", str(hf), str(env.tmp / "meg")], [str(index), "weight_map"])


@case("ckpt-index-deep")
def _(env: Env) -> Expect:
    hf = _hf_dir(env)
    index = hf / "model.safetensors.index.json"
    index.write_text(deep_obj(100_000))
    return Expect(["convert", "hf-to-megatron", str(hf), str(env.tmp / "meg")], [str(index)])


@case("ckpt-index-points-nowhere")
def _(env: Env) -> Expect:
    hf = _hf_dir(env)
    index = hf / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"backbone.embeddings.weight": "../../etc/nothing.safetensors"}}))
    return Expect(["convert", "hf-to-megatron", str(hf), str(env.tmp / "meg")], [str(index)])


STATES: list[tuple[str, Callable[[dict], dict], str]] = [
    ("extra-list", lambda s: {**s, "extra": [1, 2]}, "extra"),
    ("extra-missing", lambda s: {k: v for k, v in s.items() if k != "extra"}, "extra"),
    ("step-string", lambda s: {**s, "step": "4"}, "step"),
    ("rng-missing", lambda s: {**s, "extra": {k: v for k, v in s["extra"].items() if k != "rng"}}, "rng"),
    ("rng-string", lambda s: {**s, "extra": {**s["extra"], "rng": "abc"}}, "rng"),
    ("rng-torch-garbage", lambda s: {**s, "extra": {**s["extra"], "rng": {**s["extra"]["rng"], "torch": [1, 2, 3]}}},
     "rng"),
    ("rng-python-garbage", lambda s: {**s, "extra": {**s["extra"], "rng": {**s["extra"]["rng"], "python": 5}}}, "rng"),
    ("rng-numpy-garbage", lambda s: {**s, "extra": {**s["extra"], "rng": {**s["extra"]["rng"], "numpy": ["x"]}}},
     "rng"),
    ("extra-tokens-string", lambda s: {**s, "extra": {**s["extra"], "tokens": "many"}}, "tokens"),
    # the MoE monitor's state (restored by the engine, not the trainer): a mutation once hit it
    ("moe-monitor-garbage", lambda s: {**s, "extra": {**s["extra"], "moe": {**s["extra"]["moe"], "monitor": {}}}}, "moe"),
    ("moe-multiplier-string", lambda s: {**s, "extra": {**s["extra"], "moe": {**s["extra"]["moe"], "multiplier": "x"}}},
     "moe"),
    ("huge-int", None, ""),
    ("deep", None, ""),
]
for _cid, _mut, _field in STATES:
    def _state(env: Env, _cid=_cid, _mut=_mut, _field=_field) -> Expect:
        ckpt = env.checkpoint()
        f = ckpt / "trainer_state.json"
        if _cid == "huge-int":
            f.write_text('{"step": ' + HUGE_INT + ', "extra": {}}')
        elif _cid == "deep":
            f.write_text('{"step": 4, "extra": ' + deep_obj(100_000) + "}")
        else:
            f.write_text(json.dumps(_mut(json.loads(f.read_text()))))
        _restamp(ckpt)
        return Expect(["train", str(env.recipe()), "--resume", str(ckpt)], [str(f), *([_field] if _field else [])])
    add(f"ckpt-state-{_cid}", _state)


@case("ckpt-optimizer-pickle-payload")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    (ckpt / "optimizer.pt").write_bytes(payload_pickle(env.marker))
    _restamp(ckpt)  # even vouched for by the manifest, it is read with weights_only
    return Expect(["train", str(env.recipe()), "--resume", str(ckpt)], [str(ckpt / "optimizer.pt")])


@case("ckpt-optimizer-torch-save-payload")
def _(env: Env) -> Expect:
    import torch

    ckpt = env.checkpoint()

    class Payload:
        def __reduce__(self):
            return (open, (str(env.marker), "w"))

    torch.save({"state": Payload()}, ckpt / "optimizer.pt")
    _restamp(ckpt)
    return Expect(["train", str(env.recipe()), "--resume", str(ckpt)], [str(ckpt / "optimizer.pt")])


@case("ckpt-optimizer-garbage")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    (ckpt / "optimizer.pt").write_bytes(b"\x80\x05garbage")
    _restamp(ckpt)
    return Expect(["train", str(env.recipe()), "--resume", str(ckpt)], [str(ckpt / "optimizer.pt")])


def _latest(env: Env, how: str) -> Path:
    ckpt = env.checkpoint()
    root = ckpt.parent
    latest = root / "latest"
    latest.unlink()
    if how == "nowhere":
        latest.write_text("step_00009999\n")
    elif how == "directory":
        latest.mkdir()
    elif how == "binary":
        latest.write_bytes(bytes(range(256)) * 4)
    elif how == "junk-name":
        latest.write_text("../../etc\n")
    elif how == "nothing-complete":
        latest.write_text("step_00009999\n")
        for p in root.glob("step_*"):
            (p / "COMPLETE").unlink()
    return root


for _how in ("nowhere", "directory", "binary", "junk-name"):
    def _latest_export(env: Env, _how=_how) -> Expect:
        root = _latest(env, _how)
        # falls back to the newest complete checkpoint (the pointer is a hint), or refuses in one line
        return Expect(_export(env, root), [str(root)], codes=(0, 2), stdout="exported")
    add(f"ckpt-latest-{_how}-export", _latest_export)

    def _latest_resume(env: Env, _how=_how) -> Expect:
        root = _latest(env, _how)
        tree = set_path(env.recipe_tree(), "checkpoint.dir", str(root))
        tree["train"]["total_steps"] = 4  # resumes at 4 of 4: nothing left to train
        return Expect(["train", str(env.recipe(tree)), "--resume", "auto"], [str(root)], codes=(0, 2), stdout="done")
    add(f"ckpt-latest-{_how}-resume", _latest_resume)


@case("ckpt-latest-nothing-complete-export")
def _(env: Env) -> Expect:
    root = _latest(env, "nothing-complete")
    return Expect(_export(env, root), [str(root)])


@case("ckpt-resume-not-a-checkpoint")
def _(env: Env) -> Expect:
    f = env.write("notackpt", "x")
    return Expect(["train", str(env.recipe()), "--resume", str(f)], [str(f)])


@case("ckpt-manifest-deep")
def _(env: Env) -> Expect:
    ckpt = env.checkpoint()
    (ckpt / "COMPLETE").write_text(deep_obj(100_000))
    return Expect(_export(env, ckpt), [str(ckpt / "COMPLETE")])


@case("ckpt-export-out-is-a-file")
def _(env: Env) -> Expect:
    blocker = env.write("blocker", "x")
    return Expect(["export", str(env.checkpoint()), "--hf", str(blocker)], [str(blocker)])


# ---------------------------------------------------------------------------------- eval files
RESULTS_OK = {"results": {"t": {"acc,none": 0.5}}, "versions": {}, "config": {}}


def _gate_files(env: Env) -> tuple[Path, Path, Path]:
    cand = env.write("cand.json", json.dumps(RESULTS_OK))
    base = env.write("base.json", json.dumps(RESULTS_OK))
    policy = env.write("policy.yaml", "suite: s\ntasks:\n  t: {metric: acc, max_drop: 0.1}\n")
    return cand, base, policy


def _gate(cand: Path, base: Path, policy: Path) -> list[str]:
    return ["eval", "gate", "--candidate", str(cand), "--baseline", str(base), "--policy", str(policy)]


HOSTILE_FILES: list[tuple[str, bytes]] = [
    ("invalid-utf8", b"checks: \xff\xfe\n"),
    ("deep-yaml", b"checks: " + deep_json(100_000).encode() + b"\n"),
    ("deep-json", deep_obj(100_000).encode()),
    ("huge-int", b'{"results": {"t": {"acc,none": ' + HUGE_INT.encode() + b"}}}"),
    ("a-list", b"[1, 2, 3]\n"),
    ("billion-laughs", ("a0: &a0 [" + ",".join(['"lol"'] * 10) + "]\n" + "".join(
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)) + "checks: *a9\n").encode()),
    ("empty", b""),
]
for _cid, _data in HOSTILE_FILES:
    def _gate_policy(env: Env, _data=_data) -> Expect:
        cand, base, policy = _gate_files(env)
        policy.write_bytes(_data)
        return Expect(_gate(cand, base, policy), [str(policy)])
    add(f"eval-gate-policy-{_cid}", _gate_policy)

    def _gate_results(env: Env, _data=_data) -> Expect:
        cand, base, policy = _gate_files(env)
        cand.write_bytes(_data)
        # unusable candidate results are the gate's verdict, not a usage error: REJECT (exit 1), saying why
        return Expect(_gate(cand, base, policy), [str(cand)], codes=(1,), verdicts=(1,), stdout=f"{cand}: ")
    add(f"eval-gate-results-{_cid}", _gate_results)

    def _suite(env: Env, _data=_data) -> Expect:
        suite = env.write("suite.yaml", _data)
        argv = ["eval", "run", "--suite", str(suite), "--checkpoint", str(env.checkpoint()), "--out",
                str(env.tmp / "res.json")]
        return Expect(argv, [str(suite)])
    add(f"eval-suite-{_cid}", _suite)


@case("eval-gate-policy-wrong-types")
def _(env: Env) -> Expect:
    cand, base, policy = _gate_files(env)
    policy.write_text("suite: s\ntasks:\n  t: {metric: [1], max_drop: fast}\n")
    return Expect(_gate(cand, base, policy), [str(policy), "tasks.t"])


@case("eval-suite-wrong-types")
def _(env: Env) -> Expect:
    suite = env.write("suite.yaml", "name: 5\ntasks: {a: 1}\nlimit: lots\n")
    argv = ["eval", "run", "--suite", str(suite), "--checkpoint", str(env.checkpoint()), "--out", str(env.tmp / "r.json")]
    return Expect(argv, [str(suite)])


@case("eval-suite-unknown-key")
def _(env: Env) -> Expect:
    suite = env.write("suite.yaml", "name: s\ntasks: [hebrew_x]\nbogus: 1\n")
    argv = ["eval", "run", "--suite", str(suite), "--checkpoint", str(env.checkpoint()), "--out", str(env.tmp / "r.json")]
    return Expect(argv, [str(suite), "bogus"])


# ---------------------------------------------------------------------------------- indexed data sidecars
def _data_copy(env: Env) -> tuple[dict[str, Any], Path]:
    """A recipe whose first source is a private copy of the fixture's he_train dataset; its prefix."""
    data = env.tmp / "data"
    data.mkdir()
    for f in (env.fx / "data").glob("he_train.*"):
        shutil.copy(f, data / f.name)
    tree = env.recipe_tree()
    tree["data"]["sources"][0]["path"] = str(data / "he_train")
    return tree, data / "he_train"


SIDECARS: list[tuple[str, str, bytes]] = [
    ("meta-deep", "meta.json", deep_obj(100_000).encode()),
    ("meta-huge-int", "meta.json", b'{"pad_id": ' + HUGE_INT.encode() + b"}"),
    ("meta-not-json", "meta.json", b"{pad_id: 3"),
    ("meta-a-list", "meta.json", b"[1]"),
    ("meta-non-utf8", "meta.json", b'{"tokenizer": "\xff"}'),
    ("idx-truncated", "idx", b"MMIDIDX\x00\x00"),
    ("idx-garbage", "idx", bytes(random.Random(SEED).randrange(256) for _ in range(64))),
    ("lang-garbage", "lang.npy", b"\x93NUMPY garbage"),
    ("lang-pickle", "lang.npy", b""),
]
for _cid, _suffix, _data in SIDECARS:
    def _sidecar(env: Env, _suffix=_suffix, _data=_data, _cid=_cid) -> Expect:
        tree, prefix = _data_copy(env)
        f = Path(f"{prefix}.{_suffix}")
        if _cid == "lang-pickle":  # an object array: np.load(allow_pickle=False) must refuse it
            import numpy as np

            np.save(f, np.array([_Payload(env.marker)], dtype=object), allow_pickle=True)
        else:
            f.write_bytes(_data)
        return Expect(["train", str(env.recipe(tree))], [str(f)])
    add(f"cpt-sidecar-{_cid}", _sidecar)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


ALIASES: list[tuple[str, str]] = [
    ("deep", deep_json(100_000)),
    ("a-list", "[1, 2]"),
    ("not-json", "{oops"),
    ("to-nowhere", '{"lm_head.weight": "nothing"}'),
    ("non-string", '{"lm_head.weight": 5}'),
]
for _cid, _aliases in ALIASES:
    def _alias(env: Env, _aliases=_aliases) -> Expect:
        from safetensors.torch import load_file, save_file

        ckpt = env.checkpoint()
        f = ckpt / "model.safetensors"
        save_file(load_file(str(f)), str(f), metadata={"format": "pt", "hebtron_aliases": _aliases})
        _restamp(ckpt)
        return Expect(["train", str(env.recipe()), "--resume", str(ckpt)], [str(f)])
    add(f"ckpt-safetensors-aliases-{_cid}", _alias)


@case("eval-table-gate-verdict-deep")
def _(env: Env) -> Expect:
    run = env.tmp / "evrun"
    gate = run / "step_00000004" / "eval" / "s.gate.json"
    gate.parent.mkdir(parents=True)
    gate.write_text(deep_obj(100_000))
    return Expect(["eval", "table", str(run)], [str(gate)], codes=(0, 2))


@case("eval-table-gate-verdict-wrong-shape")
def _(env: Env) -> Expect:
    run = env.tmp / "evrun"
    gate = run / "step_00000004" / "eval" / "s.gate.json"
    gate.parent.mkdir(parents=True)
    gate.write_text(json.dumps({"candidate": 5, "checks": [1, "x"]}))
    return Expect(["eval", "table", str(run)], [str(gate)], codes=(0, 2))


# ---------------------------------------------------------------------------------- seeded byte mutations
def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flip bytes, cut the tail, insert hostile bytes, duplicate a slice."""
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        del buf[rng.randrange(1, len(buf)):]
    elif kind == 2:
        at = rng.randrange(len(buf))
        buf[at:at] = rng.choice([b"\x00", b"\xff\xfe", b"[" * 50, b"{{", b"&a *a", b"\n  - ", b": :", b"\t", b'"', b"\xed\xa0\x80"])
    else:
        a = rng.randrange(len(buf))
        b = min(len(buf), a + rng.randint(1, 200))
        buf[b:b] = buf[a:b] * rng.randint(1, 5)
    return bytes(buf)


_BYTE_CLASS = {"recipe": "recipe", "config": "ckpt", "state": "ckpt", "chat": "chat"}
# pytest's base temp directory (with xdist's worker folder) differs from run to run and worker to
# worker; files that hold paths are mutated with it replaced by a fixed placeholder, so that the
# seeded mutations land on the same bytes every time
_BASETEMP = re.compile(rb"/[^\s\"']*?/pytest-\d+(?:/popen-gw\d+)?")
_PLACEHOLDER = b"/BASETEMP"


def mutate_file(path: Path, rng: random.Random, case_dir: Path) -> None:
    """:func:`mutate` ``path`` in place, on its bytes with the run-dependent directories (the
    case's own, numbered by pytest, then the base temp) stood in for by fixed placeholders."""
    data = path.read_bytes()
    swaps = [(str(case_dir).encode(), b"/CASEDIR")]
    bases = set(_BASETEMP.findall(data.replace(swaps[0][0], swaps[0][1])))
    assert len(bases) <= 1, bases
    swaps += [(base, _PLACEHOLDER) for base in bases]
    for real, fixed in swaps:
        data = data.replace(real, fixed)
    data = mutate(data, rng)
    for real, fixed in reversed(swaps):
        data = data.replace(fixed, real)
    path.write_bytes(data)


def _byte_case(target: str, n: int):
    for i in range(n):
        def make(env: Env, i=i) -> Expect:
            rng = random.Random(f"{SEED}-{target}-{i}")
            if target == "recipe":
                path = env.recipe()
                mutate_file(path, rng, env.tmp)
                return Expect(show(path), [str(path)], codes=(0, 2))
            if target == "config":
                ckpt = env.checkpoint()
                path = ckpt / "config.json"
                mutate_file(path, rng, env.tmp)
                return Expect(["model", "info", str(path)], [str(path)], codes=(0, 2))
            if target == "state":
                ckpt = env.checkpoint()
                path = ckpt / "trainer_state.json"
                mutate_file(path, rng, env.tmp)
                _restamp(ckpt)
                tree = env.recipe_tree()
                tree["train"]["total_steps"] = 4  # nothing left to train when the state still loads
                return Expect(["train", str(env.recipe(tree)), "--resume", str(ckpt)], [str(path)], codes=(0, 2))
            path = env.write("chat.jsonl", _jsonl([CONV, CONV, CONV]))
            mutate_file(path, rng, env.tmp)
            argv = ["data", "pack", "--input", str(path), "--tokenizer", str(env.tokenizer), "--seq-len", "64",
                    "--out", str(env.tmp / "packed.parquet"), "--template", "chatml"]
            return Expect(argv, [str(path)], codes=(0, 2), stdout="read ")
        add(f"{_BYTE_CLASS[target]}-bytes-{target}-{i:02d}",
            make)


_byte_case("recipe", 30)
_byte_case("config", 15)
_byte_case("state", 15)
_byte_case("chat", 10)


# ---------------------------------------------------------------------------------- code in data files
@case("payload-dcp-metadata-unvouched")
def _(env: Env) -> Expect:
    bare = _evil_dcp(env)
    return Expect(["convert", "megatron-to-hf", str(bare), str(env.tmp / "out"), "--model-config",
                   str(env.run / "checkpoints" / "step_00000004" / "config.json")], [str(bare / ".metadata")])


@case("payload-dcp-metadata-trusted")
def _(env: Env) -> Expect:
    bare = _evil_dcp(env)  # --trust-checkpoint: read, but still through the allow-list
    return Expect(["convert", "megatron-to-hf", str(bare), str(env.tmp / "out"), "--model-config",
                   str(env.run / "checkpoints" / "step_00000004" / "config.json"), "--trust-checkpoint"],
                  [str(bare / ".metadata")])


@case("payload-dcp-metadata-forged-manifest")
def _(env: Env) -> Expect:
    from hebtron.checkpoints import write_manifest

    bare = _evil_dcp(env)
    write_manifest(bare)  # a manifest that vouches for the payload: the allow-list still refuses it
    return Expect(["convert", "megatron-to-hf", str(bare), str(env.tmp / "out"), "--model-config",
                   str(env.run / "checkpoints" / "step_00000004" / "config.json")], [str(bare / ".metadata")])


def _evil_dcp(env: Env) -> Path:
    bare = env.tmp / "bare"
    bare.mkdir()
    (bare / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))
    (bare / ".metadata").write_bytes(payload_pickle(env.marker))
    return bare


def _evil_tokenizer(env: Env) -> Path:
    tok = env.tmp / "eviltok"
    shutil.copytree(env.tokenizer, tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config.update({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"})
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    (tok / "evil.py").write_text(f"open({str(env.marker)!r}, 'w').close()\n"
                                 "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return tok


@case("payload-tokenizer-auto-map-report")
def _(env: Env) -> Expect:
    text = env.write("t.jsonl", _jsonl(GOOD))
    tok = _evil_tokenizer(env)
    return Expect(["tokenizer", "report", "--text", str(text), str(tok)], [str(tok)])


@case("payload-tokenizer-auto-map-pack")
def _(env: Env) -> Expect:
    chat = env.write("chat.jsonl", _jsonl([CONV]))
    tok = _evil_tokenizer(env)
    return Expect(["data", "pack", "--input", str(chat), "--tokenizer", str(tok), "--seq-len", "64",
                   "--out", str(env.tmp / "p.parquet")], [str(tok)])


@case("payload-suite-trust-remote-code")
def _(env: Env) -> Expect:
    suite = env.write("suite.yaml", "name: s\ntasks: [hebrew_x]\nmodel_args: {trust_remote_code: true}\n")
    argv = ["eval", "run", "--suite", str(suite), "--checkpoint", str(env.checkpoint()), "--out", str(env.tmp / "r.json"),
            "--backend", "hf"]
    return Expect(argv, [str(suite), "trust_remote_code"])


# ---------------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path]:
    """The training fixture (tokenizer, indexed data) and a finished 4-step run with checkpoints."""
    fx = build_training_fixture(tmp_path_factory.getbasetemp() / "train_fixture")
    run = tmp_path_factory.mktemp("fuzz_run") / "run"
    recipe = write_recipe(fx, run, total_steps=4, eval_interval=2)
    assert main(["train", str(recipe), "checkpoint.interval=2", "checkpoint.keep_last=0"]) == 0
    return fx, run


def _on_alarm(signum, frame):
    raise Hang(f"no answer within {CASE_TIMEOUT_S} s")


@pytest.mark.parametrize("item", CASES, ids=[c.id for c in CASES])
def test_hostile_input(item: Case, shared, tmp_path, capsys):
    fx, run = shared
    env = Env(tmp_path, fx, run, tmp_path / "PAYLOAD_RAN")
    expect = item.make(env)
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_TIMEOUT_S)
    start = time.monotonic()
    try:
        code = main(expect.argv)
    except Hang as err:
        pytest.fail(f"hang: {err}")
    except SystemExit as err:  # argparse: a usage error is exit 2 with its usage lines
        code = err.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    took = time.monotonic() - start
    out, err = capsys.readouterr()
    shown = (out[-1500:] + "\n--- stderr ---\n" + err[-3000:])
    assert not env.marker.exists(), f"a payload ran\n{shown}"
    assert "Traceback" not in out + err, shown
    assert code in expect.codes, f"exit {code}, expected {expect.codes}\n{shown}"
    if expect.max_s is not None:
        assert took < expect.max_s, f"took {took:.1f} s, more than {expect.max_s} s"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code in expect.verdicts:
        assert not [ln for ln in lines if ln.startswith("error")], shown
        if expect.stdout:
            assert expect.stdout in out + err, f"expected {expect.stdout!r} in the output (what was dropped)\n{shown}"
        return
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, f"expected exactly one stderr line\n{shown}"
    line = errors[0]
    assert len(line) < 2500, f"the error line is {len(line)} characters"
    missing = [name for name in expect.names if name not in line]
    assert not missing, f"the error line does not name {missing}: {line}"


def test_the_corpus_is_seeded_and_covers_every_class():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert [c.id for c in CASES] == ids
    assert _seeded_mutations(40) == _seeded_mutations(40)
    for prefix in ("recipe-", "cpt-", "tok-", "chat-", "ckpt-", "eval-", "payload-"):
        assert any(i.startswith(prefix) for i in ids), prefix
