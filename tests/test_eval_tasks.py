"""The Hebrew hub task configs: lm-eval validates them offline, each runs on a local stand-in
dataset with the hub dataset's columns, and the column/label helpers read what they should."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_eval_fixtures import eval_env  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "eval" / "tasks" / "hebrew"
DATASETS = yaml.safe_load((ROOT / "eval" / "datasets.yaml").read_text(encoding="utf-8"))


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8").replace("!function ", ""))


def defined_names() -> dict[str, Path]:
    names = {}
    for path in sorted(TASK_DIR.glob("*.yaml")):
        cfg = _raw(path)
        names[cfg["group"] if "group" in cfg else cfg["task"]] = path
    return names


def utils():
    spec = importlib.util.spec_from_file_location("hebrew_task_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # lm-eval validate per task YAML
def test_every_yaml_passes_lm_eval_validate_offline():
    names = defined_names()
    assert {"hebrew-core", "alephbench", "hebrew_public", "heq", "hebrew_sentiment", "hebnli", "winograd_he"} <= set(names)
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # one call (each indexes all of lm-eval's tasks); an undefined name makes it exit 1
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "validate", "--tasks", ",".join(names),
                           "--include_path", str(TASK_DIR)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All tasks found and valid" in proc.stdout


def test_every_hub_task_has_a_stand_in_and_a_license():
    from lm_eval.tasks._yaml_loader import load_yaml

    leaves = {n for n, p in defined_names().items() if "group" not in _raw(p)}
    assert leaves == set(DATASETS["hub"])
    for name, info in DATASETS["hub"].items():
        cfg = load_yaml(TASK_DIR / f"{name}.yaml")
        assert cfg["dataset_path"] == info["dataset"] and cfg.get("dataset_name") == info.get("config"), name
        assert info["license"] and info["example"], name
    group = _raw(TASK_DIR / "_hebrew_public.yaml")["task"]
    assert set(group) == set(DATASETS["lm_eval_builtin"])


def test_hub_tasks_run_on_stand_in_data(eval_env, tmp_path):  # noqa: F811
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from hebtron.eval.lm import HebtronLM

    configs = []
    for name, info in DATASETS["hub"].items():
        files = {}
        for split in info["splits"]:
            path = tmp_path / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(info["example"], ensure_ascii=False) + "\n" for _ in range(3)),
                            encoding="utf-8")
            files[split] = str(path)
        cfg = load_yaml(TASK_DIR / f"{name}.yaml")
        cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
        configs.append(cfg)
    lm = HebtronLM(str(eval_env["checkpoint"]), device="cpu", batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False),
                                  bootstrap_iters=0, gen_kwargs={"max_gen_toks": 4})
    for cfg in configs:
        name = cfg["task"]
        row = out["results"][name]
        filters = [f["name"] for f in cfg.get("filter_list", [])] or ["none"]
        for metric in (m["metric"] for m in cfg["metric_list"]):
            for filt in filters:
                value = row[f"{metric},{filt}"]
                assert isinstance(value, float) and math.isfinite(value), (name, metric, value)
        assert out["n-samples"][name]["effective"] == 3, name


def test_column_helpers():
    u = utils()
    from datasets import Dataset

    assert u._answer_texts('{"text": ["ירושלים"], "answer_start": [0]}') == ["ירושלים"]
    assert u._answer_texts("{'text': ['א', 'ב']}") == ["א", "ב"]
    assert u._answer_texts("תל אביב") == ["תל אביב"]
    one_based = u.mc_docs(Dataset.from_list([{"question": "q", "options": ["a", "b"], "answer": "2"},
                                             {"question": "q", "options": ["a", "b"], "answer": "1"}]))
    assert list(one_based["label"]) == [1, 0]
    zero_based = u.mc_docs(Dataset.from_list([{"question": "q", "choices": ["a", "b", "c"], "answer": 0},
                                              {"question": "q", "choices": ["a", "b", "c"], "answer": 2}]))
    assert list(zero_based["label"]) == [0, 2]
    letters = u.mc_docs(Dataset.from_list([{"Question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                                            "answerKey": "B"}]))
    assert list(letters["label"]) == [1] and list(letters["query"]) == ["q"]
    copa = u.mc_docs(Dataset.from_list([{"premise": "נפלתי.", "choice1": "a", "choice2": "b", "question": "effect",
                                         "label": 1}]))  # no 0 seen, but nothing says 1-based either
    assert list(copa["query"]) == ["נפלתי ולכן"] and list(copa["label"]) == [1]
    with pytest.raises(ValueError, match="no answer choices .*rows have answer, stem"):
        u.mc_docs(Dataset.from_list([{"stem": "q", "answer": 0}]))
    with pytest.raises(ValueError, match="label 'Mixed' is not one of"):
        u.sentiment_docs(Dataset.from_list([{"text": "t", "tag_ids": "Mixed"}]))
    nli = u.nli_docs(Dataset.from_list([{"translation1": "p", "translation2": "h", "hebrew_label": "contradiction"},
                                        {"translation1": "p", "translation2": "h", "hebrew_label": "-"}]))
    assert list(nli["label"]) == [2]


def test_hebrew_qa_scores():
    u = utils()
    assert u.normalize("הַבַּיִת, הגדול!") == "הבית הגדול"
    assert u.token_f1("בירושלים", "ירושלים") == 0.0          # a clitic prefix defeats plain token F1
    assert u.tlnls("בירושלים", "ירושלים") == pytest.approx(1 - 1 / 8)
    assert u.tlnls("ירושלים", "ירושלים") == 1.0 and u.tlnls("", "ירושלים") == 0.0
    scores = u.qa_results({"answers": ["חיפה", "העיר חיפה"]}, ["העיר חיפה."])
    assert scores == {"exact_match": 1.0, "f1": 1.0, "tlnls": 1.0}
