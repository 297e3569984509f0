"""``hebtron submit``: a recipe and a cluster profile -> a job directory -> Slurm jobs.

The job directory (``<profile paths.jobs>/<name>``) holds what a reader needs to see or redo
the job: the resolved recipe (overrides applied, paths absolute, ``parallel.dp`` set to the
job's rank count), ``train.sbatch``, ``eval.sbatch`` when an evaluation is chained after
training, ``watch.sbatch`` when a companion job evaluates checkpoints beside training
(``--eval-every``), ``job.json`` (ids, paths, how it was submitted) and the Slurm logs.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hebtron.errors import UserError
from hebtron.launch import slurm
from hebtron.launch.profile import PROFILE_DIR, Profile, load_profile, venv_path
from hebtron.launch.render import EvalChain, JobSpec, render_eval, render_train, render_watch
from hebtron.recipe import Recipe, dump_recipe, load_recipe
from hebtron.recipe.overrides import parse_override

JOB_FILE = "job.json"
TRAIN_SCRIPT = "train.sbatch"
EVAL_SCRIPT = "eval.sbatch"
WATCH_SCRIPT = "watch.sbatch"
RECIPE_FILE = "recipe.yaml"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
SUITES_DIRS = (Path("eval") / "suites", PROFILE_DIR.parent / "eval" / "suites")


@dataclass
class Prepared:
    """A job ready to write and submit."""

    spec: JobSpec
    recipe: Recipe
    train_script: str
    eval_script: str | None
    record: dict[str, Any]
    watch_script: str | None = None


def safe_name(text: str, fallback: str = "hebtron") -> str:
    """A Slurm job / directory name: letters, digits, ``_.-`` only, at most 64 characters."""
    name = _UNSAFE.sub("_", text).strip("._-")[:64].strip("._-")
    return name or fallback


def _override_keys(overrides: list[str]) -> set[str]:
    return {".".join(parse_override(o)[0]) for o in overrides}


def load_job_recipe(recipe_path: Path, overrides: list[str], profile: Profile, check_paths: bool) -> Recipe:
    """The recipe with ``parallel.dp`` set to what the job's ranks give (nodes x ranks per node)."""
    recipe = load_recipe(recipe_path, overrides, check_paths=check_paths)
    ranks = profile.nodes * profile.ranks_per_node
    par = recipe.parallel
    model_parallel = par.tp * par.pp * par.cp
    if ranks % model_parallel:
        raise UserError(
            f"{recipe_path}: parallel: tp x pp x cp = {model_parallel} does not divide the job's {ranks} ranks "
            f"({profile.nodes} node(s) x {profile.ranks_per_node})"
        )
    dp = ranks // model_parallel
    if par.dp == dp:
        return recipe
    if "parallel.dp" in _override_keys(overrides):
        raise UserError(
            f"override 'parallel.dp={par.dp}': the job runs {ranks} ranks ({profile.nodes} node(s) x "
            f"{profile.ranks_per_node}), so parallel.dp must be {dp}; leave it out and submit sets it"
        )
    return load_recipe(recipe_path, [*overrides, f"parallel.dp={dp}"], check_paths=check_paths)


def _find_suite_file(suite: str) -> Path | None:
    path = Path(suite)
    if path.suffix in (".yaml", ".yml") or "/" in suite:
        return path if path.is_file() else None
    for base in SUITES_DIRS:
        if (base / f"{suite}.yaml").is_file():
            return base / f"{suite}.yaml"
    return None


