"""The recipe schema: one pydantic model per YAML section, unknown keys rejected everywhere.

To add a section (sft, moe aux losses, batch-size policy, eval): subclass :class:`Section`, add a
field to :class:`Recipe` with a default so older recipes keep loading, and put checks that span
sections in ``Recipe._cross_checks``. A check raises :class:`FieldProblem` with the field path
relative to the model it runs in; the loader turns that into the one-line user error.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hebtron.recipe.hints import did_you_mean
from hebtron.recipe.paths import InputPath, MissingPath, OutputPath, indexed_exists, resolve_field, safely
from hebtron.recipe.units import DecayLength, TokenCount, format_tokens

Loc = tuple[str | int, ...]

# Default WSD decay when a recipe names no decay length: the last 20% of the run.
DEFAULT_WSD_DECAY_FRACTION = 0.2


class FieldProblem(ValueError):
    """A check that failed on ``loc`` (relative to the model whose validator raised it)."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LANG_RE = re.compile(r"[a-z]{2,3}([_-][A-Za-z0-9]{2,8})*")


def _name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"expected a name of up to 64 letters, digits, '_', '.' or '-', got {value!r}")
    return value


def _lang(value: str) -> str:
    if not _LANG_RE.fullmatch(value):
        raise ValueError(f"expected a language code like 'he' or 'en', got {value!r}")
    return value


