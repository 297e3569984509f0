"""The native hybrid Mamba2 / attention / MoE decoder (Nemotron-H compatible)."""

from hebtron.model.config import HybridConfig
from hebtron.model.decoder import HybridModel, ModelOutput
from hebtron.model.moe import RouterRecord

__all__ = ["HybridConfig", "HybridModel", "ModelOutput", "RouterRecord"]
