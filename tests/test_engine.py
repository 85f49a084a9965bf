"""Engine behaviour on a tiny checkpoint: sampling, stops, timing, bad input,
and the asyncio streaming interface."""
import asyncio
import json
import re
import shutil

import pytest
import torch

from kevlarflow import LLM, AsyncEngine, EngineConfig, SamplingParams
from helpers.models import tiny_model
from kevlarflow.model.config import ModelConfig
from kevlarflow.model.loader import load_stage, stage_bytes
from kevlarflow.model.stage import StageSpec


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("llama"), load_progress=False, block_size=8)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                            ignore_eos=True)
    alone = llm.generate("the quick brown fox", params)[0].token_ids
    others = SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True)
    batched = llm.generate(["one", "the quick brown fox", "two three"],
                           [others, params, others])[1].token_ids
    assert alone == batched
    different = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=99,
                               ignore_eos=True)
    assert llm.generate("the quick brown fox", different)[0].token_ids != alone


def test_stop_strings_are_honoured(llm):
    free = llm.generate("hello world", SamplingParams(max_tokens=30, temperature=0,
                                                      ignore_eos=True))[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = llm.generate("hello world", SamplingParams(max_tokens=30, temperature=0,
                                                     ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]
    assert stop not in cut.text


def test_stop_token_ids_and_max_tokens(llm):
    free = llm.generate("hello", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    target = free.token_ids[4]
    stopped = llm.generate("hello", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[target]))[0]
    assert stopped.finish_reason == "stop"
    cut = free.token_ids.index(target)
    assert stopped.token_ids == free.token_ids[:cut + 1]
    # The stop token's text is not part of the output.
    assert stopped.text == llm.tokenizer.decode(free.token_ids[:cut], skip_special_tokens=True)


def test_timing_and_logprobs(llm):
    out = llm.generate("timing", SamplingParams(max_tokens=5, temperature=0, logprobs=3,
                                                ignore_eos=True))[0]
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finish_time
    assert m.ttft >= 0 and m.latency >= m.ttft
    assert len(out.logprobs) == 5
    for entry, token in zip(out.logprobs, out.token_ids):
        assert entry.token_id == token and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.logprob  # greedy: top-1 is it
        assert entry.top[0][0] == token


@pytest.mark.parametrize("prompt,params,message", [
    ("", None, "prompt is empty"),
    ([[]], None, "non-empty"),
    ([1, 2, 10**6], None, "token ids must be ints"),
    ("x " * 3000, None, "maximum is"),
    ("ok", "greedy", "params must be SamplingParams"),
])
def test_bad_requests_raise_value_error(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, params)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0),
                                         ("top_p", 0.0), ("min_p", 2.0), ("top_k", -5)])
def test_bad_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


def test_unknown_architecture_and_missing_tensor(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(path), load_progress=False)
    config["architectures"] = ["LlamaForCausalLM"]
    config["num_hidden_layers"] = 5  # the checkpoint has 4
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.4"):
        LLM(str(path), load_progress=False)


def test_bad_engine_arguments():
    with pytest.raises(ValueError, match="unknown engine arguments"):
        LLM(tiny_model("llama"), block_sise=16)
    with pytest.raises(ValueError, match="block_size"):
        LLM(tiny_model("llama"), block_size=0)
    with pytest.raises(ValueError, match="holds no block"):
        LLM(tiny_model("llama"), kv_cache_memory=100, load_progress=False)
    for device in ("gpu", "cuda:", "cuda:x", "cpu:0", 0):
        with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:K'"):
            LLM(tiny_model("llama"), device=device)


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_a_cuda_device_without_a_cuda_torch_says_so():
    for device in ("cuda", "cuda:1"):
        message = f"device='{device}' needs a CUDA build of torch; this one ({torch.__version__}) " \
            "has no CUDA"
        with pytest.raises(ValueError, match=re.escape(message)):
            LLM(tiny_model("llama"), device=device)


def test_a_stage_is_sized_before_it_is_loaded():
    """What the GPU must hold, from a stage built on the meta device: the
    loaded stage's weights and RoPE tables, to the byte."""
    cfg = ModelConfig.from_pretrained(tiny_model("llama"))
    for spec in (None, StageSpec.split(cfg.num_layers, 2, 0), StageSpec.split(cfg.num_layers, 2, 1)):
        stage = load_stage(tiny_model("llama"), spec, cfg, progress=False, max_positions=100)
        rope = stage.layers[0].self_attn.rope
        loaded = sum(p.numel() * p.element_size() for p in stage.parameters()) + \
            rope.cos.nbytes + rope.sin.nbytes
        assert stage_bytes(cfg, 100, spec) == loaded


def test_async_streaming_deltas_add_up_and_cancel_aborts():
    engine = AsyncEngine(tiny_model("llama"), EngineConfig(load_progress=False, block_size=8))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    async def collect(prompt):
        text, tokens, last = "", [], None
        async for out in engine.generate(prompt, params):
            text += out.new_text
            tokens += out.new_token_ids
            last = out
        assert last.finished and text == last.text and tokens == last.token_ids
        return last

    async def cancel_early():
        stream = engine.generate("cancel me", SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()

    async def main():
        results = await asyncio.gather(collect("one"), collect("two words"), cancel_early())
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in engine.generate("", params):
                pass
        return results

    try:
        first, second, _ = asyncio.run(main())
        offline = LLM(tiny_model("llama"), load_progress=False, block_size=8)
        assert first.token_ids == offline.generate("one", params)[0].token_ids
        # The cancelled request left nothing behind.
        for _ in range(100):
            if not engine.engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.02))
        assert not engine.engine.has_unfinished()
    finally:
        engine.shutdown()
