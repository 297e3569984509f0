"""``hebtron submit`` and ``hebtron jobs``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser(
        "submit", help="submit a recipe to a Slurm cluster (auto-resume, optional chained evaluation)",
        description="Render an sbatch script for RECIPE on a cluster profile, write the job directory and "
                    "submit it; prints the training job id. Overrides go right after RECIPE: "
                    "hebtron submit RECIPE train.lr=3e-4 --cluster hyperpod-h200 --nodes 4",
    )
    submit.add_argument("recipe", type=Path, help="recipe YAML")
    submit.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    submit.add_argument("--cluster", required=True, metavar="PROFILE",
                        help="cluster profile: hyperpod-h200, hyperpod-b300, local (slurm/NAME.yaml) or a YAML file")
    submit.add_argument("--nodes", type=int, default=None, help="nodes for training (default: the profile's)")
    submit.add_argument("--time", default=None, help="time limit of one start, e.g. 24:00:00 (default: the profile's)")
    submit.add_argument("--name", default=None, help="job name and job directory name (default: the run directory's name)")
    submit.add_argument("--eval-suite", default=None, metavar="SUITE",
                        help="chain an evaluation job after training: hebtron eval run + gate on the last checkpoint")
    submit.add_argument("--eval-policy", default=None, metavar="YAML",
                        help="gate policy (default: SUITE.gate.yaml beside the suite file)")
    submit.add_argument("--eval-baseline", default=None, metavar="PATH",
                        help="baseline results JSON or model directory (default: the recipe's model.hf_path)")
    submit.add_argument("--eval-every", type=int, default=None, metavar="N",
                        help="instead of the evaluation after training, a companion job beside it runs "
                             "hebtron eval watch on every N-th checkpoint (and the last), re-selecting the "
                             "checkpoint to keep when there is a gate policy")
    submit.add_argument("--eval-tasks-dir", action="append", default=[], metavar="DIR", dest="eval_tasks_dirs",
                        help="task dir built at run time, replacing the suite's workdir_include (repeatable; "
                             "default: those, from the directory you submit from)")
    submit.add_argument("--no-check-paths", action="store_true",
                        help="do not require the recipe's input files to exist here (they exist on the cluster)")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); write and submit nothing")
    submit.set_defaults(func=_submit)

    jobs = sub.add_parser("jobs", help="submitted runs: Slurm state, last checkpoint, last verdict, best checkpoint")
    jobs.add_argument("--cluster", default="local", metavar="PROFILE", help="profile whose paths.jobs to list (default local)")
    jobs.add_argument("--jobs-dir", type=Path, default=None, help="list this job directory root instead")
    jobs.add_argument("--json", action="store_true", help="one JSON object per job")
    jobs.set_defaults(func=_jobs)


def _submit(args: argparse.Namespace) -> int:
    from hebtron.launch.submit import prepare, submit

    prepared = prepare(
        args.recipe,
        args.cluster,
        list(args.overrides),
        nodes=args.nodes,
        time_limit=args.time,
        name=args.name,
        eval_suite=args.eval_suite,
        eval_policy=args.eval_policy,
        eval_baseline=args.eval_baseline,
        eval_tasks_dirs=list(args.eval_tasks_dirs),
        eval_every=args.eval_every,
        check_paths=not args.no_check_paths,
        create=not args.dry_run,
    )
    if args.dry_run:
        print(prepared.train_script, end="")
        if prepared.eval_script is not None:
            print(f"\n# ---- {prepared.spec.job_dir}/eval.sbatch (--dependency=afterok:<training job>) ----\n")
            print(prepared.eval_script, end="")
        if prepared.watch_script is not None:
            print(f"\n# ---- {prepared.spec.job_dir}/watch.sbatch (beside training: sbatch watch.sbatch <training job>) ----\n")
            print(prepared.watch_script, end="")
        return 0
    record = submit(prepared)
    # stdout: the training job id alone (like sbatch --parsable), for `id=$(hebtron submit ...)`
    print(f"job dir: {record['job_dir']}", file=sys.stderr)
    if record["eval_job_id"]:
        print(f"evaluation job {record['eval_job_id']} runs after training job {record['train_job_id']} succeeds",
              file=sys.stderr)
    if record.get("watch_job_id"):
        print(f"watch job {record['watch_job_id']} evaluates checkpoints beside training job {record['train_job_id']}",
              file=sys.stderr)
    print(record["train_job_id"])
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from hebtron.launch.jobs import format_table, list_jobs
    from hebtron.launch.profile import load_profile

    if args.jobs_dir is not None:
        root = args.jobs_dir
    else:
        _, profile = load_profile(args.cluster)
        root = Path(os.path.abspath(profile.paths.jobs))
    rows = list_jobs(root)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
    elif rows:
        print(format_table(rows), end="")
    else:
        print(f"no jobs under {root}")
    return 0
