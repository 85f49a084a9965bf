"""The building blocks of a Llama-family decoder layer, on our paged-KV ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kevlarflow import ops
from kevlarflow.model.attention_metadata import AttentionMetadata
from kevlarflow.model.config import ModelConfig
from kevlarflow.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the model dtype, as the reference models do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _param(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Attention(nn.Module):
    """q/k/v projections fused into one matrix; K/V go to the paged cache."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, sliding_window: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_proj = _param(qkv_rows, cfg.hidden_size, dtype=cfg.dtype)
        self.qkv_bias = _param(qkv_rows, dtype=cfg.dtype) if cfg.attention_bias else None
        self.o_proj = _param(cfg.hidden_size, cfg.num_heads * cfg.head_dim, dtype=cfg.dtype)
        self.rope = rope
        self.sliding_window = sliding_window
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_cache: tuple[torch.Tensor, torch.Tensor], attention_backend: str) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = F.linear(x, self.qkv_proj, self.qkv_bias)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = self.rope.apply(q.view(tokens, self.num_heads, self.head_dim), meta.positions)
        k = self.rope.apply(k.view(tokens, self.num_kv_heads, self.head_dim), meta.positions)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping, trusted=True)
        out = ops.paged_attention(q.contiguous(), key_cache, value_cache, meta.block_tables,
                                  meta.seq_lens, meta.query_start_loc, self.scale,
                                  self.sliding_window, backend=attention_backend,
                                  max_query_len=meta.max_query_len)
        return F.linear(out.view(tokens, q_size), self.o_proj)


class MLP(nn.Module):
    """SwiGLU with gate and up projections fused into one matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = _param(2 * cfg.intermediate_size, cfg.hidden_size, dtype=cfg.dtype)
        self.down_proj = _param(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, sliding_window: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = Attention(cfg, rope, sliding_window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = MLP(cfg)

    def forward(self, x, meta, kv_cache, attention_backend):
        x = x + self.self_attn(self.input_layernorm(x), meta, kv_cache, attention_backend)
        return x + self.mlp(self.post_attention_layernorm(x))
