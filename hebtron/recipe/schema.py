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

from hebtron.checkpoints import locate_checkpoint
from hebtron.lang import LANG_IDS
from hebtron.recipe.hints import did_you_mean
from hebtron.recipe.paths import InputPath, MissingPath, OutputPath, indexed_exists, resolve_field, safely
from hebtron.recipe.units import DecayLength, TokenCount, format_tokens
from hebtron.recipe.walk import strip

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


# Bounds on sizes, so that what training cannot use is refused when the recipe is read, before
# any work: far above any real run (Nemotron 3 Nano: 1,536 x 8k per step), far below sizes whose
# bookkeeping alone would exhaust memory (a global batch of 1e12 is a list of 1e12 picks).
MAX_SEQUENCES = 2**22  # sequences in one optimizer step
MAX_SEQ_LEN = 2**24  # tokens in one sequence (16M)
MAX_STEP_TOKENS = 2**36  # tokens in one optimizer step (69B)
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_LR = 10.0  # AdamW diverges past ~1; the bound refuses typos (3e2, 1e300) yet lets a test force divergence (lr 3)


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors and numbers must be finite; a bool is
    not a number (pydantic would read ``seq_len: true`` as 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _bool_is_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            declared = strip(cls.model_fields[info.field_name].annotation)
            if declared in (int, float):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


# ----------------------------------------------------------------------------------- model
class ModelSection(Section):
    """Start from a Hugging Face NemotronH checkpoint (``hf_path``) or from scratch (``init``)."""

    hf_path: Path | None = Field(
        None, description="Hugging Face NemotronH directory, a hebtron step_N (native, or Megatron: converted once, "
                          "cached in step_N/hf/) or a checkpoints directory (its latest)"
    )
    init: dict[str, Any] | None = Field(
        None, description="inline HybridConfig fields for a model trained from scratch (checked by hebtron.model)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the weights are read in; training converts them to train.master_weights")

    @field_validator("hf_path", mode="before")
    @classmethod
    def _checkpoint_dir(cls, value: Any, info: ValidationInfo) -> Any:
        resolved = resolve_field(value, info, "checkpoint directory", Path.is_dir)
        checked = isinstance(info.context, dict) and info.context.get("check_paths")
        if isinstance(resolved, Path) and safely(Path.is_file, resolved / "latest"):
            resolved = _latest_checkpoint(resolved)  # a hebtron checkpoints directory: its newest step_N
        if checked and isinstance(resolved, Path) and not safely(Path.is_file, resolved / "config.json"):
            raise MissingPath(f"no config.json in {resolved}; expected a Hugging Face NemotronH directory or a hebtron checkpoint")
        return resolved

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSection:
        if (self.hf_path is None) == (self.init is None):
            got = "both" if self.hf_path is not None else "neither"
            raise FieldProblem((), f"set exactly one of hf_path (a checkpoint directory) or init (an inline config), got {got}")
        if self.init is not None:
            _check_init(self.init)
        return self


def _check_init(init: dict[str, Any]) -> None:
    """The inline architecture as training will build it (vocabulary and token ids still come
    from the tokenizer): types, sizes and divisibility, named by field, before any work."""
    from hebtron.errors import ConfigError
    from hebtron.model.config import HybridConfig

    known = HybridConfig.known_keys()
    unknown = [key for key in init if key not in known]  # a typo would silently keep the default
    if unknown:
        fields = sorted(known - {"layers_block_type"})
        more = f" (and {len(unknown) - 1} more unknown keys)" if len(unknown) > 1 else ""
        raise FieldProblem(("init", str(unknown[0])), f"unknown model config key{more}; {did_you_mean(str(unknown[0]), fields)}")
    try:
        HybridConfig.from_dict({"vocab_size": 1, **init}, source="model config")
    except ConfigError as err:
        text = str(err)
        prefix = "model config: "
        detail = text[len(prefix):] if text.startswith(prefix) else text
        field, _, message = detail.partition(": ")
        if field and message and " " not in field:
            raise FieldProblem(("init", field), message) from None
        raise FieldProblem(("init",), detail) from None


def _latest_checkpoint(root: Path) -> Path:
    try:
        return locate_checkpoint(root) or root
    except (OSError, ValueError):  # unreadable: the config.json check reports it
        return root


class TokenizerSection(Section):
    """Defaults to ``model.hf_path`` when the model comes from a checkpoint directory."""

    path: InputPath = Field(description="tokenizer directory or tokenizer.json")


# ------------------------------------------------------------------------------------ data
DataFormat = Literal["indexed", "jsonl", "parquet", "hf"]
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
        if data_format(value) == "indexed":  # or a save_to_disk directory (SFT chat data)
            return resolve_field(value, info, "indexed dataset (.bin + .idx)", _indexed_or_dir)
        return resolve_field(value, info, "data file", Path.is_file)

    @property
    def format(self) -> DataFormat:
        found = data_format(self.path)
        return "hf" if found == "indexed" and safely(Path.is_dir, self.path) else found


def _indexed_or_dir(path: Path) -> bool:
    return indexed_exists(path) or path.is_dir()


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
    seq_len: int = Field(gt=0, le=MAX_SEQ_LEN, description="tokens per training sequence")
    valid: list[DataSource] = Field(default_factory=list, description="validation sources")
    shuffle_windows: bool = Field(
        True, description="CPT: shuffle windows within each source (Megatron's sample shuffle), so a batch "
                          "does not hold consecutive windows of one document")

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


# ------------------------------------------------------------------------------------- sft
class SFTSection(Section):
    """Supervised fine-tuning: its presence makes the recipe an SFT run (``hebtron sft``).
    ``data.sources`` / ``data.valid`` are then chat data: ``.jsonl`` / ``.parquet`` with a
    ``messages`` column, ``save_to_disk`` directories, or rows packed by ``hebtron data pack``."""

    template: str = Field(
        "auto", description="chat template: 'auto' (the tokenizer's, else hebtron's ChatML), 'tokenizer', "
                            "'chatml', or Jinja source"
    )
    template_file: InputPath | None = Field(None, description="a Jinja chat template file (instead of template)")
    train_on: Literal["all", "last"] = Field("all", description="assistant turns that carry loss: all, or the last")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="conversations longer than data.seq_len: drop (counted), or truncate keeping the final "
                            "assistant turn (oldest turns first)"
    )
    strict: bool = Field(False, description="stop at the first bad conversation instead of counting it")
    loss_average: Literal["token", "sample"] = Field(
        "token", description="token: every assistant token weighs the same; sample: every conversation does"
    )
    pad_to_multiple_of: int = Field(1, ge=1, description="pad each packed conversation to a multiple (TP/CP, fp8)")
    pack_buffer: int = Field(20_000, gt=0, description="conversations packed together per buffer (bounds memory)")

    @model_validator(mode="after")
    def _consistent(self) -> SFTSection:
        if self.template_file is not None and self.template != "auto":
            raise FieldProblem(("template_file",), f"set template or template_file, not both (template is {self.template!r})")
        return self


