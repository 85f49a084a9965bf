"""Helpers of the failover tests: a seeded workload, and Streams, which steps
a deployment until something happens (each wait with a deadline) while it
checks every output it sees."""
import random
import time

import psutil

from helpers.models import tiny_model
from kevlarflow import LLM, SamplingParams

ARGS = dict(max_num_batched_tokens=32, block_size=4, kv_cache_memory=1 << 20,
            hang_timeout_s=1.0)


def workload(n=10, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(16, 1000) for _ in range(rng.randrange(3, 40))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randrange(16, 40), temperature=0, ignore_eos=True)
              for _ in range(n)]
    return prompts, params


class Streams:
    """Every output of a deployment's requests, collected and checked while
    the test steps it: each delta extends the request's tokens by exactly
    its new tokens (none missing, none twice), and nothing follows the end."""

    def __init__(self, engine):
        self.engine = engine
        self.outputs = {}

    def add(self, prompts, params) -> list:
        return [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]

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

    def output(self, seq):
        return self.outputs[seq.request_id]


def recomputed(seq) -> int:
    """Tokens the model ran for seq beyond a failure-free run's (its prompt
    and its outputs but the last, once each), as its steps' results counted
    them: the KV it computed again after a failure or a preemption."""
    return seq.tokens_run - (len(seq.prompt_token_ids) + len(seq.output_token_ids) - 1)


def timeline(engine) -> str:
    """The deployment's recovery events, one a line: what an assertion about
    a failover shows, so that a failure says what recovery did."""
    start = engine.events.events[0].time if engine.events.events else 0.0
    return "\n".join(f"{e.time - start:8.3f} {e.kind} {e.worker or ''} {e.instance} {e.detail}"
                     for e in list(engine.events.events))


def all_home(engine) -> bool:
    """Every instance serves, on its own workers."""
    return all(i.serving and i.workers == i.home for i in engine.instances)


def serve_with_fault(stage, kind, recovery="kevlarflow", victim_instance=0, **engine_args):
    """The workload on 2 x 2 workers (engine_args, default ARGS), a fault of
    `kind` at (victim_instance, stage) once its requests generate, then the
    rejoin and four requests more. Checks that every process is reaped and
    that the recomputed tokens recovery reports are those the workers ran
    again; returns (outputs, the four more, events, the stats at the end of
    the workload)."""
    prompts, params = workload()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with LLM(tiny_model(), num_instances=2, pp_size=2, recovery=recovery,
             **(engine_args or ARGS)) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = streams.add(prompts, params)
        victims = [s for s in seqs if engine.owner[s].index == victim_instance]
        # Fail once the victim instance's requests are generating.
        streams.until(lambda: any(len(s.output_token_ids) >= 3 for s in victims), "tokens")
        engine.inject_fault(victim_instance, stage, kind)
        streams.finish()
        events = list(engine.events.events)
        stats = engine.status().stats
        # Wait for the replacement to join, so that what it does is tested too.
        streams.until(lambda: engine.events.of("rejoined") and all_home(engine), "the rejoin")
        # The deployment serves on, with every instance back on its own workers.
        again = llm.generate(prompts[:4], params[:4])
    # Failed workers, hung ones included, and replacements: all reaped.
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    outs = [streams.output(s) for s in seqs]
    # What recovery says it recomputed is what the workers ran again (the
    # baseline's restart counts as a preemption of its requests; nothing else
    # preempts here).
    if recovery == "kevlarflow":
        assert not any(o.metrics.num_preemptions for o in outs)
    assert stats["tokens_recomputed"] == sum(o.metrics.tokens_run - (len(o.prompt_token_ids) + len(o.token_ids) - 1)
                             for o in outs)
    return outs, again, events, stats
