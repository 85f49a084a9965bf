"""One pipeline stage of a decoder: a contiguous range of layers, plus the
embedding on the first stage and the final norm and LM head on the last. A
whole model is the single stage that owns every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kevlarflow.model.attention_metadata import AttentionMetadata
from kevlarflow.model.config import ModelConfig
from kevlarflow.model.layers import DecoderLayer, RMSNorm
from kevlarflow.model.rope import RotaryEmbedding


@dataclass(frozen=True)
class StageSpec:
    first_layer: int
    end_layer: int  # exclusive
    num_layers: int  # of the whole model

    @property
    def is_first(self) -> bool:
        return self.first_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.num_layers

    def kv_bytes_per_token(self, cfg: ModelConfig) -> int:
        """The K and V of one token in this stage's layers."""
        return cfg.kv_bytes_per_token * (self.end_layer - self.first_layer) // cfg.num_layers

    @classmethod
    def split(cls, num_layers: int, num_stages: int, stage: int) -> "StageSpec":
        """Stage `stage` of `num_stages` near-equal contiguous layer ranges."""
        if not 1 <= num_stages <= num_layers:
            raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} out of range for {num_stages} stages")
        bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
        return cls(bounds[stage], bounds[stage + 1], num_layers)


class DecoderStage(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: StageSpec, max_positions: int | None = None,
                 device: torch.device | str = "cpu"):
        """Parameters (uninitialised) and RoPE tables made on `device`; "meta"
        sizes a stage without allocating it."""
        super().__init__()
        self.cfg, self.spec = cfg, spec
        # Tables for every position the engine will serve, not the model's
        # maximum: 128k positions of Llama 3 would cost ~130 MB at start-up.
        rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings,
                               cfg.rope_theta, cfg.rope_scaling, device)
        with torch.device(device):
            self.layers = nn.ModuleList(
                DecoderLayer(cfg, rope, cfg.sliding_windows[i])
                for i in range(spec.first_layer, spec.end_layer))
            p = lambda *shape: nn.Parameter(torch.empty(*shape, dtype=cfg.dtype),
                                            requires_grad=False)
            self.embed_tokens = p(cfg.vocab_size, cfg.hidden_size) if spec.is_first else None
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype) \
                if spec.is_last else None
            # With tied embeddings the last stage holds its own copy of the
            # embedding matrix as its head: stages live in different processes.
            self.lm_head = p(cfg.vocab_size, cfg.hidden_size) if spec.is_last else None

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                logits_indices: torch.Tensor | None = None,
                attention_backend: str = "native") -> torch.Tensor:
        """inputs: token ids [T] on the first stage, hidden states [T, hidden]
        otherwise. Returns hidden states, or on the last stage the fp32 logits
        of the tokens at logits_indices."""
        x = F.embedding(inputs, self.embed_tokens) if self.spec.is_first else inputs
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, meta, kv_cache, attention_backend)
        if not self.spec.is_last:
            return x
        if logits_indices is not None:
            x = x[logits_indices]
        return F.linear(self.norm(x), self.lm_head).float()