# ----------------------------------------------------------------------------------- train
class EarlyKill(Section):
    """Stop a run whose smoothed loss rises early: the one loss signal that predicts failure."""

    enabled: bool = False
    window_steps: int = Field(
        200, gt=0, description="the first K steps are watched: the run is killed if, within them, the smoothed "
                               "loss rises above its lowest value so far by more than margin; later steps are "
                               "left to the eval gate")
    margin: float = Field(0.02, ge=0, description="allowed rise of the smoothed loss above its minimum, relative "
                                                  "(0.02 = 2%)")
    beta: float = Field(0.9, ge=0, lt=1, description="smoothing of the loss: bias-corrected EMA with this decay")


class TrainSection(Section):
    """Optimizer, schedule (in tokens, so a batch-size ramp does not stretch it) and guards."""

    global_batch: int = Field(gt=0, le=MAX_SEQUENCES, description="sequences per optimizer step, all ranks together")
    micro_batch: int = Field(gt=0, le=MAX_SEQUENCES, description="sequences per forward pass on one rank")
    lr: float = Field(gt=0, le=MAX_LR, description="peak learning rate")
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
    precision: Literal["fp32", "bf16"] = Field(
        "bf16", description="bf16: bf16 compute over fp32 master weights and optimizer state, fp32 gradient "
                            "reduction (FSDP2: MixedPrecisionPolicy; one process: autocast)")
    master_weights: Literal["fp32", "bf16"] = Field(
        "fp32", description="native: the dtype AdamW updates (whatever model.dtype says); bf16 only with precision "
                            "bf16, and warned: relative updates below ~4e-3 round away")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="native: recompute activations in backward; full: each block keeps only its input; "
                            "selective: each block keeps its matmul and attention outputs, recomputes the rest")
    sharded_accumulation: bool = Field(
        False, description="native FSDP2: reduce-scatter after every micro-batch, so gradients stay sharded "
                           "(1/dp of the gradient memory, one reduce-scatter per micro-batch); default: unsharded "
                           "gradients until the last micro-batch, one reduce-scatter per step")
    seed: int = Field(1234, ge=0, le=MAX_SEED)
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
        if self.master_weights == "bf16" and self.precision != "bf16":
            raise FieldProblem(("master_weights",), f"bf16 master weights need precision bf16, got {self.precision!r}")
        return self


