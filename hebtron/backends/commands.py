"""CLI: ``hebtron preflight`` (try a Megatron recipe on CPU; ``--memory``: predicted per-GPU memory) and
``hebtron convert`` (HF <-> Megatron)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    pre = subparsers.add_parser(
        "preflight",
        help="check a megatron recipe on CPU: parallel sizes, then a tiny model through real Megatron steps",
        description="Checks the recipe's parallel plan against the cluster and Megatron's config rules at full "
                    "size, then trains a shrunk model (same layer pattern) for a few steps on 2 CPU ranks (gloo) "
                    "at the recipe's tp/ep/pp where they fit, checking shapes, checkpoint resume and resharding.",
    )
    pre.add_argument("recipe", help="recipe YAML (backend: megatron)")
    pre.add_argument("overrides", nargs="*", help="key=value overrides")
    pre.add_argument("--gpus", type=int, default=None, help="GPUs in the cluster (nodes x GPUs per node)")
    pre.add_argument("--model-config", type=Path, default=None,
                     help="the checkpoint's config.json when model.hf_path is not on this machine")
    pre.add_argument("--steps", type=int, default=3, help="training steps of the tiny model (default 3)")
    pre.add_argument("--json", action="store_true", help="print the report as one JSON object")
    mem = pre.add_argument_group("memory", "--memory: predicted per-GPU memory instead of the tiny training run")
    mem.add_argument("--memory", action="store_true",
                     help="predict per-GPU memory (weights, gradients, optimizer state, activations measured at "
                          "full width under FakeTensorMode) with a verdict against the GPU's memory; exit 1 if it "
                          "does not fit")
    mem.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="memory per GPU in GB (e.g. 141)")
    mem.add_argument("--profile", default=None, metavar="NAME",
                     help="cluster profile (slurm/NAME.yaml) whose GPU sets the memory; default: the GPU named in "
                          "the recipe's file name (cpt-h200 -> H200)")
    mem.add_argument("--recompute", default="none",
                     help="what-if: none, full, or a comma list of layer kinds (mamba, attention, mlp, moe)")
    mem.add_argument("--kernels", default="auto", choices=["auto", "megatron-gpu", "reference"],
                     help="activations of Megatron's GPU kernels or of hebtron's PyTorch reference layers; auto: "
                          "the reference with megatron.local_spec, else the GPU kernels")
    mem.add_argument("--moe-imbalance", type=float, default=1.0, metavar="X",
                     help="the most loaded expert-parallel rank's share of routed tokens relative to even (default 1)")
    mem.add_argument("--reserve-gb", type=float, default=None, metavar="GB",
                     help="CUDA context, NCCL and workspaces (default 4)")
    pre.set_defaults(func=_preflight)

    conv = subparsers.add_parser("convert", help="convert weights between HF NemotronH and Megatron checkpoints")
    sub = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_meg = sub.add_parser("hf-to-megatron", help="HF NemotronH directory -> Megatron distributed checkpoint")
    to_meg.add_argument("hf_dir", type=Path)
    to_meg.add_argument("out", type=Path)
    to_meg.set_defaults(func=_hf_to_megatron)
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF NemotronH directory with its tokenizer",
                           description="Streams the weights one layer at a time on one process (no torchrun); "
                                       "a training checkpoint also gets its tokenizer and, for SFT runs, its chat "
                                       "template, as `hebtron export` writes.")
    to_hf.add_argument("checkpoint", type=Path,
                       help="a Megatron-backend step_N, a checkpoints directory (its latest), or a distributed "
                            "checkpoint directory (e.g. hf-to-megatron output)")
    to_hf.add_argument("out", type=Path)
    to_hf.add_argument("--model-config", type=Path, default=None,
                       help="config.json of the model (default: the one hebtron stored in the checkpoint)")
    to_hf.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="dtype of the written weights")
    to_hf.set_defaults(func=_megatron_to_hf)


def _preflight(args: argparse.Namespace) -> int:
    from hebtron.backends.megatron.preflight import run_preflight

    if args.memory:
        return _preflight_memory(args)
    if args.steps < 2:
        from hebtron.errors import UserError

        raise UserError("--steps: expected at least 2 (one before and one after the checkpoint)")
    report = run_preflight(args.recipe, args.overrides, gpus=args.gpus, model_config=args.model_config, steps=args.steps)
    if args.json:
        print(json.dumps({"recipe": report.recipe, "ok": report.ok, "wall_s": round(report.wall_s, 2),
                          "checks": report.checks}))
    else:
        print(report.table())
    return 0 if report.ok else 1


def _gpu_memory(args: argparse.Namespace) -> tuple[float | None, str | None, str]:
    """(GB per GPU, GPU name, where it came from): --gpu-memory, else --profile, else the recipe's name."""
    from hebtron.errors import UserError
    from hebtron.train.memory import gpu_from_text

    if args.gpu_memory is not None:
        if args.gpu_memory <= 0:
            raise UserError(f"--gpu-memory: expected GB > 0, got {args.gpu_memory:g}")
        return args.gpu_memory, None, "--gpu-memory"
    if args.profile is not None:
        from hebtron.launch.profile import load_profile

        name, profile = load_profile(args.profile)
        if profile.gpus_per_node == 0:
            raise UserError(f"--profile {args.profile}: a CPU profile (gpus_per_node: 0); pass --gpu-memory GB")
        found = gpu_from_text(f"{name} {profile.description} {profile.partition or ''}")
        if found is None:
            raise UserError(f"--profile {args.profile}: names no GPU hebtron knows (H100, H200, B200, B300); "
                            "pass --gpu-memory GB")
        return found[1], found[0], f"profile {name}"
    found = gpu_from_text(Path(args.recipe).stem)
    if found is None:
        return None, None, ""
    return found[1], found[0], f"from the recipe name {Path(args.recipe).name}; --gpu-memory or --profile to set"


