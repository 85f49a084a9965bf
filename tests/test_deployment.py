"""Deployments of real worker processes on loopback: pipeline outputs equal
the single-process engine's, instances share the load, nothing is orphaned."""
import os

import psutil
import pytest

from kevlarflow import LLM, SamplingParams
from models import tiny_model

PROMPTS = [
    "the quick brown fox",
    "a",
    "hello world, this is a longer prompt with several words in it and then some more",
    "numbers 1 2 3 4 5 6 7 8 9 10 11 12",
    "héllo wörld ✓",
    "one more prompt that is long enough to be split into several prefill chunks " * 3,
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
# Small chunks and pools: prefills span several micro-batches, decode batches mix.
ENGINE_ARGS = dict(max_num_batched_tokens=32, block_size=4, kv_cache_memory=1 << 20)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def expected():
    with LLM(tiny_model(), **ENGINE_ARGS) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("num_instances,pp_size", [(2, 1), (1, 2), (1, 4), (2, 2)])
def test_greedy_outputs_match_one_process(expected, num_instances, pp_size):
    before = _children()
    with LLM(tiny_model(), num_instances=num_instances, pp_size=pp_size, **ENGINE_ARGS) as llm:
        workers = _children() - before
        assert len(workers) == num_instances * pp_size
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert all(o.finish_reason == "length" for o in outs)
        if num_instances > 1:
            # Concurrent requests spread over both instances.
            served = {llm.engine.instances[i].steps_dispatched > 0 for i in range(num_instances)}
            assert served == {True}
    # Every worker is reaped when the deployment shuts down.
    assert not (workers & _children())
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers)
