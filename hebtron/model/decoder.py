"""``HybridModel``: the Nemotron-H decoder written for one device.

Module names equal the on-disk Hugging Face names (``backbone.layers.N.mixer...``, ``lm_head``)
so that import/export is a rename of the expert tensors only. Parallelism (FSDP2, Megatron) is
applied from outside.

Packed sequences: pass ``seq_idx`` (b, T), the document index of every token. Attention stays
inside each document (causal; no dense mask: see :mod:`hebtron.model.attention` for the paths)
and every Mamba layer restarts its conv and scan state at document starts, so a packed row
computes exactly what each document computes alone. Without ``seq_idx``, it is derived from
``position_ids`` resets when those are given.

Training can leave the head to the loss: ``model(..., return_hidden=True)`` returns the final
hidden states and no logits, and :func:`hebtron.train.loss.token_loss_sum_from_hidden` runs
``lm_head`` and the cross-entropy chunk by chunk, never holding (b, T, vocab) fp32 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hebtron.model.attention import Attention, Documents, attention_path, prepare_documents
from hebtron.model.config import HybridConfig
from hebtron.model.mamba2 import Mamba2Mixer
from hebtron.model.mlp import MLP
from hebtron.model.moe import MoE, RouterRecord
from hebtron.model.norms import RMSNorm


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (b, T, vocab), fp32; None with return_hidden=True
    routers: list[RouterRecord] = field(default_factory=list)  # one per MoE layer, in layer order
    hidden: torch.Tensor | None = None  # (b, T, hidden) after the final norm, with return_hidden=True


class Block(nn.Module):
    """Pre-norm residual block around one mixer (Mamba2, attention, MLP or MoE)."""

    def __init__(self, config: HybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_types[layer_idx]
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if self.kind == "mamba":
            self.mixer: nn.Module = Mamba2Mixer(config)
        elif self.kind == "attention":
            self.mixer = Attention(config)
        elif self.kind == "mlp":
            self.mixer = MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
        else:
            self.mixer = MoE(config, layer_idx)

    def forward(
        self, hidden: torch.Tensor, seq_idx: torch.Tensor | None, documents: Documents | None
    ) -> tuple[torch.Tensor, RouterRecord | None]:
        x = self.norm(hidden)
        record = None
        if self.kind == "mamba":
            x = self.mixer(x, seq_idx)
        elif self.kind == "attention":
            x = self.mixer(x, documents)
        elif self.kind == "moe":
            x, record = self.mixer(x)
        else:
            x = self.mixer(x)
        return hidden + x, record


class Backbone(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class HybridModel(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        # "auto" picks per device and dtype (hebtron.model.attention); tests force "dense" (the
        # reference), "flex" or "segments" to compare them.
        self.attention_impl = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Nemotron-H initialization (normal(0, initializer_range), S4D-real A, dt in [min, max])."""
        cfg = self.config
        std = cfg.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, std=std)
                module.gate.e_score_correction_bias.zero_()
                nn.init.normal_(module.experts.up_proj, std=std)
                nn.init.normal_(module.experts.down_proj, std=std)
        for module in self.modules():
            if isinstance(module, Mamba2Mixer):
                heads = module.num_heads
                module.A_log.copy_(torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
                module.D.fill_(1.0)
                log_dt = torch.rand(heads) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
                dt = torch.exp(log_dt + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                module.conv1d.reset_parameters()
                if cfg.rescale_prenorm_residual:  # GPT-2 style: scale residual outputs by depth
                    nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                    module.out_proj.weight.div_(math.sqrt(cfg.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """input_ids (b, T); position_ids / seq_idx (b, T) for packed rows. Returns logits (or,
        with ``return_hidden``, the final hidden states for a chunked head + loss) and router records."""
        seq_idx = _document_index(input_ids, position_ids, seq_idx)
        documents = None
        if "attention" in self.config.layer_types:
            path = attention_path(input_ids.device, self._compute_dtype(input_ids.device), self.config.attn_head_dim,
                                  seq_idx is not None, self.attention_impl)
            documents = prepare_documents(seq_idx, path) if path != "sdpa_causal" else None
        hidden = self.backbone.embeddings(input_ids)
        routers: list[RouterRecord] = []
        for block in self.backbone.layers:
            hidden, record = block(hidden, seq_idx, documents)
            if record is not None:
                routers.append(record)
        hidden = self.backbone.norm_f(hidden)
        if return_hidden:
            return ModelOutput(logits=None, routers=routers, hidden=hidden)
        return ModelOutput(logits=self.lm_head(hidden).float(), routers=routers)

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype attention will run in: autocast's where it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.backbone.embeddings.weight.dtype


def _document_index(
    input_ids: torch.Tensor, position_ids: torch.Tensor | None, seq_idx: torch.Tensor | None
) -> torch.Tensor | None:
    """The per-token document index, or None when every row is a single document (fast path)."""
    if seq_idx is None and position_ids is not None:
        seq_idx = (position_ids == 0).long().cumsum(dim=-1)
    if seq_idx is None:
        return None
    if seq_idx.shape != input_ids.shape:
        raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} != input_ids shape {tuple(input_ids.shape)}")
    # On a device this check would wait for the device's answer: the trainer drops the seq_idx of
    # one-document micro-batches while they are still on the host (hebtron.train.engine.to_device).
    if _on_host(seq_idx) and bool((seq_idx == seq_idx[:, :1]).all()):
        return None
    return seq_idx


def _on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"