def _preflight_memory(args: argparse.Namespace) -> int:
    from hebtron.backends.megatron.memory import DEFAULT_RESERVE_GB, Options, memory_report, parse_recompute
    from hebtron.errors import UserError
    from hebtron.recipe import load_recipe

    capacity, gpu, source = _gpu_memory(args)
    if load_recipe(args.recipe, args.overrides, check_paths=False).backend == "native":
        from hebtron.backends.native_memory import native_memory_report

        if args.kernels != "auto" or args.recompute != "none" or args.moe_imbalance != 1.0:
            raise UserError("preflight --memory: --kernels, --recompute and --moe-imbalance are Megatron what-ifs; "
                            "a native recipe sets train.activation_checkpointing and train.sharded_accumulation")
        report = native_memory_report(args.recipe, args.overrides, model_config=args.model_config, gpus=args.gpus,
                                      capacity_gb=capacity, gpu=gpu, gpu_source=source,
                                      reserve_gb=DEFAULT_RESERVE_GB if args.reserve_gb is None else args.reserve_gb)
        print(json.dumps(report.to_json()) if args.json else report.table())
        return 1 if report.fits is False else 0
    options = Options(kernels=args.kernels, recompute=parse_recompute(args.recompute),
                      moe_imbalance=args.moe_imbalance,
                      reserve_gb=DEFAULT_RESERVE_GB if args.reserve_gb is None else args.reserve_gb)
    report = memory_report(args.recipe, args.overrides, model_config=args.model_config, gpus=args.gpus,
                           capacity_gb=capacity, gpu=gpu, gpu_source=source, options=options)
    print(json.dumps(report.to_json()) if args.json else report.table())
    return 1 if report.fits is False else 0


def _hf_to_megatron(args: argparse.Namespace) -> int:
    from hebtron.backends.megatron.checkpoint_io import hf_dir_to_megatron

    hf_dir_to_megatron(args.hf_dir, args.out)
    print(f"wrote Megatron distributed checkpoint {args.out}")
    return 0


def _megatron_to_hf(args: argparse.Namespace) -> int:
    from hebtron.backends.megatron.checkpoint_io import megatron_to_hf_dir

    megatron_to_hf_dir(args.checkpoint, args.out, model_config=args.model_config, dtype=args.dtype)
    print(f"wrote HF NemotronH directory {args.out}")
    return 0