def _tasks_dirs(suite_file: Path | None, given: list[str], check_paths: bool) -> tuple[str, ...]:
    """The suite's run-time task directories as absolute paths, from the directory submit runs in.

    A suite's ``workdir_include`` is relative to the working directory of ``hebtron eval run``
    (``hebtron data demo`` builds ``runs/demo/eval/tasks`` there). The job does not run where
    submit ran (its working directory is ``paths.workdir``, else the job directory), so they are
    resolved here, like the recipe's paths, and checked now rather than after the training job.
    ``given`` (``--eval-tasks-dir``) replaces them, as ``--tasks-dir`` does for ``eval run``.
    Without ``check_paths`` (the files are on the cluster) nothing is resolved: ``given`` is
    passed as it is, and the suite's own ``workdir_include`` applies in the job's working directory."""
    if not check_paths:
        return tuple(given)
    if given:
        for d in given:
            if not Path(d).is_dir():
                raise UserError(f"--eval-tasks-dir {d}: no such directory")
        return tuple(os.path.abspath(d) for d in given)
    if suite_file is None:
        return ()
    from hebtron.eval.config import load_suite

    dirs = load_suite(suite_file)[0].workdir_include
    for d in dirs:
        if not Path(d).is_dir():
            hint = "build it with `hebtron data demo`, " if "demo" in d else ""
            where = "" if os.path.isabs(d) else f" under {os.getcwd()}"
            raise UserError(f"{suite_file}: workdir_include {d}: no such task directory{where}; "
                            f"{hint}submit from the directory that holds it, or give --eval-tasks-dir DIR")
    return tuple(os.path.abspath(d) for d in dirs)


def eval_chain(
    suite: str, policy: str | None, baseline: str | None, recipe: Recipe, check_paths: bool = True,
    tasks_dirs: list[str] | None = None, every: int | None = None,
) -> EvalChain:
    """Resolve the evaluation chain's suite, gate policy, baseline and run-time task
    directories; fail early on a typo.

    With ``check_paths`` off (the files exist only on the cluster) the values are taken as
    given: a suite name stays a name, a baseline ending in ``.json`` is a results file, task
    directories are left to the job's working directory. With ``every`` (the companion watch
    job) the policy and baseline are optional: without a policy the watcher only evaluates,
    without a baseline it selects against the policy's ``select.baseline`` or the first
    evaluated checkpoint.
    """
    if every is not None and every < 1:
        raise UserError(f"--eval-every: expected a positive number of checkpoints, got {every}")
    suite_file = _find_suite_file(suite)
    if suite_file is None and check_paths:
        raise UserError(f"--eval-suite {suite}: no such suite (a file, or NAME for eval/suites/NAME.yaml)")
    stem = (suite_file or Path(suite)).name.removesuffix(".yaml").removesuffix(".yml")
    tag = safe_name(stem, "suite")
    if policy is not None:
        policy_path = Path(policy)
        if check_paths and not policy_path.is_file():
            raise UserError(f"--eval-policy {policy}: no such file")
    elif suite_file is not None and suite_file.with_name(f"{stem}.gate.yaml").is_file():
        policy_path = suite_file.with_name(f"{stem}.gate.yaml")
    elif every is not None:
        policy_path = None
    else:
        raise UserError(f"--eval-policy: required, since there is no {stem}.gate.yaml beside the suite file")
    baseline_path: Path | None
    if baseline is None and every is not None and recipe.model.hf_path is None:
        baseline_path, is_results = None, False
    elif baseline is None:
        if recipe.model.hf_path is None:
            raise UserError(
                "--eval-baseline: required, since the recipe trains from scratch (model.init); "
                "give a results JSON or a model directory to gate against"
            )
        baseline_path, is_results = Path(recipe.model.hf_path), False
    else:
        baseline_path = Path(baseline)
        if baseline_path.is_file():
            is_results = True
        elif baseline_path.is_dir():
            is_results = False
        elif not check_paths:
            is_results = baseline_path.suffix == ".json"
        else:
            raise UserError(f"--eval-baseline {baseline}: no such results JSON or model directory")
    return EvalChain(
        suite=str(suite_file.resolve()) if suite_file is not None and check_paths else suite,
        suite_tag=tag,
        policy=os.path.abspath(policy_path) if policy_path is not None else None,
        baseline=os.path.abspath(baseline_path) if baseline_path is not None else None,
        baseline_is_results=is_results,
        tasks_dirs=_tasks_dirs(suite_file, list(tasks_dirs or []), check_paths),
        every=every,
    )


def _job_dir(root: Path, name: str, create: bool) -> Path:
    """``root/name``, or ``root/name-2``, ``-3``, ... when taken (created atomically)."""
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        if not create:
            if not path.exists():
                return path
            continue
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise UserError(f"{root}: too many job directories named {name}-N")


