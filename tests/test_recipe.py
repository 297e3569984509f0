"""Recipe loading: schema, token counts, path resolution, inheritance, overrides, error lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from hebtron.errors import UserError
from hebtron.recipe import Recipe, dump_recipe, load_recipe, parse_token_count, recipe_json_schema
from tests.test_recipe_helpers import make_inputs, valid_tree, write, write_recipe

REPO = Path(__file__).resolve().parents[1]


def error_of(path: Path, overrides: list[str] = (), check_paths: bool = True) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides, check_paths=check_paths)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ------------------------------------------------------------------------------ token counts
@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("250B", 250 * 10**9), ("10M", 10 * 10**6), ("2k", 2000), ("2K", 2000), ("2.5M", 2_500_000),
        ("1T", 10**12), ("1e9", 10**9), ("1_000", 1000), (" 7 ", 7), (4096, 4096), (2.0e9, 2 * 10**9), ("0", 0),
    ],
)
def test_token_counts_parse(text: object, tokens: int) -> None:
    assert parse_token_count(text) == tokens


@pytest.mark.parametrize("bad", ["2.5", "1.5k5", "10 MB", "-1M", "1e30", "", "nan", True, None, 1.5, [1], float("inf")])
def test_token_counts_reject(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_token_count(bad)


# ------------------------------------------------------------------------------- loading
def test_valid_recipe_loads_with_defaults_and_absolute_paths(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path))
    assert isinstance(recipe, Recipe)
    assert recipe.tokenizer.path == tmp_path / "tok" / "tokenizer.json"
    assert [s.path for s in recipe.data.sources] == [tmp_path / "data" / "he", tmp_path / "data" / "en.jsonl"]
    assert [s.format for s in recipe.data.sources] == ["indexed", "jsonl"]
    assert recipe.data.phases[0].tokens == 2000
    assert recipe.data.phase_weights(recipe.data.phases[1]) == {"he": 3.0, "en": 0.0}
    assert recipe.train.total_tokens == 8000 and recipe.train.schedule == "wsd"
    assert recipe.tokens_per_step == 8 * 64 and recipe.planned_steps == 16  # ceil(8000 / 512)
    assert recipe.decay_token_count == 1600  # default WSD decay: last 20%
    assert recipe.checkpoint.dir == recipe.logging.run_dir / "checkpoints"
    assert recipe.backend == "native" and recipe.parallel.dp == 1
    assert recipe.train.early_kill.enabled is False


def test_checkpoint_dir_carries_its_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    tree = valid_tree()
    tree["model"] = {"hf_path": "ckpt", "dtype": "bfloat16"}
    del tree["tokenizer"]
    recipe = load_recipe(write_recipe(tmp_path, tree))
    assert recipe.model.hf_path == recipe.tokenizer.path == tmp_path / "ckpt"


def test_relative_path_falls_back_to_cwd_and_dot_slash_does_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe_dir, work = tmp_path / "recipes", tmp_path / "work"
    make_inputs(work)  # the data lives under the cwd, not next to the recipe
    tree = valid_tree()
    tree["logging"]["run_dir"] = "runs/x"
    path = write(recipe_dir / "r.yaml", tree)
    monkeypatch.chdir(work)
    recipe = load_recipe(path)
    assert recipe.data.sources[0].path == work / "data" / "he"
    assert recipe.logging.run_dir == work / "runs" / "x"  # outputs that exist nowhere: the cwd

    tree["data"]["sources"][0]["path"] = "./data/he"  # explicitly next to the recipe: not there
    message = error_of(write(recipe_dir / "r.yaml", tree))
    assert message.startswith(f"{path}: data.sources[0].path: indexed dataset")
    assert str(recipe_dir / "data" / "he") in message


def test_file_next_to_recipe_wins_over_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_recipe(tmp_path / "recipes")
    make_inputs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_recipe(path).data.sources[1].path == tmp_path / "recipes" / "data" / "en.jsonl"


def test_paths_in_a_parent_are_relative_to_the_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_recipe(tmp_path / "common", name="base.yaml")
    child = write(tmp_path / "cluster" / "run.yaml", {"extends": "../common/base.yaml", "logging": {"run_dir": "./out"}})
    monkeypatch.chdir(tmp_path / "cluster")
    recipe = load_recipe(child)
    assert recipe.data.sources[0].path == tmp_path / "common" / "data" / "he"
    assert recipe.logging.run_dir == tmp_path / "cluster" / "out"
    message = error_of(child, ["tokenizer.path=tok/tokenizer.json"])  # overrides: relative to the cwd
    assert message.startswith("override 'tokenizer.path=tok/tokenizer.json': tokenizer.path: path")
    assert f"looked for {tmp_path / 'cluster' / 'tok' / 'tokenizer.json'})" in message


def test_check_paths_false_skips_missing_inputs(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", valid_tree())  # no data files
    assert "not found" in error_of(path)
    assert load_recipe(path, check_paths=False).data.sources[0].path.name == "he"


# ----------------------------------------------------------------------------- inheritance
def test_extends_deep_merges_maps_and_replaces_lists(tmp_path: Path) -> None:
    write_recipe(tmp_path, name="base.yaml")
    child = {
        "extends": "base.yaml",
        "train": {"lr": 5e-4},
        "data": {"sources": [{"name": "en", "path": "data/en.jsonl"}], "phases": None},
    }
    recipe = load_recipe(write(tmp_path / "child.yaml", child))
    assert recipe.train.lr == 5e-4 and recipe.train.global_batch == 8  # merged with the parent
    assert [s.name for s in recipe.data.sources] == ["en"]  # list replaced, not merged
    assert recipe.data.phases == []  # null removed the parent's phases
    assert recipe.data.seq_len == 64 and recipe.data.valid[0].name == "he_valid"


def test_extends_chain_of_three_nearest_wins(tmp_path: Path) -> None:
    write_recipe(tmp_path, name="a.yaml")
    write(tmp_path / "sub" / "b.yaml", {"extends": "../a.yaml", "train": {"lr": 2e-3, "seed": 7}})
    path = write(tmp_path / "sub" / "c.yaml", {"extends": "b.yaml", "train": {"seed": 9}})
    recipe = load_recipe(path)
    assert (recipe.train.lr, recipe.train.seed) == (2e-3, 9)


def test_extends_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    message = error_of(tmp_path / "a.yaml")
    assert "extends: cycle" in message and message.count("a.yaml") >= 2


def test_extends_missing_parent(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", {"extends": "nope.yaml"})
    assert error_of(path) == f"{path}: extends: no such recipe file 'nope.yaml' (looked for {tmp_path / 'nope.yaml'})"


def test_error_names_the_parent_file_that_set_the_field(tmp_path: Path) -> None:
    tree = valid_tree()
    tree["train"]["adam_beta2"] = 1.5
    base = write_recipe(tmp_path, tree, name="base.yaml")
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "train": {"lr": 1e-4}})
    assert error_of(child) == f"{base}: train.adam_beta2: must be < 1, got 1.5"


# ------------------------------------------------------------------------------- overrides
def test_overrides_are_yaml_typed_and_applied_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)  # paths in overrides are relative to the cwd
    recipe = load_recipe(
        path,
        [
            "train.lr=3e-4",  # YAML 1.1 reads this as a string; the schema makes it a float
            "train.early_kill.enabled=true",
            "data.sources=[{name: he, path: data/he, weight: 2}]",
            "data.phases=null",
            "data.sources.0.weight=5",
            "train.total_tokens=null",
            "train.total_steps=100",
            "model.init.hidden_size=32",
            "train.seed=1",
            "train.seed=2",
        ],
    )
    assert recipe.train.lr == 3e-4 and recipe.train.early_kill.enabled is True
    assert [(s.name, s.weight) for s in recipe.data.sources] == [("he", 5.0)]
    assert recipe.train.total_steps == 100 and recipe.planned_tokens == 100 * 8 * 64
    assert recipe.model.init == {"vocab_size": 512, "hidden_size": 32, "hybrid_override_pattern": "M*E"}
    assert recipe.train.seed == 2


def test_override_sets_a_key_the_recipe_left_to_its_default(tmp_path: Path) -> None:
    assert load_recipe(write_recipe(tmp_path), ["checkpoint.keep_last=0"]).checkpoint.keep_last == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "override 'train.lrr=1': unknown key 'lrr' in train; did you mean 'lr'?"),
        ("trian.lr=1", "override 'trian.lr=1': unknown key 'trian' in the recipe; did you mean 'train'?"),
        ("train.lr", "override 'train.lr': expected key=value, e.g. train.lr=3e-4"),
        ("train.lr=-1", "override 'train.lr=-1': train.lr: must be > 0, got -1"),
        ("train.lr.x=1", "override 'train.lr.x=1': train.lr is a value, it has no key 'x'"),
        ("data.sources.x=1", "override 'data.sources.x=1': data.sources is a list; index it like data.sources.0"),
        ("data.sources.9.weight=1", "override 'data.sources.9.weight=1': data.sources has 2 items, no index 9"),
        ("=1", "override '=1': bad key ''; expected dotted names like train.lr"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, expected: str) -> None:
    assert error_of(write_recipe(tmp_path), [override]) == expected


def test_override_with_bad_yaml_value(tmp_path: Path) -> None:
    message = error_of(write_recipe(tmp_path), ["data.sources=[{name: x"])
    assert message.startswith("override 'data.sources=[{name: x':1: YAML syntax error:")


# ------------------------------------------------------------------------- bad recipe files
def _set(tree: dict, dotted: str, value: object) -> dict:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(last) if isinstance(node, list) else last] = value
    return tree


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("train.lrr", 1e-3, "train.lrr: unknown key; did you mean 'lr'?"),
        ("trian", {}, "trian: unknown key; did you mean 'train'?"),
        ("data.sources.0.wieght", 1, "data.sources[0].wieght: unknown key; did you mean 'weight'?"),
        ("data.seq_len", "long", "data.seq_len: expected an integer, got 'long'"),
        ("train.lr", -0.1, "train.lr: must be > 0, got -0.1"),
        ("train.lr", "fast", "train.lr: expected a number, got 'fast'"),
        ("train.precision", "fp16", "train.precision: expected 'fp32' or 'bf16', got 'fp16'"),
        ("train.micro_batch", 3, "train.micro_batch x parallel.dp = 3 x 1 must divide train.global_batch (8)"),
        ("parallel", {"dp": 2, "tp": 2}, "parallel.tp > 1 needs backend: megatron"),
        ("parallel", {"dp": 3}, "train.micro_batch x parallel.dp = 2 x 3 must divide train.global_batch (8)"),
        ("backend", "deepspeed", "backend: expected 'native' or 'megatron', got 'deepspeed'"),
        ("data.sources.1.path", "data/missing.jsonl", "data.sources[1].path: data file 'data/missing.jsonl' not found"),
        ("data.sources.0.path", "data/gone", "data.sources[0].path: indexed dataset (.bin + .idx) 'data/gone' not found"),
        ("data.sources.0.path", "data/he.bin", "data.sources[0].path: give the indexed dataset prefix without '.bin'"),
        ("tokenizer.path", "tok/nope.json", "tokenizer.path: path 'tok/nope.json' not found"),
        ("data.sources", [], "data.sources: expected at least 1 item(s), got 0"),
        ("data.sources.1.name", "he", "data.sources[1].name: duplicate name 'he' (also sources[0])"),
        ("data.phases.1.weights", {"eng": 1}, "data.phases[1].weights.eng: unknown source 'eng'; did you mean 'en'?"),
        ("data.phases.1.tokens", "0", "data.phases[1].tokens: must be > 0, got '0'"),
        ("train.total_steps", 10, "train: set exactly one of total_tokens or total_steps, got both"),
        ("train.warmup_tokens", "9k", "train.warmup_tokens: warmup (9k) + decay (1.6k) tokens exceed the run's 8k tokens"),
        ("train.min_lr", 0.1, "train.min_lr: must be <= train.lr (0.001), got 0.1"),
        ("train.eval_interval", 10, None),  # valid: data.valid is set
        ("model.hf_path", "ckpt", "model: set exactly one of hf_path"),
        ("train", [1, 2], "train: expected a mapping, got a list"),
        ("train.early_kill.window_steps", 0, "train.early_kill.window_steps: must be > 0, got 0"),
        ("train.lr", float("nan"), "train.lr: expected a finite number, got nan"),
    ],
)
def test_bad_recipe_gives_one_line_naming_file_and_field(
    tmp_path: Path, field: str, value: object, expected: str | None
) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    path = write_recipe(tmp_path, _set(valid_tree(), field, value))
    if expected is None:
        load_recipe(path)
        return
    assert error_of(path).startswith(f"{path}: {expected}")


def test_missing_section(tmp_path: Path) -> None:
    tree = valid_tree()
    del tree["train"]
    path = write_recipe(tmp_path, tree)
    assert error_of(path) == f"{path}: train: required, but missing"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  lr: [1,\n  x: 2\n", ":4: YAML syntax error: expected ',' or ']'"),
        ("train:\n  lr: 1\n  lr: 2\n", ":3: YAML error: duplicate key 'lr'"),
        ("on: 1\n", ": keys must be strings, got a boolean True; quote it"),
        ("- a\n- b\n", ": expected a mapping of sections at the top level, got a list"),
        ("a: &x [*x]\n", ": a[0]: a YAML alias refers to itself"),
        ("x: !!python/object/apply:os.system [ls]\n", ":1: YAML error: could not determine a constructor"),
        ("\tx: 1\n", ":1: YAML syntax error: found character '\\t' that cannot start any token"),
    ],
)
def test_yaml_problems_are_one_line_with_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert error_of(path).startswith(f"{path}{expected}")


def test_unreadable_recipe_files(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such recipe file"
    assert error_of(tmp_path) == f"{tmp_path}: is a directory, expected a YAML recipe file"
    (tmp_path / "latin1.yaml").write_bytes(b"a: \xe9\n")
    assert "not UTF-8" in error_of(tmp_path / "latin1.yaml")


# ------------------------------------------------------------------------- demo and output
def test_demo_recipe_loads_and_builds_a_model_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/demo/cpt.yaml", check_paths=False)
    assert recipe.data.sources[0].path == REPO / "runs" / "demo" / "data" / "he_train"
    assert recipe.tokenizer.path == REPO / "runs" / "demo" / "tokenizer"
    assert [v.name for v in recipe.data.valid] == ["he_valid", "en_valid"]
    assert {s.lang for s in recipe.data.sources} == {"he", "en"}
    assert recipe.model.init["hidden_size"] == 256 and recipe.model.init["vocab_size"] == 8192
    assert "E" in recipe.model.init["hybrid_override_pattern"]
    from hebtron.model.config import HybridConfig  # hebtron's own module: a broken import must fail, not skip

    config = HybridConfig(**recipe.model.init)
    assert config.num_hidden_layers == len(recipe.model.init["hybrid_override_pattern"])


def test_dump_round_trips_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "a"))
    dumped = write(tmp_path / "b" / "resolved.yaml", yaml.safe_load(dump_recipe(recipe)))
    monkeypatch.chdir(tmp_path / "b")
    assert load_recipe(dumped) == recipe


def test_json_schema_covers_every_section(tmp_path: Path) -> None:
    schema = recipe_json_schema()
    json.dumps(schema)
    assert set(schema["properties"]) == {"extends", *Recipe.model_fields}
    assert schema["additionalProperties"] is False
    train = schema["$defs"]["TrainSection"]
    assert train["additionalProperties"] is False and "lr" in train["required"]


def test_recipe_section_paths_are_os_paths(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path))
    assert os.path.isabs(recipe.checkpoint.dir) and os.path.isabs(recipe.data.valid[0].path)


def test_precision_and_memory_controls_are_checked_in_one_line(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, valid_tree())
    assert error_of(path, ["train.precision=fp32", "train.master_weights=bf16"]) == (
        "override 'train.master_weights=bf16': train.master_weights: bf16 master weights need precision bf16, "
        "got 'fp32'")
    for override in ("train.master_weights=bf16", "train.activation_checkpointing=full", "train.sharded_accumulation=true"):
        field = override.split("=")[0]
        assert error_of(path, ["backend=megatron", override]).startswith(
            f"override '{override}': {field}: a native-backend setting")
    assert error_of(path, ["train.activation_checkpointing=some"]).startswith(
        "override 'train.activation_checkpointing=some': train.activation_checkpointing: expected 'none', 'full' "
        "or 'selective', got 'some'")
    recipe = load_recipe(path, ["train.activation_checkpointing=selective", "train.sharded_accumulation=true"])
    assert recipe.train.master_weights == "fp32" and recipe.train.activation_checkpointing == "selective"


def test_bf16_model_dtype_still_trains_fp32_master_weights(tmp_path: Path) -> None:
    from hebtron.model import HybridConfig, HybridModel
    from hebtron.model.hf import save_hf
    from hebtron.train.setup import build_model
    from tests.conftest import TINY_CONFIGS

    save_hf(HybridModel(HybridConfig(**TINY_CONFIGS["nano-like"])).to(torch.bfloat16), tmp_path / "hf")
    tree = valid_tree()
    tree["model"] = {"hf_path": str(tmp_path / "hf"), "dtype": "bfloat16"}
    path = write_recipe(tmp_path, tree)

    class Tokenizer:  # build_model asks only for the vocabulary size
        def __len__(self) -> int:
            return 10

    for master, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = build_model(load_recipe(path, [f"train.master_weights={master}"], check_paths=False), Tokenizer())
        assert {p.dtype for p in model.parameters()} == {dtype}, master
