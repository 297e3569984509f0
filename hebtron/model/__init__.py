"""The native hybrid Mamba2 / attention / MoE decoder (Nemotron-H compatible).

Attributes load lazily so that importing a submodule (e.g. the CLI's ``hebtron.model.commands``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "HybridConfig": "hebtron.model.config",
    "HybridModel": "hebtron.model.decoder",
    "ModelOutput": "hebtron.model.decoder",
    "RouterRecord": "hebtron.model.moe",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hebtron.model' has no attribute {name!r}")
