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


class Streams:
    """Every output of a deployment's requests, collected and checked while
    the test steps it: each delta extends the request's tokens by exactly
    its new tokens (none missing, none twice), and nothing follows the end."""

    def __init__(self, engine):
        self.engine = engine
        self.outputs = {}

    def step(self) -> None:
        for out in self.engine.step():
            last = self.outputs.get(out.request_id)
            assert last is None or not last.finished, f"{out.request_id}: output after its end"
            before = last.token_ids if last is not None else []
            assert out.token_ids == before + out.new_token_ids, \
                f"{out.request_id}: stream broken at token {len(before)}"
            self.outputs[out.request_id] = out

    def until(self, predicate, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.step()

    def finish(self, timeout_s: float = 120) -> None:
        self.until(lambda: not self.engine.has_unfinished(), "the requests to finish", timeout_s)

    def tokens(self, seqs) -> list[list[int]]:
        return [self.outputs[s.request_id].token_ids for s in seqs]
