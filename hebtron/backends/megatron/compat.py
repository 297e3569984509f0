"""CPU compatibility layer for megatron-core: run the real Megatron code on CPU processes over gloo.

Megatron-Core assumes a CUDA device in places that are not about the math. The patches below
replace exactly those, so the *real* Megatron code paths (parallel linears, MoE router, all-to-all
token dispatcher, distributed optimizer, gradient finalization, forward-backward schedules incl.
pipeline 1F1B, distributed checkpointing) run on a laptop:

==================================  ==========================================================
patch                               why
==================================  ==========================================================
``torch.cuda.current_device``       places params/buffers (router bias, Mamba, optimizer): "cpu"
``torch.cuda.synchronize``          called by the checkpoint writer: a no-op on CPU
CUDA RNG tracker                    named RNG states swapped around init: the CPU generator
``device="cuda"`` factories         optimizer flags, grad buffers, aux-loss tracker: on CPU
CUDA type names                     optimizers sort params by ``torch.cuda.FloatTensor``
torch-Adam ``step`` on reload       fallback optimizer (no Apex/TE): the checkpoint's ``step``
Triton inference kernels            imported at module level by the Mamba mixer (inference only)
all-to-all dispatcher               CUDA side stream + host copies of split sizes
``te_general_gemm`` name            undefined without Transformer Engine (router GEMM)
``jit_fuser`` (``torch.compile``)   small fused ops compile at first call, ~3 s per process
==================================  ==========================================================

Rules:
- :func:`apply` runs only where no CUDA exists: in ``hebtron preflight`` workers, in tests, and
  in CPU-side runs of the megatron backend and ``hebtron convert`` (Megatron's checkpoint writer
  needs it there). It refuses, with one line, to run where CUDA is available; GPU training never
  patches, on any megatron-core version.
- The patches are pinned to :data:`TESTED_VERSION`; another megatron-core (0.17+ on Python 3.12)
  refuses to patch with one line (``force=True`` overrides, at the caller's risk) because
  Megatron's internals move between releases (:func:`refusal` is the rule). Patches change
  process-global state: apply them in processes of their own.
- Each patch replaces one CUDA-only call with its CPU equivalent and says why; none changes
  numerics. The layer specs that make Nemotron-H run on CPU at all (Mamba mixer, packed
  attention) are not patches: they are hebtron modules in :mod:`.specs`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import Callable
from typing import Any

import torch

from hebtron.errors import UserError

TESTED_VERSION = "0.16.1"
_APPLIED = False


def installed_version() -> str:
    """The installed megatron-core, read from its package metadata: importing it to ask would
    decorate its fused ops with ``torch.compile`` before :func:`apply` can prevent that."""
    return importlib.metadata.version("megatron-core")


def is_applied() -> bool:
    return _APPLIED


def refusal(cuda: bool, version: str) -> str | None:
    """Why the patches must not be applied in this process (None: they may be).

    A pure function of the two facts it depends on, so the rule is testable on any machine:
    never where CUDA runs (GPU training uses Megatron's own code paths, unpatched), and never on
    a megatron-core other than :data:`TESTED_VERSION` (the patched internals move between releases)."""
    if cuda:
        return ("megatron CPU compatibility layer: CUDA is available in this process, and hebtron never patches "
                "megatron-core where GPUs run (for a CPU-only run, hide the GPUs: CUDA_VISIBLE_DEVICES=)")
    if version != TESTED_VERSION:
        return (f"megatron-core {version} is installed; hebtron's CPU runs of the megatron backend (tests, preflight, "
                f"convert) patch its CUDA-only calls and are tested with {TESTED_VERSION} only "
                f"(pip install megatron-core=={TESTED_VERSION}, Python 3.11 or 3.12; GPU runs accept 0.16.1 and later)")
    return None


def apply(force: bool = False) -> None:
    """Patch megatron-core for CPU processes (idempotent). Refuses with one line where CUDA runs
    or another megatron-core is installed (``force=True`` overrides, at the caller's risk)."""
    global _APPLIED
    if _APPLIED:
        return
    problem = refusal(torch.cuda.is_available(), installed_version())
    if problem is not None and not force:
        raise UserError(problem)
    _import_megatron_uncompiled()
    for patch in _PATCHES:
        patch()
    _APPLIED = True


# ----------------------------------------------------------------------------- patches
def _no_compile(model: Any = None, **_: Any) -> Any:
    """``torch.compile``'s two call forms, compiling nothing: ``compile(fn)`` and ``compile(**kw)(fn)``."""
    return model if model is not None else (lambda fn: fn)


def _import_megatron_uncompiled() -> None:
    """Import megatron-core with ``torch.compile`` standing in as the identity. Its module-level
    ``jit_fuser = torch.compile`` decorations import dynamo and inductor (about 2 s of every CPU
    process's start) for fused ops that :func:`_patch_compiled_fusions` unwraps anyway; imported
    this way they are plain functions from the start. A megatron-core imported earlier is left
    to the unwrapping."""
    if "megatron.core" in sys.modules:
        return
    real = torch.compile
    torch.compile = _no_compile  # type: ignore[assignment]
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real  # type: ignore[assignment]


def _patch_current_device() -> None:
    """``torch.cuda.current_device()`` places parameters and buffers (router expert bias, token
    counters, Mamba params, optimizer buckets): answer "cpu" so they land on the CPU."""
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _patch_synchronize() -> None:
    """Distributed checkpointing calls ``torch.cuda.synchronize()`` before copying tensors to
    host memory; on CPU every op has already finished, so it is a no-op."""
    torch.cuda.synchronize = lambda *_, **__: None  # type: ignore[assignment]


def _patch_rng_tracker() -> None:
    """Megatron keeps named *CUDA* RNG states (model-parallel, data-parallel, expert) and swaps
    them in around initialization and dropout. On CPU the device generator is the CPU generator:
    route the tracker's get/set/seed calls to it, so forks swap CPU RNG states the same way."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)  # type: ignore[assignment]
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint")


def _cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _patch_cuda_factories() -> None:
    """The optimizer (found-inf flags, loss scale, norm buffers), gradient buffers and the MoE
    aux-loss tracker create small tensors with ``device="cuda"`` / ``Tensor.cuda()``: create them
    on the CPU instead. Only an explicit CUDA device is rewritten; nothing else changes."""
    for name in _FACTORIES:
        original = getattr(torch, name)

        def factory(*args: Any, __original: Callable = original, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return __original(*args, **kwargs)

        factory.__name__ = f"cpu_{name}"
        setattr(torch, name, factory)
    torch.Tensor.cuda = lambda self, *_, **__: self  # type: ignore[assignment]


@contextlib.contextmanager
def _cuda_type_names():
    """While active, ``tensor.type()`` names CPU tensors as their CUDA twins (torch.cuda.FloatTensor)."""
    original = torch.Tensor.type

    def type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and not self.is_cuda:
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_name  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def _patch_optimizer_param_types() -> None:
    """Megatron's mixed-precision and distributed optimizers sort parameters into fp32 / fp16 /
    bf16 groups by the *CUDA* type names and reject anything else. During their constructors,
    CPU tensors report the CUDA name of the same dtype."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    # Gradient clipping asserts the same on every gradient; optimizer.py imported it by name.
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_module

    wrapped = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    optimizer_module.clip_grad_by_total_norm_fp32 = wrapped


def _patch_torch_adam_step_reload() -> None:
    """Without Apex / Transformer Engine the distributed optimizer falls back to ``torch.optim.Adam``,
    whose per-parameter state also holds ``step``. Loading restores ``step`` from the checkpoint's
    parameter groups first, then copies every state key from the checkpoint's parameter state: a
    fully reshardable one has no ``step`` (KeyError), and a dp_reshardable one carries it as a
    non-persistent object, i.e. the *live* optimizer's count, not the checkpoint's (a resumed run
    would then bias-correct with the wrong step). Keep the already-restored ``step`` for that copy."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: Any, tensors: dict[str, torch.Tensor]) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        current = self.optimizer.state.get(main_param, {})
        restored = {"step": current["step"]} if "step" in current else {}
        original(self, model_param, {**tensors, **restored})

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    # A fresh torch Adam has no state until its first step, and the distributed optimizer's
    # ``state_dict`` (called while *loading* a checkpoint) reads ``step`` from that state.
    # Give it the state a fresh Adam has conceptually: zero moments, step 0.
    original_state_dict = DistributedOptimizer.state_dict

    def state_dict(self: Any) -> Any:
        inner = self.optimizer
        if isinstance(inner, torch.optim.Optimizer) and self.init_state_fn is not None:
            fresh = [p for g in inner.param_groups for p in g["params"] if len(inner.state[p]) == 0]
            if fresh:
                self.init_state_fn(inner, self.config)
                for p in fresh:
                    inner.state[p].setdefault("step", torch.tensor(0.0))
        return original_state_dict(self)

    DistributedOptimizer.state_dict = state_dict


def _with_cuda_type_names(fn: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        with _cuda_type_names():
            return fn(*args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "call")
    return call


def _patch_triton_inference_ops() -> None:
    """``megatron.core.ssm.mamba_mixer`` imports Triton kernels for dynamic *inference* batching at
    module level, and Triton does not exist for the CPU torch wheel. Register that module with
    functions that say so if ever called (training never calls them)."""
    import sys
    import types

    name = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    if name in sys.modules:
        return
    try:
        import triton  # noqa: F401  # type: ignore[import-not-found]

        return  # the real module imports
    except ImportError:
        pass

    def unavailable(*_: Any, **__: Any) -> None:
        raise RuntimeError("Megatron's dynamic-inference Triton kernels are not available on CPU")

    module = types.ModuleType(name, "CPU placeholder: Megatron dynamic-inference kernels need Triton")
    for fn in ("tensor_get_slice_after", "tensor_masked_update", "tensor_merge"):
        setattr(module, fn, unavailable)
    sys.modules[name] = module


class _NoStream:
    """Stands in for the side CUDA stream the all-to-all dispatcher copies split sizes on."""

    def wait_stream(self, _: Any) -> None:
        pass

    def record_event(self) -> "_NoStream":
        return self

    def synchronize(self) -> None:
        pass


def _patch_alltoall_dispatcher() -> None:
    """The all-to-all token dispatcher (expert parallelism) creates a CUDA side stream and moves
    its split sizes to host memory as numpy arrays there; ``all_to_all`` then takes them as
    Python sizes. On CPU there is no stream and the tensors are already on the host: convert them
    to numpy at the same point, which is what the CUDA path hands to ``all_to_all``."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()

    def host_split_sizes(self: Any, point: str, tokens_per_expert: torch.Tensor | None = None) -> Any:
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = host_split_sizes


def _patch_router_gemm_name() -> None:
    """``moe_utils`` imports ``te_general_gemm`` only when Transformer Engine imports, then tests
    ``te_general_gemm is not None`` in the fp32 router GEMM: without TE the name is missing
    (NameError). Define it as None, the value the code expects for "no TE"."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_compiled_fusions() -> None:
    """megatron-core wraps small fused ops in ``torch.compile`` (``megatron.core.jit.jit_fuser``:
    squared ReLU, the router's expert-bias update, ...). On CPU each one compiles through
    inductor at its first call, about 3 s per process (more with a cold cache), for kernels of
    toy size. Run the original functions instead: the decorated ones that exist are unwrapped,
    and modules imported later get megatron's own no-op decorator. The math is the same."""
    from megatron.core import jit

    jit.disable_jit_fuser()

    def unwrap(owner: Any, names: dict[str, Any]) -> None:
        for attr, value in list(names.items()):
            try:
                original = getattr(value, "_torchdynamo_orig_callable", None)
            except Exception:  # noqa: BLE001 - an attribute that computes itself: not a compiled function
                continue
            if callable(original):
                setattr(owner, attr, original)

    for name, module in list(sys.modules.items()):
        if module is None or not (name == "megatron.core" or name.startswith("megatron.core.")):
            continue
        members = vars(module)
        unwrap(module, members)
        for value in list(members.values()):
            if isinstance(value, type) and value.__module__ == name:
                unwrap(value, dict(vars(value)))


_PATCHES: list[Callable[[], None]] = [
    _patch_compiled_fusions,
    _patch_current_device,
    _patch_synchronize,
    _patch_rng_tracker,
    _patch_cuda_factories,
    _patch_optimizer_param_types,
    _patch_torch_adam_step_reload,
    _patch_triton_inference_ops,
    _patch_alltoall_dispatcher,
    _patch_router_gemm_name,
]
