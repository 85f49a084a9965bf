"""Greedy outputs are token-identical to transformers' generate (fp32 tiny
checkpoints), whatever the batching, block size, prefill chunking or
preemption the engine goes through."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kevlarflow import LLM, SamplingParams
from helpers.models import PROMPTS, tiny_model

NEW_TOKENS = 20


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request):
    """(model path, expected greedy continuations) from transformers."""
    path = tiny_model(request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
            expected.append(out[0, ids.shape[1]:].tolist())
    return path, expected


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("engine_args", [
    dict(block_size=16),
    dict(block_size=8, max_num_batched_tokens=7),      # prompts split into many chunks
    dict(block_size=32, max_num_batched_tokens=40, max_num_seqs=2),
    # 10 blocks of 8 tokens (tiny: 2 KiB of KV per token): the longest request
    # fits alone, all of them together do not, so the scheduler must preempt.
    dict(block_size=8, kv_cache_memory=10 * 8 * 2048),
    dict(block_size=16, enable_prefix_caching=True),
], ids=["plain", "chunked", "few-seqs", "preemption", "prefix-cache"])
def test_greedy_matches_transformers(reference, engine_args):
    path, expected = reference
    llm = LLM(path, load_progress=False, **engine_args)
    outputs = llm.generate(PROMPTS, GREEDY)
    for out, want in zip(outputs, expected):
        assert out.token_ids == want, f"prompt {out.prompt!r}"
        assert out.finish_reason == "length"
    if "kv_cache_memory" in engine_args:
        assert any(o.metrics.num_preemptions for o in outputs), "the tiny pool never preempted"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_matches_one_prompt_at_a_time(reference, batch_size):
    path, expected = reference
    llm = LLM(path, load_progress=False, block_size=16)
    for start in range(0, len(PROMPTS), batch_size):
        outputs = llm.generate(PROMPTS[start:start + batch_size], GREEDY)
        assert [o.token_ids for o in outputs] == expected[start:start + batch_size]


def test_prefix_cache_reuses_blocks_and_keeps_outputs(reference):
    path, expected = reference
    llm = LLM(path, load_progress=False, block_size=8, enable_prefix_caching=True)
    shared = PROMPTS[2]
    first = llm.generate(shared, GREEDY)[0]
    blocks = llm.engine.blocks
    assert blocks.cached, "no full block was published to the prefix cache"
    second = llm.generate(shared, GREEDY)[0]
    assert first.token_ids == second.token_ids == expected[2]


def test_mistral_sliding_window_matches_transformers(tmp_path):
    """A Mistral checkpoint (the tiny llama weights under a Mistral config with
    a window shorter than the sequences) generates what transformers does."""
    import json
    import shutil

    path = tmp_path / "mistral"
    shutil.copytree(tiny_model("llama"), path)
    config = json.loads((path / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        config.pop(key, None)
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=12,
                  rope_theta=10000.0)
    (path / "config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    assert model.config.sliding_window == 12
    llm = LLM(str(path), load_progress=False, block_size=8, max_num_batched_tokens=10)
    outputs = llm.generate(PROMPTS, GREEDY)
    with torch.inference_mode():
        for prompt, out in zip(PROMPTS, outputs):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            want = model.generate(ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            assert out.token_ids == want, f"prompt {prompt!r}"
