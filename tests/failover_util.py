"""Helpers of the failover tests: a seeded workload and loops that step a
deployment until something happens, each with a deadline."""
import random
import time

from kevlarflow import SamplingParams

ARGS = dict(max_num_batched_tokens=32, block_size=4, kv_cache_memory=1 << 20,
            hang_timeout_s=1.0)


def workload(n=10, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(16, 1000) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(16, 40), temperature=0, ignore_eos=True)
              for _ in range(n)]
    return prompts, params


def run_until_done(engine, outputs, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not engine.has_unfinished():
            return
        for out in engine.step():
            assert out.request_id not in outputs or not outputs[out.request_id].finished
            outputs.setdefault(out.request_id, out)
            streamed = outputs[out.request_id]
            if out is not streamed:  # check the stream: no token missing, none twice
                assert out.token_ids[:-len(out.new_token_ids) or None] == streamed.token_ids
                outputs[out.request_id] = out
    raise AssertionError("requests did not finish")


def wait(engine, predicate, what, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        engine.step()
