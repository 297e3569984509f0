"""Cluster profiles (``slurm/<name>.yaml``): where and how a recipe runs on a Slurm cluster.

A profile says how many nodes and GPUs a job takes, the partition and account, whether ranks run
in a pyxis/enroot container or from a shared venv, the network environment (EFA / NCCL), the
shared-filesystem paths, and the auto-resume and evaluation settings. It is validated like a
recipe: unknown keys and bad values fail with one line naming the file and the field.

Values that end up on ``#SBATCH`` lines (partition, account, time, ...) must be plain tokens;
everything else may hold any text and is shell-quoted when rendered.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from hebtron.errors import UserError
from hebtron.recipe.hints import one_line
from hebtron.recipe.messages import dotted, explain
from hebtron.recipe.schema import FieldProblem
from hebtron.recipe.yamlio import parse_yaml

# Profiles shipped with hebtron live in <repository>/slurm.
PROFILE_DIR = Path(__file__).resolve().parents[2] / "slurm"

# Characters shlex.quote leaves alone, minus '%' (sbatch file patterns are ours to write):
# a value made of these reads the same on an #SBATCH line and in a shell.
_TOKEN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2})?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SBATCH_OPTION = re.compile(r"--[a-z][a-z0-9-]*(=[A-Za-z0-9_@+=:,./-]+)?")


def _token(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"expected letters, digits and _@+=:,./- only (it goes on an #SBATCH line), got {value!r}")
    return value


def _time(value: str) -> str:
    if not _TIME.fullmatch(value):
        raise ValueError(f"expected a Slurm time like 48:00:00, 2-00:00:00 or 90 (minutes), got {value!r}")
    return value


def _sbatch_option(value: str) -> str:
    if not _SBATCH_OPTION.fullmatch(value):
        raise ValueError(f"expected an sbatch option like --constraint=p5en (plain characters), got {value!r}")
    return value


Token = Annotated[str, AfterValidator(_token)]
SlurmTime = Annotated[str, AfterValidator(_time)]
SbatchOption = Annotated[str, AfterValidator(_sbatch_option)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Container(_Section):
    """Run every rank inside a pyxis/enroot container (``srun --container-image``)."""

    image: str = Field(min_length=1, description="enroot image: a .sqsh file or a registry reference")
    mounts: list[str] = Field(default_factory=list, description="SRC:DST[:FLAGS] bind mounts, e.g. /fsx:/fsx")
    workdir: str | None = Field(None, description="working directory inside the container")


class Paths(_Section):
    """Shared-filesystem locations, visible under the same path on every node."""

    jobs: str = Field(description="job directories (script, resolved recipe, logs, job.json) go here")
    workdir: str | None = Field(None, description="the job's working directory (default: the job directory)")
    cache: str | None = Field(None, description="HF_HOME and other caches; default: left to the environment")


class EvalJob(_Section):
    """Resources of the evaluation jobs, chained or companion (one process each)."""

    partition: Token | None = Field(None, description="default: the training partition")
    gpus: int = Field(1, ge=0)
    cpus: int = Field(8, ge=1)
    mem: Token | None = None
    time: SlurmTime = "02:00:00"
    # what `hebtron eval run --backend` the jobs use (hebtron.eval.runner.BACKENDS): vllm on
    # GPU clusters whose image has vLLM, for large models; hebtron (the native model) by default
    backend: Literal["hebtron", "hf", "vllm"] = Field("hebtron", description="hebtron eval run --backend")
    poll: float = Field(30.0, gt=0, description="seconds between the watch job's looks for new checkpoints")


class Profile(_Section):
    """One cluster: resources, runtime, network environment, paths, resume and eval settings."""

    description: str = ""
    nodes: int = Field(1, ge=1, description="nodes per training job (hebtron submit --nodes overrides)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node; 0 for CPU")
    procs_per_node: int | None = Field(None, ge=1, description="ranks per node; default gpus_per_node (1 on CPU)")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs of the one task per node that runs torchrun")
    mem: Token | None = Field(None, description="memory per node, e.g. 0 (all) or 64G")
    partition: Token | None = None
    account: Token | None = None
    qos: Token | None = None
    time: SlurmTime = Field("48:00:00", description="time limit of one start; the job requeues itself after it")
    exclusive: bool = True
    container: Container | None = None
    venv: str | None = Field(None, description="a venv on the shared filesystem; 'auto': the one running hebtron submit")
    env: dict[str, str] = Field(default_factory=dict, description="exported before launch (EFA, NCCL, threads)")
    paths: Paths
    signal_seconds: int = Field(300, ge=1, description="USR1 this many seconds before the time limit: checkpoint, requeue")
    max_restarts: int = Field(10, ge=0, description="a job started more often than this many extra times fails")
    rdzv_port: int = Field(29500, ge=1024, le=65000, description="c10d rendezvous port base on the first node (+ job id % 1000)")
    shutdown_timeout: int = Field(240, ge=1, description="seconds torchrun waits for ranks to checkpoint after a signal")
    sbatch_options: list[SbatchOption] = Field(default_factory=list, description="extra #SBATCH options")
    eval: EvalJob = Field(default_factory=EvalJob)

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.container is not None and self.venv is not None:
            raise FieldProblem(("venv",), "set a container or a venv, not both")
        for name in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise FieldProblem(("env", name), f"expected an environment variable name, got {name!r}")
        if self.signal_seconds >= _minutes(self.time) * 60:
            raise FieldProblem(("signal_seconds",), f"must be shorter than the time limit {self.time}, got {self.signal_seconds}")
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)


def _minutes(time: str) -> float:
    """Slurm time string -> minutes (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``)."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + minutes + seconds / 60
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return parts[0] * 60 + parts[1] + parts[2] / 60


def profile_path(name_or_path: str) -> Path:
    """``local`` -> ``<repo>/slurm/local.yaml``; a path to a YAML file is taken as is."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"--cluster {name_or_path}: no such profile file")
        return path
    path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise UserError(f"--cluster {name_or_path}: unknown cluster profile; expected one of: {', '.join(known)} or a .yaml file")
    return path


def load_profile(name_or_path: str, nodes: int | None = None, time: str | None = None) -> tuple[str, Profile]:
    """Load and validate a profile; returns (its name, the profile) with ``nodes`` and ``time``
    (from the command line) applied."""
    path = profile_path(name_or_path)
    data: Any = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of profile settings")
    if nodes is not None:
        if nodes < 1:
            raise UserError(f"--nodes: must be >= 1, got {nodes}")
        data = {**data, "nodes": nodes}
    if time is not None:
        if not _TIME.fullmatch(time):
            raise UserError(f"--time: expected a Slurm time like 48:00:00, 2-00:00:00 or 90 (minutes), got {time!r}")
        data = {**data, "time": time}
    try:
        profile = Profile.model_validate(data)
    except ValidationError as err:
        loc, message = explain(err, Profile)
        field = dotted(loc)
        raise UserError(one_line(f"{path}: {field + ': ' if field else ''}{message}")) from None
    return path.stem, profile


def venv_path(profile: Profile) -> str | None:
    """The venv the job activates: ``auto`` means the interpreter running this command."""
    if profile.venv == "auto":
        return sys.prefix
    return profile.venv
