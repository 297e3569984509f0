"""hebtron: continued pretraining and SFT of hybrid Mamba2/attention/MoE decoders, Hebrew first."""

__version__ = "0.1.0"
