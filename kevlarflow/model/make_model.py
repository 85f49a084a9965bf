"""Seeded random-weight Hugging Face checkpoints for tests and demos.

make_model(path, preset, flavour, seed) writes a folder that
transformers.AutoModelForCausalLM / AutoTokenizer load as they would a real
Llama 3 or Qwen2 checkpoint: config.json, generation_config.json, the weights
(model.safetensors, or shards and model.safetensors.index.json), and a trained
byte-level BPE tokenizer. The same arguments give the same bytes in every file.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kevlarflow.model import safetensors_stream as st
from kevlarflow.model.config import DTYPES
from kevlarflow.model.presets import (FLAVOURS, PRESETS, hf_config, model_vocab_size,
                                     parameter_count, tensor_shapes)
from kevlarflow.model.tokenizer import BOS, EOS, PAD, special_tokens_map, tokenizer_config, train_tokenizer


# Shards of at most 512 MiB: the ~1 GB medium preset (either flavour, in
# bfloat16) is then sharded, so sharded loading gets exercised, while tiny and
# small stay single files.
MAX_SHARD_BYTES = 512 * 2**20

# Initialisation, tuned so that greedy decoding does not lock onto one token.
# A uniform std of 0.02 does: the layers' updates are too small next to the
# token's own embedding (a tied lm_head then maps every token to itself), and
# q.k is too small for attention to be more than a flat average. So:
#  - matrices get std 1/sqrt(fan_in) (0.017 to 0.09 across the presets), which
#    makes each layer's update of order one whatever the width,
#  - q_proj and k_proj twice that, so attention scores spread over a few units
#    and attention picks tokens out,
#  - the embedding stays at 0.02, well under the layers' updates.
EMBED_STD = 0.02
QK_GAIN = 2.0
BIAS_STD = 0.02
NORM_NOISE = 0.1  # RMSNorm gains 1 + 0.1 * N(0, 1): near one, not all ones


@dataclass
class WrittenModel:
    path: Path
    files: list[str]
    parameters: int
    bytes_on_disk: int
    seconds: float


def _generator(seed: int, tensor_name: str) -> torch.Generator:
    """One generator per tensor, seeded from (seed, name): each tensor is then
    independent of the order (and number) of the tensors made before it."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, tokenizer_size: int) -> torch.Tensor:
    """The float32 value of one weight, made from (seed, name) alone (scaled
    in place: the embedding of the medium preset alone is 164 MB)."""
    weight = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return weight.mul_(NORM_NOISE).add_(1.0)
    if name.endswith(".bias"):
        return weight.mul_(BIAS_STD)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        hidden = shape[1]
        weight.mul_(EMBED_STD if name.startswith("model.") else hidden ** -0.5)
        # Rows past the tokenizer are padding, as in real checkpoints with a
        # rounded-up vocabulary: zero rows give logit 0, below the random real
        # logits' maximum, so they are never the greedy choice.
        weight[tokenizer_size:] = 0.0
        return weight
    fan_in = shape[1]
    gain = QK_GAIN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
    return weight.mul_(gain * fan_in ** -0.5)


def _dumps(obj: dict) -> str:
    """Every JSON file: sorted keys and a trailing newline, for stable bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _remove_old_weights(path: Path) -> None:
    """A stale model.safetensors next to new shards (or the reverse) would be
    loaded instead of them."""
    for old in [*path.glob("model*.safetensors"), path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)


def make_model(path, preset: str = "tiny", flavour: str = "llama", seed: int = 0,
               dtype: str | None = None) -> WrittenModel:
    """Writes a random-weight checkpoint to `path` (created if needed).
    dtype: "float32", "bfloat16" or "float16"; None: the preset's default."""
    start = time.perf_counter()
    preset_spec, flavour_spec = PRESETS[preset], FLAVOURS[flavour]
    dtype = dtype or preset_spec.default_dtype
    torch_dtype = DTYPES[dtype]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(preset_spec.tokenizer_vocab_size, flavour_spec.pre_tokenization)
    tokenizer_size = tokenizer.get_vocab_size()
    vocab_size = model_vocab_size(preset_spec, tokenizer_size)
    token_ids = {name: tokenizer.token_to_id(tok) for name, tok in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = hf_config(preset_spec, flavour_spec, vocab_size, bos_token_id=token_ids["bos"],
                       eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"], dtype=dtype)
    generation_config = {f"{name}_token_id": token_id for name, token_id in token_ids.items()}

    texts = {
        "config.json": _dumps(config),
        "generation_config.json": _dumps(generation_config),
        "tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": _dumps(tokenizer_config(tokenizer, flavour_spec.tokenizer_class,
                                                           preset_spec.max_position_embeddings)),
        "special_tokens_map.json": _dumps(special_tokens_map()),
    }
    for name, text in texts.items():
        (path / name).write_text(text, encoding="utf-8")

    shapes = tensor_shapes(preset_spec, flavour_spec, vocab_size)
    shards = st.plan_shards(shapes, torch_dtype, MAX_SHARD_BYTES)
    weight_files = st.shard_file_names(len(shards))
    _remove_old_weights(path)

    def make_tensor(name, shape):
        return random_tensor(name, shape, seed, tokenizer_size)

    for shard, file_name in zip(shards, weight_files):
        st.write_safetensors(path / file_name, shard, torch_dtype, make_tensor)
    if len(shards) > 1:
        index = st.shard_index(shards, weight_files, torch_dtype)
        (path / "model.safetensors.index.json").write_text(_dumps(index), encoding="utf-8")
        weight_files.append("model.safetensors.index.json")

    files = sorted([*texts, *weight_files])
    return WrittenModel(
        path=path,
        files=files,
        parameters=parameter_count(preset_spec, flavour_spec, vocab_size),
        bytes_on_disk=sum((path / name).stat().st_size for name in files),
        seconds=time.perf_counter() - start,
    )
