"""Model configuration read from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Weight and activation dtypes, by the names config.json and the CLI use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: dict | None = None
    # Per layer: 0 for full attention, else the window length.
    sliding_windows: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not a model folder: config.json is missing")
        return cls.from_dict(json.loads(config_file.read_text()), source=str(config_file))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"{source}: unsupported architecture {architectures or '(none)'}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key):
            if key not in raw or raw[key] is None:
                raise ValueError(f"{source}: required key {key!r} is missing")
            return raw[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        layers = int(need("num_hidden_layers"))
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: unsupported rope_type {rope_type!r} "
                             "(supported: default, llama3)")
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in DTYPES:
            raise ValueError(f"{source}: unsupported dtype {dtype_name!r}")
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(need("max_position_embeddings")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama declares it.
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            rope_scaling=rope if rope_type == "llama3" else None,
            sliding_windows=_sliding_windows(raw, arch, layers),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=DTYPES[dtype_name],
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


def _sliding_windows(raw: dict, arch: str, layers: int) -> list[int]:
    window = raw.get("sliding_window") or 0
    if arch == "MistralForCausalLM":
        return [int(window)] * layers
    if arch == "Qwen2ForCausalLM" and raw.get("use_sliding_window") and window:
        types = raw.get("layer_types")
        if types:
            return [int(window) if t == "sliding_attention" else 0 for t in types]
        first_full = int(raw.get("max_window_layers", layers))
        return [int(window) if i >= first_full else 0 for i in range(layers)]
    return [0] * layers