# ------------------------------------------------------------------- checkpoint, logging, ...
class CheckpointSection(Section):
    dir: OutputPath | None = Field(None, description="default: <logging.run_dir>/checkpoints (set after loading)")
    interval: int = Field(1000, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_last: int = Field(3, ge=0, description="checkpoints kept; 0 keeps all")
    prune_before_save: bool = Field(
        False, description="when the disk has less room than the previous checkpoint took, prune the oldest "
                           "beyond keep_last - 1 before writing (never latest, KEEP or leased ones); without it "
                           "such a save stops the run with one line (exit 74) before writing anything")
    reshardable: bool = Field(
        False,
        description="megatron backend: write the distributed optimizer's state fully reshardable, so a resume may "
                    "change tp / ep / pp (every save gathers it over the data-parallel ranks: slower, far more memory); "
                    "default dp_reshardable: each rank writes its own shard, resumable at another dp only",
    )


class WandbSection(Section):
    """Mirror ``metrics.jsonl`` (training and eval records) to Weights & Biases (``pip install
    'hebtron[wandb]'``). ``offline`` writes under ``RUN_DIR/wandb`` for a later ``wandb sync``."""

    project: str = Field(min_length=1, description="W&B project")
    entity: str | None = Field(None, min_length=1, description="W&B team or user; default: the account's")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline: no network, sync later")


class LoggingSection(Section):
    run_dir: OutputPath = Field(description="where metrics, logs and the resolved recipe go")
    log_interval: int = Field(10, gt=0, description="steps between metric lines")
    tensorboard: bool = True
    progress: bool = True
    wandb: WandbSection | None = Field(None, description="mirror the metrics to Weights & Biases (optional)")


class ParallelSection(Section):
    """Parallel degrees. The native backend shards over ``dp`` only (FSDP2)."""

    dp: int = Field(1, ge=1, description="data-parallel ranks")
    tp: int = Field(1, ge=1, description="tensor parallel (megatron backend)")
    ep: int = Field(1, ge=1, description="expert parallel (megatron backend)")
    pp: int = Field(1, ge=1, description="pipeline parallel (megatron backend)")
    cp: int = Field(1, ge=1, description="context parallel (megatron backend)")


class MegatronSection(Section):
    """Megatron-Core settings beyond the parallel degrees (``backend: megatron`` only)."""

    sequence_parallel: bool = Field(True, description="shard norms/dropout activations over tp (on with MoE and tp > 1)")
    virtual_pipeline: int | None = Field(None, ge=1, description="interleaved pipeline stages per rank (pp > 1)")
    expert_tp: int | None = Field(None, ge=1, description="expert tensor parallel; default 1 with ep > 1, else tp")
    distributed_optimizer: bool = Field(True, description="shard optimizer state over data-parallel ranks")
    fp8: Literal["hybrid", "e4m3"] | None = Field(None, description="FP8 training (Transformer Engine, H200/B300)")
    fp8_recipe: Literal["tensorwise", "delayed", "mxfp8", "blockwise"] = Field(
        "tensorwise", description="FP8 scaling recipe; mxfp8 on Blackwell (B300)"
    )
    token_dispatcher: Literal["alltoall", "allgather", "flex"] = Field(
        "alltoall", description="MoE token dispatcher; flex: DeepEP / HybridEP kernels (CUDA, deep_ep installed)"
    )
    flex_backend: Literal["deepep", "hybridep"] = Field("deepep", description="token_dispatcher flex: which kernels")
    local_spec: bool = Field(
        False,
        description="use hebtron's local layer specs even on CUDA (no Transformer Engine / mamba-ssm kernels: dense "
                    "attention masks, a per-expert loop); without it a CUDA run missing those kernels stops",
    )
    # GPU speed settings (Megatron-Bridge's Nemotron 3 Nano recipes turn them all on); forced off on CPU
    overlap_grad_reduce: bool = Field(False, description="overlap the data-parallel gradient reduce-scatter with backward")
    overlap_param_gather: bool = Field(
        False, description="overlap the distributed optimizer's parameter all-gather with forward (needs overlap_grad_reduce)"
    )
    gradient_accumulation_fusion: bool = Field(False, description="fuse weight-gradient accumulation (Transformer Engine)")
    moe_permute_fusion: bool = Field(False, description="fused MoE token permutation (Transformer Engine)")
    cross_entropy_loss_fusion: bool = Field(False, description="fused vocab-parallel cross entropy (Megatron's native kernel)")

    @model_validator(mode="after")
    def _overlaps(self) -> MegatronSection:
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise FieldProblem(("overlap_param_gather",), "needs overlap_grad_reduce: true")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise FieldProblem(("overlap_param_gather",), "needs distributed_optimizer: true")
        return self


# ------------------------------------------------------------------------------------- moe
class AuxLossCoeffs(Section):
    """Load-balancing loss coefficients per MoE layer (0 turns one off; they add up)."""

    micro_batch: float = Field(0.0, ge=0, description="switch / GShard loss per micro-batch")
    sequence: float = Field(0.0, ge=0, description="sequence-level loss per row (DeepSeek-V3, Nemotron 3: 1e-4)")
    global_batch: float = Field(0.0, ge=0, description="loss over the whole step: all micro-batches and ranks")
    z: float = Field(0.0, ge=0, description="router z-loss: mean logsumexp(router logits)^2")

    @property
    def balancing(self) -> dict[str, float]:
        """The load-balancing terms that are on (the z-loss does not balance)."""
        return {k: v for k, v in (("micro_batch", self.micro_batch), ("sequence", self.sequence),
                                  ("global_batch", self.global_batch)) if v > 0}


class RouterMonitorSection(Section):
    """Routing figures per MoE layer and language, logged to metrics.jsonl and TensorBoard."""

    interval: int = Field(10, ge=0, description="steps per record (figures cover all of them); 0: off")
    active_threshold: float = Field(
        0.25, gt=0, le=1, description="an expert counts as active at >= this fraction of the ideal load"
    )


RouterFigure = Literal["load_entropy", "router_entropy", "max_share", "active_fraction", "cv"]


class CollapseRule(Section):
    """Alarm when ``metric`` of ``lang`` is past a bound in any MoE layer for ``intervals``
    monitor records in a row; then warn, stop the run, or raise that layer's aux coefficients."""

    metric: RouterFigure = "load_entropy"
    lang: Lang | None = Field("he", description="language code; null: all tokens together")
    below: float | None = Field(None, description="fire when the figure is below this")
    above: float | None = Field(None, description="fire when the figure is above this")
    intervals: int = Field(3, gt=0, description="consecutive monitor records past the bound")
    min_tokens: int | None = Field(
        None, ge=0, description="ignore records with fewer tokens of lang (default 20 x experts / top-k)"
    )
    action: Literal["warn", "stop", "raise_aux"] = "warn"
    raise_factor: float = Field(2.0, gt=1, description="raise_aux: multiply the layer's balancing coefficients")
    max_coeff: float | None = Field(None, gt=0, description="raise_aux: upper bound of any coefficient")

    @model_validator(mode="after")
    def _consistent(self) -> CollapseRule:
        if (self.below is None) == (self.above is None):
            got = "both" if self.below is not None else "neither"
            raise FieldProblem((), f"set exactly one of below or above, got {got}")
        if self.lang is not None and self.lang not in LANG_IDS:
            raise FieldProblem(("lang",), f"unknown language {self.lang!r}; known: {', '.join(LANG_IDS)} (or null)")
        if self.action == "raise_aux" and self.max_coeff is None:
            raise FieldProblem(("max_coeff",), "action raise_aux needs max_coeff, the bound on the raised coefficient")
        return self


class MoESection(Section):
    """MoE load balancing (aux losses, aux-loss-free expert bias), router monitor and alarms.
    Ignored for models without MoE layers."""

    aux_loss: AuxLossCoeffs = Field(default_factory=AuxLossCoeffs)
    bias_rate: float = Field(
        0.0, ge=0, description="aux-loss-free balancing: expert-bias step per optimizer step (1e-3 typical); 0: off"
    )
    monitor: RouterMonitorSection = Field(default_factory=RouterMonitorSection)
    alarms: list[CollapseRule] = Field(default_factory=list, description="routing-collapse rules")

    @model_validator(mode="after")
    def _consistent(self) -> MoESection:
        for i, rule in enumerate(self.alarms):
            if self.monitor.interval == 0:
                raise FieldProblem(("alarms", i), "alarms need the router monitor; set monitor.interval > 0")
            if rule.action != "raise_aux":
                continue
            on = self.aux_loss.balancing
            if not on:
                raise FieldProblem(
                    ("alarms", i, "action"),
                    "raise_aux needs a balancing loss to raise: set aux_loss.sequence, global_batch or micro_batch > 0",
                )
            top = max(on.values())
            if rule.max_coeff is not None and rule.max_coeff < top:
                raise FieldProblem(("alarms", i, "max_coeff"), f"must be >= the largest aux_loss coefficient ({top:g})")
        return self


class BatchSizeSection(Section):
    """The global batch over the run: ``train.global_batch`` is the start and the LR reference
    (``train.lr``); on every change the LR becomes lr * scaling(B / B_start), and the schedule
    stays defined in tokens. The gradient noise scale is measured whenever a step has two or
    more units (micro-batches on one rank, or ranks) and logged as ``noise/*``."""

    policy: Literal["fixed", "steps", "adaptive"] = "fixed"
    ramp: str | None = Field(None, description="steps policy: 'TOKENS:BATCH ...' like Megatron, e.g. '0:256 250B:1536'")
    min: int | None = Field(None, gt=0, le=MAX_SEQUENCES,
                            description="adaptive: smallest global batch (default train.global_batch)")
    max: int | None = Field(None, gt=0, le=MAX_SEQUENCES, description="adaptive: largest global batch")
    k: float = Field(1.0, gt=0, description="adaptive: target k x B_noise")
    interval: int = Field(50, gt=0, description="adaptive: steps between batch increases")
    warmup_updates: int = Field(20, ge=1, description="adaptive: estimator updates before the first decision")
    max_growth: float = Field(2.0, gt=1, description="adaptive: largest factor of one batch increase")
    ema: float = Field(0.95, ge=0, lt=1, description="EMA factor of the noise-scale estimates")
    measure_interval: int = Field(1, ge=0, description="steps between noise measurements; 0: never")
    spike_factor: float = Field(
        25.0, gt=1, description="a step whose squared gradient norm is this many times its running mean is "
                                "a spike and is not measured")
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"

    @model_validator(mode="after")
    def _consistent(self) -> BatchSizeSection:
        if self.policy == "steps" and not self.ramp:
            raise FieldProblem(("ramp",), "policy 'steps' needs a ramp like '0:256 250B:1536'")
        if self.policy == "adaptive" and self.max is None:
            raise FieldProblem(("max",), "policy 'adaptive' needs max, the largest global batch")
        if self.policy == "adaptive" and self.measure_interval == 0:
            raise FieldProblem(("measure_interval",), "policy 'adaptive' needs noise measurements (> 0)")
        return self


# ---------------------------------------------------------------------------------- recipe
class Recipe(Section):
    """A whole, validated run description. Build it with :func:`hebtron.recipe.load_recipe`."""

    model: ModelSection
    tokenizer: TokenizerSection
    data: DataSection
    train: TrainSection
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection
    backend: Literal["native", "megatron"] = "native"
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    megatron: MegatronSection = Field(default_factory=MegatronSection)
    moe: MoESection = Field(default_factory=MoESection)
    sft: SFTSection | None = Field(None, description="set for supervised fine-tuning on chat data")
    batch_size: BatchSizeSection = Field(default_factory=BatchSizeSection)

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
            if value > 1 and self.backend != "megatron":
                raise FieldProblem(
                    ("parallel", degree),
                    f"parallel.{degree} > 1 needs backend: megatron (backend '{self.backend}' uses dp only), got {value}",
                )
        if self.backend == "megatron":
            for field, default in (("master_weights", "fp32"), ("activation_checkpointing", "none"),
                                   ("sharded_accumulation", False)):
                if getattr(train, field) != default:
                    raise FieldProblem(("train", field), "a native-backend setting (Megatron keeps "
                                       "fp32 main weights and shards gradients itself); remove it for backend megatron")
        if train.global_batch % (train.micro_batch * par.dp):
            raise FieldProblem(
                ("train", "micro_batch"),
                f"train.micro_batch x parallel.dp = {train.micro_batch} x {par.dp} must divide "
                f"train.global_batch ({train.global_batch})",
            )
        if train.eval_interval > 0 and not self.data.valid:
            raise FieldProblem(("train", "eval_interval"), "periodic evaluation needs data.valid sources")
        if self.sft is not None:
            self._check_sft()
        self._check_sizes()
        self._check_batch_size()
        self._check_schedule()
        return self

    def _check_batch_size(self) -> None:
        from hebtron.recipe.units import parse_ramp

        section, start = self.batch_size, self.train.global_batch
        unit = self.train.micro_batch * self.parallel.dp
        sizes = {"min": section.min, "max": section.max}
        if section.ramp:
            try:
                ramp = parse_ramp(section.ramp)
            except ValueError as err:
                raise FieldProblem(("batch_size", "ramp"), str(err)) from None
            sizes.update({f"ramp size {size}": size for _, size in ramp})
            too_big = [size for _, size in ramp if size > MAX_SEQUENCES]
            if too_big:
                raise FieldProblem(("batch_size", "ramp"), f"ramp size {too_big[0]} exceeds {MAX_SEQUENCES:,} sequences")
        for name, size in sizes.items():
            if size is not None and size % unit:
                raise FieldProblem(
                    ("batch_size", name.split()[0]),
                    f"{name} ({size}) must be a multiple of train.micro_batch x parallel.dp ({unit})",
                )
        if section.max is not None and section.max < start:
            raise FieldProblem(("batch_size", "max"), f"must be >= train.global_batch ({start}), got {section.max}")
        if section.min is not None and section.min > start:
            raise FieldProblem(("batch_size", "min"), f"must be <= train.global_batch ({start}), got {section.min}")
        if section.policy == "adaptive" and self.parallel.dp == 1 and start < 2 * self.train.micro_batch:
            raise FieldProblem(
                ("batch_size", "policy"),
                "adaptive needs two or more micro-batches per step to measure the noise scale "
                f"(train.global_batch >= 2 x train.micro_batch = {2 * self.train.micro_batch}) or parallel.dp > 1",
            )

    def _check_sft(self) -> None:
        data, sft = self.data, self.sft
        assert sft is not None
        if data.phases:
            raise FieldProblem(("data", "phases"), "SFT runs have no data phases; remove data.phases")
        for what in ("sources", "valid"):
            for i, source in enumerate(getattr(data, what)):
                if source.format == "indexed" and safely(indexed_exists, source.path):
                    raise FieldProblem(
                        ("data", what, i, "path"),
                        "an SFT recipe reads chat data (.jsonl / .parquet with 'messages', a save_to_disk "
                        f"directory, or hebtron data pack output), got the indexed dataset {str(source.path)!r}",
                    )
        if data.seq_len % sft.pad_to_multiple_of:
            raise FieldProblem(("sft", "pad_to_multiple_of"),
                               f"must divide data.seq_len ({data.seq_len}), got {sft.pad_to_multiple_of}")

    def _check_sizes(self) -> None:
        """One step must fit: its tokens bounded, and not more than the whole run."""
        step_tokens = self.tokens_per_step
        if step_tokens > MAX_STEP_TOKENS:
            raise FieldProblem(("train", "global_batch"),
                               f"train.global_batch x data.seq_len = {step_tokens:,} tokens per step exceeds "
                               f"{format_tokens(MAX_STEP_TOKENS)}")
        total = self.train.total_tokens
        if total is not None and step_tokens > total:
            raise FieldProblem(("train", "global_batch"),
                               f"one step ({self.train.global_batch} x {self.data.seq_len} = {format_tokens(step_tokens)} "
                               f"tokens) exceeds the run's train.total_tokens ({format_tokens(total)})")

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
