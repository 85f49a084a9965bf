"""Greedy outputs are token-identical to transformers' generate (fp32 tiny
checkpoints), whatever the batching, block size, prefill chunking or
preemption the engine goes through."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kevlarflow import LLM, SamplingParams
from helpers.models import PROMPTS, tiny_model

NEW_TOKENS = 20


def transformers_greedy(path, prompts) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
            expected.append(out[0, ids.shape[1]:].tolist())
    return expected


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def reference(request):
    """(model path, expected greedy continuations) from transformers."""
    path = tiny_model(request.param)
    return path, transformers_greedy(path, PROMPTS)


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
    if engine_args.get("enable_prefix_caching"):
        # Each prompt a second time below, from the blocks the first cached.
        llm.generate(PROMPTS, GREEDY)
    outputs = llm.generate(PROMPTS, GREEDY)
    for out, want in zip(outputs, expected):
        assert out.token_ids == want, f"prompt {out.prompt!r}"
        assert out.finish_reason == "length"
    if "kv_cache_memory" in engine_args:
        assert any(o.metrics.num_preemptions for o in outputs), "the tiny pool never preempted"
    full = sum(len(o.prompt_token_ids) + NEW_TOKENS - 1 for o in outputs)
    ran = sum(o.metrics.tokens_run for o in outputs)
    if engine_args.get("enable_prefix_caching"):
        assert ran < full, "no prompt was served from the prefix cache"
    elif "kv_cache_memory" in engine_args:
        assert ran > full  # a preempted request computes its KV again
    else:
        assert ran == full


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_matches_one_prompt_at_a_time(reference, batch_size):
    path, expected = reference
    llm = LLM(path, load_progress=False, block_size=16)
    for start in range(0, len(PROMPTS), batch_size):
        outputs = llm.generate(PROMPTS[start:start + batch_size], GREEDY)
        assert [o.token_ids for o in outputs] == expected[start:start + batch_size]


def test_prefix_cache_reuses_blocks_and_keeps_outputs(reference):
    """A prompt that starts with full blocks an earlier request computed runs
    only the rest of it (the last prompt token always runs: its logits are
    needed), and generates what it generates without the cache."""
    path, expected = reference
    bs = 8
    llm = LLM(path, load_progress=False, block_size=bs, enable_prefix_caching=True)
    shared = PROMPTS[2]
    first = llm.generate(shared, GREEDY)[0]
    n = len(first.prompt_token_ids)
    assert first.metrics.tokens_run == n + NEW_TOKENS - 1  # nothing cached yet
    again = llm.generate(shared, GREEDY)[0]
    reused = (n - 1) // bs * bs
    assert reused >= 2 * bs
    assert again.metrics.tokens_run == n + NEW_TOKENS - 1 - reused
    assert first.token_ids == again.token_ids == expected[2]
    # Another prompt with the same start reuses the full blocks they share.
    longer = shared + " and then a different ending"
    out = llm.generate(longer, GREEDY)[0]
    ids = out.prompt_token_ids
    common = next(i for i, (a, b) in enumerate(zip(ids, first.prompt_token_ids + [-1])) if a != b)
    reused = min(common, len(ids) - 1) // bs * bs
    assert reused >= bs
    assert out.metrics.tokens_run == len(ids) + NEW_TOKENS - 1 - reused
    assert out.token_ids == transformers_greedy(path, [longer])[0]


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
