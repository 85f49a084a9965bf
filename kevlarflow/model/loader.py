"""Load one stage's weights from a Hugging Face safetensors checkpoint.

Only the tensors of the stage's own layers (and the embedding / head where it
owns them) are read: a stage never touches the rest of the checkpoint. This is
what lets a worker load its weights independently of every other worker."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from kevlarflow.model.config import ModelConfig
from kevlarflow.model.stage import DecoderStage, StageSpec


class Checkpoint:
    """Tensor name -> file map of a safetensors checkpoint (sharded or not)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / f for name, f in weight_map.items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise ValueError(f"{self.path} holds no *.safetensors weights")
            self.files = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    self.files.update({name: shard for name in f.keys()})
        self._open: dict[Path, object] = {}

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"checkpoint {self.path} lacks tensor {name!r}")
        shard = self.files[name]
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), framework="pt")
        return self._open[shard].get_tensor(name).to(dtype)

    def close(self):
        self._open.clear()


def _copy(param: torch.nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                         f"the config implies {tuple(param.shape)}")
    param.data.copy_(tensor)


def stage_bytes(cfg: ModelConfig, max_positions: int | None = None,
                spec: StageSpec | None = None) -> int:
    """Device memory of a stage's weights and RoPE tables, sized on the meta
    device (nothing is allocated)."""
    spec = spec or StageSpec(0, cfg.num_layers, cfg.num_layers)
    stage = DecoderStage(cfg, spec, max_positions, "meta")
    rope = stage.layers[0].self_attn.rope if len(stage.layers) else None
    tables = 0 if rope is None else 2 * rope.cos.numel() * rope.cos.element_size()
    return sum(p.numel() * p.element_size() for p in stage.parameters()) + tables


def load_stage(path: str | Path, spec: StageSpec | None = None, cfg: ModelConfig | None = None,
               dtype: torch.dtype | None = None, progress: bool = True,
               max_positions: int | None = None,
               device: torch.device | str = "cpu") -> DecoderStage:
    """Build the stage `spec` (default: the whole model) on `device` and fill
    its weights, tensor by tensor from the checkpoint. max_positions bounds
    the RoPE tables (default: the model's maximum)."""
    cfg = cfg or ModelConfig.from_pretrained(path)
    if dtype is not None:
        cfg.dtype = dtype
    spec = spec or StageSpec(0, cfg.num_layers, cfg.num_layers)
    ckpt = Checkpoint(path)
    stage = DecoderStage(cfg, spec, max_positions, device)
    try:
        if spec.is_first:
            _copy(stage.embed_tokens, ckpt.get("model.embed_tokens.weight", cfg.dtype),
                  "model.embed_tokens.weight")
        layer_ids = range(spec.first_layer, spec.end_layer)
        bar = tqdm(layer_ids, desc=f"loading layers {spec.first_layer}-{spec.end_layer - 1}",
                   unit="layer", disable=not progress, leave=False)
        for local, i in enumerate(bar):
            _load_layer(stage.layers[local], ckpt, f"model.layers.{i}.", cfg)
        if spec.is_last:
            _copy(stage.norm.weight, ckpt.get("model.norm.weight", cfg.dtype), "model.norm.weight")
            head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            _copy(stage.lm_head, ckpt.get(head, cfg.dtype), head)
    finally:
        ckpt.close()
    return stage.eval()


def _load_layer(layer, ckpt: Checkpoint, prefix: str, cfg: ModelConfig) -> None:
    get = lambda name: ckpt.get(prefix + name, cfg.dtype)
    attn, mlp = layer.self_attn, layer.mlp
    _copy(attn.qkv_proj, torch.cat([get(f"self_attn.{p}_proj.weight") for p in "qkv"]),
          prefix + "self_attn.{q,k,v}_proj.weight")
    if attn.qkv_bias is not None:
        _copy(attn.qkv_bias, torch.cat([get(f"self_attn.{p}_proj.bias") for p in "qkv"]),
              prefix + "self_attn.{q,k,v}_proj.bias")
    _copy(attn.o_proj, get("self_attn.o_proj.weight"), prefix + "self_attn.o_proj.weight")
    _copy(mlp.gate_up_proj, torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]),
          prefix + "mlp.{gate,up}_proj.weight")
    _copy(mlp.down_proj, get("mlp.down_proj.weight"), prefix + "mlp.down_proj.weight")
    _copy(layer.input_layernorm.weight, get("input_layernorm.weight"), prefix + "input_layernorm.weight")
    _copy(layer.post_attention_layernorm.weight, get("post_attention_layernorm.weight"),
          prefix + "post_attention_layernorm.weight")
