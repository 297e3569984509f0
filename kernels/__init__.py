"""Compute kernels for hebtron, importable as ``hebtron.kernels``.

Each kernel has a pure-PyTorch reference (the CPU path); GPU kernels from mamba-ssm /
causal-conv1d are used where installed and never imported on CPU.
"""