def prepare(
    recipe_path: Path,
    cluster: str,
    overrides: list[str],
    *,
    nodes: int | None = None,
    time_limit: str | None = None,
    name: str | None = None,
    eval_suite: str | None = None,
    eval_policy: str | None = None,
    eval_baseline: str | None = None,
    eval_tasks_dirs: list[str] | None = None,
    eval_every: int | None = None,
    check_paths: bool = True,
    create: bool = False,
) -> Prepared:
    """Load and check everything, pick the job directory (made when ``create``), render.

    The job's working directory is the profile's ``paths.workdir``, else the job directory:
    never the directory submit was called from, which the job must not depend on (everything
    relative is resolved here: the recipe's paths, the eval chain's files and task dirs)."""
    profile_name, profile = load_profile(cluster, nodes, time_limit)
    recipe = load_job_recipe(recipe_path, overrides, profile, check_paths)
    run_dir = Path(recipe.logging.run_dir)
    job_name = safe_name(name or run_dir.name)
    if name is not None and job_name != name:
        raise UserError(f"--name {name!r}: use letters, digits, '_', '.' and '-' only (e.g. {job_name!r})")
    if eval_tasks_dirs and not eval_suite:
        raise UserError("--eval-tasks-dir: only with --eval-suite")
    if eval_every is not None and not eval_suite:
        raise UserError("--eval-every: only with --eval-suite")
    chain = (eval_chain(eval_suite, eval_policy, eval_baseline, recipe, check_paths, eval_tasks_dirs, eval_every)
             if eval_suite else None)
    jobs_root = Path(os.path.abspath(profile.paths.jobs))
    job_dir = _job_dir(jobs_root, job_name, create)
    spec = JobSpec(
        profile_name=profile_name,
        profile=profile,
        job_name=job_name,
        job_dir=str(job_dir),
        recipe=str(job_dir / RECIPE_FILE),
        run_dir=str(run_dir),
        ckpt_dir=str(recipe.checkpoint.dir),
        workdir=os.path.abspath(profile.paths.workdir) if profile.paths.workdir else str(job_dir),
        venv=venv_path(profile),
        eval=chain,
    )
    record = {
        "name": job_name,
        "cluster": profile_name,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "job_dir": spec.job_dir,
        "recipe": spec.recipe,
        "recipe_source": str(Path(recipe_path).resolve()),
        "overrides": list(overrides),
        "run_dir": spec.run_dir,
        "ckpt_dir": spec.ckpt_dir,
        "nodes": profile.nodes,
        "ranks": profile.nodes * profile.ranks_per_node,
        "train_job_id": None,
        "eval_job_id": None,
        "watch_job_id": None,
        "eval": asdict(chain) if chain else None,
    }
    watching = chain is not None and chain.every is not None
    return Prepared(spec, recipe, render_train(spec), render_eval(spec) if chain and not watching else None, record,
                    render_watch(spec) if watching else None)


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_record(job_dir: Path, record: dict[str, Any]) -> None:
    write_text_atomic(job_dir / JOB_FILE, json.dumps(record, indent=2) + "\n")


def submit(prepared: Prepared) -> dict[str, Any]:
    """Write the job directory and submit: training, then the evaluation after it succeeds, or
    the companion watch job beside it (given the training job's id as its argument)."""
    job_dir = Path(prepared.spec.job_dir)
    record = dict(prepared.record)
    write_text_atomic(job_dir / RECIPE_FILE, dump_recipe(prepared.recipe))
    write_text_atomic(job_dir / TRAIN_SCRIPT, prepared.train_script, 0o755)
    if prepared.eval_script is not None:
        write_text_atomic(job_dir / EVAL_SCRIPT, prepared.eval_script, 0o755)
    if prepared.watch_script is not None:
        write_text_atomic(job_dir / WATCH_SCRIPT, prepared.watch_script, 0o755)
    write_record(job_dir, record)
    record["train_job_id"] = slurm.sbatch(job_dir / TRAIN_SCRIPT, job_dir)
    write_record(job_dir, record)
    if prepared.eval_script is not None:
        record["eval_job_id"] = slurm.sbatch(job_dir / EVAL_SCRIPT, job_dir, dependency=f"afterok:{record['train_job_id']}")
        write_record(job_dir, record)
    if prepared.watch_script is not None:  # beside training, no dependency; it stops when training has ended
        record["watch_job_id"] = slurm.sbatch(job_dir / WATCH_SCRIPT, job_dir, args=[record["train_job_id"]])
        write_record(job_dir, record)
    return record
