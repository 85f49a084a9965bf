"""Random-weight checkpoints: transformers loads them as it would real ones, they
are deterministic, and greedy decoding from them is not degenerate."""
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kevlarflow.model import make_model as make_model_module  # noqa: E402
from kevlarflow.model import safetensors_stream  # noqa: E402
from kevlarflow.model.make_model import make_model  # noqa: E402
from kevlarflow.model.presets import PRESETS, parameter_count, tensor_shapes  # noqa: E402
from kevlarflow.model.tokenizer import BOS, EOS, PAD  # noqa: E402

FLAVOURS = ["llama", "qwen2"]
TEXTS = ["héllo wörld ✓", "The quiet river, 1984!", "  two  spaces\nand a newline", "日本語 🚀"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoints, seed 0, one per flavour."""
    return {flavour: make_model(tmp_path_factory.mktemp(f"tiny-{flavour}"), "tiny", flavour, seed=0).path
            for flavour in FLAVOURS}


def load_model(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_transformers_loads_every_weight(tiny, flavour):
    model, info = load_model(tiny[flavour])
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[flavour]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    written = load_file(tiny[flavour] / "model.safetensors")
    state = model.state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    assert model.num_parameters() == sum(t.numel() for t in written.values())
    if flavour == "qwen2":
        assert "lm_head.weight" not in written
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert "model.layers.0.self_attn.q_proj.bias" in written
    else:
        assert "lm_head.weight" in written
    # Norm gains are near one but not all ones.
    gains = written["model.layers.0.input_layernorm.weight"]
    assert not torch.all(gains == 1) and (gains - 1).abs().max() < 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_config_has_transformers_keys_and_legacy_rope_keys(tiny, flavour, tmp_path):
    ours = json.loads((tiny[flavour] / "config.json").read_text())
    AutoConfig.from_pretrained(tiny[flavour]).save_pretrained(tmp_path)
    resaved = json.loads((tmp_path / "config.json").read_text())
    resaved.pop("transformers_version")
    assert set(resaved) <= set(ours)  # transformers adds nothing ...
    assert {k: ours[k] for k in resaved} == resaved  # ... and changes nothing

    rope = ours["rope_parameters"]
    if flavour == "llama":
        assert rope == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 1024, "rope_theta": 500000.0}
        assert ours["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
        assert ours["rope_theta"] == 500000.0 and ours["rms_norm_eps"] == 1e-5
    else:
        assert rope == {"rope_type": "default", "rope_theta": 1000000.0} and "rope_scaling" not in ours
        assert ours["rope_theta"] == 1000000.0 and ours["rms_norm_eps"] == 1e-6
        assert ours["tie_word_embeddings"] is True
    preset = PRESETS["tiny"]
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["num_attention_heads"],
            ours["num_key_value_heads"], ours["intermediate_size"], ours["max_position_embeddings"]) == \
           (128, 4, 4, 2, 256, 2048)
    assert ours["vocab_size"] % 64 == 0 and ours["vocab_size"] - 64 < preset.tokenizer_vocab_size
    assert ours["vocab_size"] >= len(AutoTokenizer.from_pretrained(tiny[flavour]))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tokenizer_round_trips_and_agrees_with_tokenizers(tiny, flavour):
    tokenizer = AutoTokenizer.from_pretrained(tiny[flavour])
    raw = Tokenizer.from_file(str(tiny[flavour] / "tokenizer.json"))
    config = json.loads((tiny[flavour] / "config.json").read_text())
    assert tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
           (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == raw.encode(text).ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
        assert tokenizer.eos_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert 900 <= len(tokenizer) <= 1100


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = make_model(tmp_path / "again", "tiny", "llama", seed=0)
    for name in again.files:
        assert (again.path / name).read_bytes() == (tiny["llama"] / name).read_bytes(), name

    other = make_model(tmp_path / "other", "tiny", "llama", seed=1)
    first, second = load_file(tiny["llama"] / "model.safetensors"), load_file(other.path / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert not torch.equal(first[name], second[name]), name
    # The tokenizer does not follow the seed.
    assert (other.path / "tokenizer.json").read_bytes() == (tiny["llama"] / "tokenizer.json").read_bytes()


def test_preset_parameter_counts():
    """From the shapes alone. The qwen2 flavour ties lm_head to the embedding;
    the llama flavour adds an untied lm_head (vocab x hidden) on top."""
    for preset, target in (("small", 100e6), ("medium", 500e6)):
        tied = parameter_count(preset, "qwen2")
        assert abs(tied - target) < 0.15 * target, (preset, tied)
        spec = PRESETS[preset]
        qkv_biases = spec.num_layers * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
        assert parameter_count(preset, "llama") == tied - qkv_biases + spec.vocab_size * spec.hidden_size
    assert abs(parameter_count("medium", "llama") - 500e6) < 0.15 * 500e6
    # The paper's model: Llama-3.1-8B's published parameter count, to the unit.
    assert parameter_count("llama-8b", "llama") == 8_030_261_248


def test_the_paper_scale_preset_is_written_in_shards_of_bounded_size():
    """16 GB of weights, written tensor by tensor (never the whole model in
    memory): here only planned, not written."""
    shapes = tensor_shapes(PRESETS["llama-8b"], make_model_module.FLAVOURS["llama"], 128256)
    shards = safetensors_stream.plan_shards(shapes, torch.bfloat16, make_model_module.MAX_SHARD_BYTES)
    sizes = [sum(safetensors_stream.tensor_bytes(s, torch.bfloat16) for s in shard.values())
             for shard in shards]
    assert sum(sizes) == 2 * 8_030_261_248
    # A shard goes over the bound only to hold a tensor larger than it (the embedding).
    largest = max(safetensors_stream.tensor_bytes(s, torch.bfloat16) for s in shapes.values())
    assert max(sizes) <= max(make_model_module.MAX_SHARD_BYTES, largest)


def test_medium_preset_is_sharded_small_is_not():
    def shard_count(preset):
        shapes = tensor_shapes(PRESETS[preset], make_model_module.FLAVOURS["qwen2"], 32000)
        return len(safetensors_stream.plan_shards(shapes, torch.bfloat16, make_model_module.MAX_SHARD_BYTES))
    assert shard_count("small") == 1 and shard_count("medium") >= 2


def test_sharded_checkpoint_loads_like_a_single_file(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(make_model_module, "MAX_SHARD_BYTES", 1 << 20)
    sharded = make_model(tmp_path, "tiny", "llama", seed=0)
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and not (sharded.path / "model.safetensors").exists()
    ids = torch.tensor([[0, 5, 70, 300, 12]])
    with torch.no_grad():
        single_logits = load_model(tiny["llama"])[0](ids).logits
        sharded_logits = load_model(sharded.path)[0](ids).logits
    assert torch.equal(single_logits, sharded_logits)


def test_streamed_safetensors_match_the_safetensors_library(tmp_path):
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.bfloat16)}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    safetensors_stream.write_safetensors(tmp_path / "ours.safetensors", shapes, torch.bfloat16,
                                         lambda name, shape: tensors[name])
    save_file(tensors, tmp_path / "theirs.safetensors")
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_greedy_generation_is_not_one_repeated_token(tiny, flavour):
    model, _ = load_model(tiny[flavour])
    tokenizer = AutoTokenizer.from_pretrained(tiny[flavour])
    for prompt in ("The quiet river", "I think that"):
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[0, inputs.input_ids.shape[1]:].tolist()
        assert len(new_tokens) == 20
        assert len(set(new_tokens)) >= 5, tokenizer.decode(new_tokens)


def test_cli_make_model(tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "kevlarflow", "make-model", "--preset", "tiny", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "on disk" in result.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny["llama"] / name).read_bytes(), name
