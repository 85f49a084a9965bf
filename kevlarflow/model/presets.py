"""Sizes (presets) and architectures (flavours) of the random-weight test models,
and what follows from them without writing anything: the Hugging Face
config.json and the tensor names, shapes and parameter count."""
from __future__ import annotations

from dataclasses import dataclass

from kevlarflow.model.config import DTYPES


@dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tokenizer_vocab_size: int  # what the BPE tokenizer is trained to
    vocab_size: int | None  # rows of the embedding; None: tokenizer size rounded up to 64
    default_dtype: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Flavour:
    name: str
    architecture: str
    model_type: str
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    pre_tokenization: str  # see kevlarflow.model.tokenizer
    tokenizer_class: str  # what tokenizer_config.json names


PRESETS = {
    p.name: p for p in (
        # For fast tests; head_dim 32.
        Preset("tiny", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
               intermediate_size=256, max_position_embeddings=2048,
               tokenizer_vocab_size=1000, vocab_size=None, default_dtype="float32"),
        # ~100M parameters (qwen2; llama's untied lm_head adds 25M); head_dim 64.
        Preset("small", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
               intermediate_size=2048, max_position_embeddings=4096,
               tokenizer_vocab_size=8000, vocab_size=32000, default_dtype="bfloat16"),
        # ~500M parameters, ~1 GB in bfloat16: sharded; head_dim 64.
        Preset("medium", hidden_size=1280, num_layers=24, num_heads=20, num_kv_heads=4,
               intermediate_size=3584, max_position_embeddings=4096,
               tokenizer_vocab_size=8000, vocab_size=32000, default_dtype="bfloat16"),
        # Llama-3.1-8B's shapes (8.03B parameters, 16 GB in bfloat16), for GPU
        # runs at the paper's scale; its small tokenizer pads the 128256 rows.
        Preset("llama-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               intermediate_size=14336, max_position_embeddings=8192,
               tokenizer_vocab_size=8000, vocab_size=128256, default_dtype="bfloat16"),
    )
}

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024,
}

FLAVOURS = {
    f.name: f for f in (
        Flavour("llama", "LlamaForCausalLM", "llama", 500000.0, LLAMA3_ROPE_SCALING, 1e-5,
                qkv_bias=False, tie_word_embeddings=False,
                pre_tokenization="byte_level", tokenizer_class="PreTrainedTokenizerFast"),
        Flavour("qwen2", "Qwen2ForCausalLM", "qwen2", 1000000.0, None, 1e-6,
                qkv_bias=True, tie_word_embeddings=True,
                pre_tokenization="qwen2", tokenizer_class="Qwen2Tokenizer"),
    )
}

VOCAB_MULTIPLE = 64
DTYPE_NAMES = tuple(DTYPES)


def model_vocab_size(preset: Preset, tokenizer_size: int | None = None) -> int:
    """Embedding rows; rows past the tokenizer's ids are padding."""
    if preset.vocab_size is not None:
        return preset.vocab_size
    size = tokenizer_size if tokenizer_size is not None else preset.tokenizer_vocab_size
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def rope_keys(flavour: Flavour) -> dict:
    """RoPE settings under both spellings. transformers 5 writes one
    `rope_parameters` dict (rope_theta inside); transformers 4 and most other
    loaders read top-level `rope_theta` and `rope_scaling`. Both are written,
    with the same values: transformers 5 reads either (`rope_scaling` first)."""
    scaling = dict(flavour.rope_scaling) if flavour.rope_scaling else None
    keys = {
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": flavour.rope_theta},
        "rope_theta": flavour.rope_theta,
    }
    if scaling:
        keys["rope_scaling"] = scaling
    return keys


def hf_config(preset: Preset, flavour: Flavour, vocab_size: int, *, bos_token_id: int,
              eos_token_id: int, pad_token_id: int, dtype: str) -> dict:
    """config.json: the keys transformers 5.24's save_pretrained writes for this
    architecture, plus the legacy RoPE keys (see rope_keys)."""
    config = {
        "architectures": [flavour.architecture],
        "model_type": flavour.model_type,
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": flavour.rms_norm_eps,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "tie_word_embeddings": flavour.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,  # the transformers 4 name of `dtype`
        **rope_keys(flavour),
    }
    if flavour.model_type == "llama":
        config.update(head_dim=preset.head_dim, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif flavour.model_type == "qwen2":
        # Qwen2 has q/k/v biases unconditionally; sliding windows stay off.
        config.update(use_sliding_window=False, sliding_window=None,
                      max_window_layers=preset.num_layers,
                      layer_types=["full_attention"] * preset.num_layers)
    return config


def tensor_shapes(preset: Preset, flavour: Flavour, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes, in the order they are written."""
    hidden, kv_width = preset.hidden_size, preset.num_kv_heads * preset.head_dim
    q_width = preset.num_heads * preset.head_dim
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden)}
    for i in range(preset.num_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        for proj, width in (("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (width, hidden)
            if flavour.qkv_bias:
                shapes[f"{layer}.self_attn.{proj}.bias"] = (width,)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (hidden, q_width)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (preset.intermediate_size, hidden)
        shapes[f"{layer}.mlp.up_proj.weight"] = (preset.intermediate_size, hidden)
        shapes[f"{layer}.mlp.down_proj.weight"] = (hidden, preset.intermediate_size)
    shapes["model.norm.weight"] = (hidden,)
    if not flavour.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, hidden)
    return shapes


def parameter_count(preset: Preset | str, flavour: Flavour | str = "llama",
                    vocab_size: int | None = None) -> int:
    """Parameters of a preset, from its shapes alone (nothing is built)."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    vocab_size = vocab_size or model_vocab_size(preset)
    total = 0
    for shape in tensor_shapes(preset, flavour, vocab_size).values():
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total
