"""Render the sbatch scripts of a job from the templates in ``slurm/``.

Every value substituted into a template is shell-quoted (``shlex.quote``) by the template
environment itself, so no value can be forgotten: a recipe path holding ``$(...)``, a backtick
or ``; rm -rf`` stays one inert word. The templates assign each value once, to a variable at
the top of the script, and the rest of the script is fixed text that only reads ``"$VAR"``.
Values that land on ``#SBATCH`` lines are checked to be plain tokens (quoting would not help
there: sbatch reads those lines itself); :func:`check_sbatch_script` re-checks the result.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import jinja2

from hebtron.launch.profile import PROFILE_DIR, Profile

TRAIN_TEMPLATE = "train.sbatch.j2"
EVAL_TEMPLATE = "eval.sbatch.j2"
WATCH_TEMPLATE = "watch.sbatch.j2"
_SBATCH_LINE = re.compile(r"#SBATCH --[a-z][a-z0-9-]*(=[A-Za-z0-9_@%+=:,./-]+)?")


@dataclass(frozen=True)
class EvalChain:
    """What the evaluation job runs: after training, ``hebtron eval run`` then ``hebtron eval
    gate`` on the last checkpoint; or, with ``every`` set, ``hebtron eval watch`` beside training
    on every ``every``-th checkpoint (then policy and baseline are optional: with a policy the
    watcher re-selects the checkpoint to keep after each evaluation)."""

    suite: str               # suite name (eval/suites/NAME.yaml) or path, passed through as given
    suite_tag: str           # file-name-safe suite name: CHECKPOINT/eval/<tag>.json
    policy: str | None       # gate policy YAML (always set for the chained evaluation)
    baseline: str | None     # a results JSON, or a model/checkpoint directory evaluated first
    baseline_is_results: bool
    # the suite's task dirs built at run time (``workdir_include``, ``--eval-tasks-dir``), made
    # absolute at submit time: the job runs in its own working directory, not where submit ran
    tasks_dirs: tuple[str, ...] = ()
    every: int | None = None  # set: a companion watch job instead of the chained evaluation


@dataclass(frozen=True)
class JobSpec:
    """Everything a job script needs, resolved: absolute paths, the profile, the job's name."""

    profile_name: str
    profile: Profile
    job_name: str
    job_dir: str
    recipe: str
    run_dir: str
    ckpt_dir: str
    workdir: str
    venv: str | None
    eval: EvalChain | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _quote(value: Any) -> str:
    """Every ``{{ value }}`` of a template becomes one shell word."""
    if isinstance(value, bool):
        value = int(value)
    return shlex.quote(str(value))


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PROFILE_DIR)),
        finalize=_quote,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _context(spec: JobSpec) -> dict[str, Any]:
    p = spec.profile
    return {
        "profile_name": spec.profile_name,
        "job_name": spec.job_name,
        "job_dir": spec.job_dir,
        "recipe": spec.recipe,
        "run_dir": spec.run_dir,
        "ckpt_dir": spec.ckpt_dir,
        "workdir": spec.workdir,
        "venv": spec.venv,
        "nodes": p.nodes,
        "gpus_per_node": p.gpus_per_node,
        "ranks_per_node": p.ranks_per_node,
        "cpus_per_task": p.cpus_per_task,
        "mem": p.mem,
        "partition": p.partition,
        "account": p.account,
        "qos": p.qos,
        "exclusive": p.exclusive,
        "time": p.time,
        "signal_seconds": p.signal_seconds,
        "max_restarts": p.max_restarts,
        "rdzv_port": p.rdzv_port,
        "shutdown_timeout": p.shutdown_timeout,
        "sbatch_options": p.sbatch_options,
        "container": p.container,
        "env": p.env,
        "cache": p.paths.cache,
        "eval": p.eval,
    }


def render_train(spec: JobSpec) -> str:
    """The training job: torchrun on every node, resume, USR1 -> checkpoint -> requeue."""
    script = _environment().get_template(TRAIN_TEMPLATE).render(_context(spec))
    check_sbatch_script(script)
    return script


def _eval_context(spec: JobSpec) -> dict[str, Any]:
    assert spec.eval is not None
    chain = spec.eval
    return _context(spec) | {
        "suite": chain.suite,
        "suite_tag": chain.suite_tag,
        "policy": chain.policy or "",
        "baseline": chain.baseline or "",
        "baseline_is_results": chain.baseline_is_results,
        "tasks_dirs": chain.tasks_dirs,
        "every": chain.every or 1,
    }


def render_eval(spec: JobSpec) -> str:
    """The evaluation job chained after training: eval run, eval gate, verdict."""
    if spec.eval is None or spec.eval.every is not None or spec.eval.policy is None or spec.eval.baseline is None:
        raise ValueError("render_eval: the job has no chained evaluation (policy and baseline, no --eval-every)")
    script = _environment().get_template(EVAL_TEMPLATE).render(_eval_context(spec))
    check_sbatch_script(script)
    return script


def render_watch(spec: JobSpec) -> str:
    """The companion job beside training: ``hebtron eval watch --until-job TRAIN_JOBID``."""
    if spec.eval is None or spec.eval.every is None:
        raise ValueError("render_watch: the job has no --eval-every")
    script = _environment().get_template(WATCH_TEMPLATE).render(_eval_context(spec))
    check_sbatch_script(script)
    return script


def check_sbatch_script(script: str) -> None:
    """Every ``#SBATCH`` line is one option with a plain value (sbatch parses these itself)."""
    for n, line in enumerate(script.splitlines(), 1):
        if line.startswith("#SBATCH") and not _SBATCH_LINE.fullmatch(line):
            raise ValueError(f"rendered script line {n}: not a plain #SBATCH option: {line!r}")