Name = Annotated[str, AfterValidator(_name)]
Lang = Annotated[str, AfterValidator(_lang)]
PositiveTokens = Annotated[TokenCount, Field(gt=0)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors and numbers must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ----------------------------------------------------------------------------------- model
class ModelSection(Section):
    """Start from a Hugging Face NemotronH checkpoint (``hf_path``) or from scratch (``init``)."""

    hf_path: Path | None = Field(None, description="Hugging Face NemotronH checkpoint directory")
    init: dict[str, Any] | None = Field(
        None, description="inline HybridConfig fields for a model trained from scratch (checked by hebtron.model)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="parameter dtype on load")

    @field_validator("hf_path", mode="before")
    @classmethod
    def _checkpoint_dir(cls, value: Any, info: ValidationInfo) -> Any:
        resolved = resolve_field(value, info, "checkpoint directory", Path.is_dir)
        checked = isinstance(info.context, dict) and info.context.get("check_paths")
        if checked and isinstance(resolved, Path) and not safely(Path.is_file, resolved / "config.json"):
            raise MissingPath(f"no config.json in {resolved}; expected a Hugging Face NemotronH checkpoint directory")
        return resolved

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSection:
        if (self.hf_path is None) == (self.init is None):
            got = "both" if self.hf_path is not None else "neither"
            raise FieldProblem((), f"set exactly one of hf_path (a checkpoint directory) or init (an inline config), got {got}")
        return self


class TokenizerSection(Section):
    """Defaults to ``model.hf_path`` when the model comes from a checkpoint directory."""

    path: InputPath = Field(description="tokenizer directory or tokenizer.json")


# ------------------------------------------------------------------------------------ data
DataFormat = Literal["indexed", "jsonl", "parquet"]
_FILE_FORMATS: dict[str, DataFormat] = {".jsonl": "jsonl", ".parquet": "parquet"}
_UNSUPPORTED = (".json", ".txt", ".csv", ".tsv", ".gz", ".zst", ".arrow", ".bin", ".idx")


def data_format(path: str | Path) -> DataFormat:
    """``jsonl`` / ``parquet`` by suffix; anything else is an indexed-dataset prefix."""
    return _FILE_FORMATS.get(Path(path).suffix.lower(), "indexed")


class DataSource(Section):
    """One corpus: a prepared indexed-dataset prefix (``X`` for ``X.bin`` + ``X.idx``) or a file."""

    name: Name
    path: Path = Field(description="indexed dataset prefix, or a .jsonl / .parquet file")
    weight: float = Field(1.0, gt=0, description="relative sampling weight")
    lang: Lang | None = Field(None, description="language code for per-language monitors, e.g. 'he'")

    @field_validator("path", mode="before")
    @classmethod
    def _find(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Path):
            value = os.fspath(value)
        if not isinstance(value, str):
            return value
        suffix = Path(value).suffix.lower()
        if suffix in (".bin", ".idx"):
            raise ValueError(f"give the indexed dataset prefix without {suffix!r}: {value[: -len(suffix)]!r}")
        if suffix in _UNSUPPORTED:
            raise ValueError(f"unsupported data file {value!r}; expected .jsonl, .parquet or an indexed dataset prefix")
        if data_format(value) == "indexed":
            return resolve_field(value, info, "indexed dataset (.bin + .idx)", indexed_exists)
        return resolve_field(value, info, "data file", Path.is_file)

    @property
    def format(self) -> DataFormat:
        return data_format(self.path)


class Phase(Section):
    """A stretch of the run with its own mixture; sources not named keep their base weight."""

    name: Name
    tokens: PositiveTokens = Field(description="token budget of this phase, e.g. '10B'")
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="source name -> weight in this phase (0 leaves it out)"
    )


def _unique(items: list[Any], what: str) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.name in seen:
            raise FieldProblem((what, i, "name"), f"duplicate name {item.name!r} (also {what}[{seen[item.name]}])")
        seen[item.name] = i


class DataSection(Section):
    """Training mixture, phases and validation sets. Phases run in order; once their budgets are
    spent the last phase's mixture continues to the end of the run."""

    sources: list[DataSource] = Field(min_length=1)
    phases: list[Phase] = Field(default_factory=list)
    seq_len: int = Field(gt=0, description="tokens per training sequence")
    valid: list[DataSource] = Field(default_factory=list, description="validation sources")
    num_workers: int = Field(0, ge=0, description="data loader worker processes")

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        _unique(self.sources, "sources")
        _unique(self.valid, "valid")
        _unique(self.phases, "phases")
        known = {s.name: s.weight for s in self.sources}
        for i, phase in enumerate(self.phases):
            for key in phase.weights:
                if key not in known:
                    raise FieldProblem(("phases", i, "weights", key), f"unknown source {key!r}; {did_you_mean(key, known)}")
            if not any(phase.weights.get(name, w) > 0 for name, w in known.items()):
                raise FieldProblem(("phases", i, "weights"), "every source has weight 0; keep at least one")
        return self

    def phase_weights(self, phase: Phase | None = None) -> dict[str, float]:
        """Source name -> weight, with ``phase``'s overrides applied."""
        override = phase.weights if phase is not None else {}
        return {s.name: override.get(s.name, s.weight) for s in self.sources}


# ----------------------------------------------------------------------------------- train
class EarlyKill(Section):
    """Stop a run whose smoothed loss rises early: the one loss signal that predicts failure."""

    enabled: bool = False
    window_steps: int = Field(200, gt=0, description="steps K compared: EMA loss now vs K steps ago")
    margin: float = Field(0.02, ge=0, description="relative rise of the EMA loss that kills the run")
    ema: float = Field(0.9, ge=0, lt=1, description="EMA smoothing factor of the loss")


class TrainSection(Section):
    """Optimizer, schedule (in tokens, so a batch-size ramp does not stretch it) and guards."""

    global_batch: int = Field(gt=0, description="sequences per optimizer step, all ranks together")
    micro_batch: int = Field(gt=0, description="sequences per forward pass on one rank")
    lr: float = Field(gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0)
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_tokens: TokenCount = 0
    decay_tokens: DecayLength | None = Field(
        None, description="wsd only: the final stretch, a fraction of the run (0.2, the default) or tokens ('50B')"
    )
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    total_tokens: Annotated[TokenCount, Field(gt=0)] | None = None
    total_steps: int | None = Field(None, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 turns clipping off")
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = Field(1234, ge=0)
    nan_guard_max_skips: int = Field(5, ge=0, description="non-finite steps skipped in a row before the run stops")
    early_kill: EarlyKill = Field(default_factory=EarlyKill)
    eval_interval: int = Field(0, ge=0, description="steps between validation passes; 0: only at the end")
    eval_batches: int = Field(10, gt=0, description="micro-batches per validation pass and source")

    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if (self.total_tokens is None) == (self.total_steps is None):
            got = "both" if self.total_tokens is not None else "neither"
            raise FieldProblem((), f"set exactly one of total_tokens or total_steps, got {got}")
        if self.min_lr > self.lr:
            raise FieldProblem(("min_lr",), f"must be <= train.lr ({self.lr:g}), got {self.min_lr:g}")
        if self.schedule != "wsd" and self.decay_tokens is not None:
            what = "has no decay" if self.schedule == "constant" else "decays from the end of warmup to the end"
            raise FieldProblem(("decay_tokens",), f"schedule {self.schedule!r} {what}; remove decay_tokens or use 'wsd'")
        return self


# ------------------------------------------------------------------- checkpoint, logging, ...
class CheckpointSection(Section):
    dir: OutputPath | None = Field(None, description="default: <logging.run_dir>/checkpoints (set after loading)")
    interval: int = Field(1000, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_last: int = Field(3, ge=0, description="checkpoints kept; 0 keeps all")


class LoggingSection(Section):
    run_dir: OutputPath = Field(description="where metrics, logs and the resolved recipe go")
    log_interval: int = Field(10, gt=0, description="steps between metric lines")
    tensorboard: bool = True
    progress: bool = True


class ParallelSection(Section):
    """Parallel degrees. The native backend shards over ``dp`` only (FSDP2)."""

    dp: int = Field(1, ge=1, description="data-parallel ranks")
    tp: int = Field(1, ge=1, description="tensor parallel (megatron backend)")
    ep: int = Field(1, ge=1, description="expert parallel (megatron backend)")
    pp: int = Field(1, ge=1, description="pipeline parallel (megatron backend)")
    cp: int = Field(1, ge=1, description="context parallel (megatron backend)")


# ---------------------------------------------------------------------------------- recipe
class Recipe(Section):
    """A whole, validated run description. Build it with :func:`hebtron.recipe.load_recipe`."""

    model: ModelSection
    tokenizer: TokenizerSection
    data: DataSection
    train: TrainSection
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection
    backend: Literal["native"] = "native"
    parallel: ParallelSection = Field(default_factory=ParallelSection)

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_from_checkpoint(cls, data: Any) -> Any:
        """A checkpoint directory carries its tokenizer; do not make recipes say it twice."""
        if isinstance(data, dict) and "tokenizer" not in data:
            model = data.get("model")
            if isinstance(model, dict) and model.get("hf_path") is not None:
                return {**data, "tokenizer": {"path": model["hf_path"]}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.checkpoint.dir is None:
            self.checkpoint.dir = self.logging.run_dir / "checkpoints"
        par, train = self.parallel, self.train
        for degree in ("tp", "ep", "pp", "cp"):
            value = getattr(par, degree)
            if value > 1:  # native backend; megatron lifts this
                raise FieldProblem(
                    ("parallel", degree),
                    f"parallel.{degree} > 1 needs backend: megatron (backend '{self.backend}' uses dp only), got {value}",
                )
        if train.global_batch % (train.micro_batch * par.dp):
            raise FieldProblem(
                ("train", "micro_batch"),
                f"train.micro_batch x parallel.dp = {train.micro_batch} x {par.dp} must divide "
                f"train.global_batch ({train.global_batch})",
            )
        if train.eval_interval > 0 and not self.data.valid:
            raise FieldProblem(("train", "eval_interval"), "periodic evaluation needs data.valid sources")
        self._check_schedule()
        return self

    def _check_schedule(self) -> None:
        train, total = self.train, self.planned_tokens
        if train.schedule == "cosine" and train.warmup_tokens >= total:
            raise FieldProblem(
                ("train", "warmup_tokens"),
                f"must be < the run's {format_tokens(total)} tokens for a cosine schedule, got {train.warmup_tokens}",
            )
        used = train.warmup_tokens + self.decay_token_count
        if used > total:
            raise FieldProblem(
                ("train", "warmup_tokens"),
                f"warmup ({format_tokens(train.warmup_tokens)}) + decay ({format_tokens(self.decay_token_count)}) "
                f"tokens exceed the run's {format_tokens(total)} tokens",
            )

    # ------------------------------------------------------------- derived quantities
    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step at the recipe's global batch."""
        return self.train.global_batch * self.data.seq_len

    @property
    def planned_tokens(self) -> int:
        """``train.total_tokens``, or ``total_steps`` x tokens per step."""
        if self.train.total_tokens is not None:
            return self.train.total_tokens
        return int(self.train.total_steps or 0) * self.tokens_per_step

    @property
    def planned_steps(self) -> int:
        """Optimizer steps at the recipe's global batch (a batch-size ramp changes this)."""
        if self.train.total_steps is not None:
            return self.train.total_steps
        return max(1, math.ceil(self.planned_tokens / self.tokens_per_step))

    @property
    def decay_token_count(self) -> int:
        """Tokens over which the LR falls to ``min_lr`` at the end of the run."""
        train, total = self.train, self.planned_tokens
        if train.schedule == "constant":
            return 0
        if train.schedule == "cosine":
            return max(0, total - train.warmup_tokens)
        decay = train.decay_tokens if train.decay_tokens is not None else DEFAULT_WSD_DECAY_FRACTION
        if isinstance(decay, float):
            return int(round(decay * total))
        return decay


def recipe_json_schema() -> dict[str, Any]:
    """JSON schema of a recipe file for editor completion (``extends`` included)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hebtron recipe"
    schema["properties"] = {
        "extends": {"type": "string", "description": "parent recipe file, relative to this one"},
        **schema["properties"],
    }
    return schema
