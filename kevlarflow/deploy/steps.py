"""A worker's steps: the micro-batches the controller sends, run on its stage.

Each step message is checked (a well-formed message that cannot run here is
a BadStep, answered with an error, never executed), then its inputs are
gathered: token ids on the first stage, hidden states from the previous
stage otherwise. The steps in hand (a borrowed worker may hold one of each
of its two pipelines) go through the model runner in one forward pass; then
the first stages send their hidden states on, and the last samples and
answers with the tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kevlarflow.comm.groups import WorkerGroups
from kevlarflow.comm.manager import CommError
from kevlarflow.deploy.hidden_states import HiddenStates
from kevlarflow.engine.model_runner import ModelRunner, sample_rows
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sampler import Sampler
from kevlarflow.model.stage import StageSpec


class BadStep(ValueError):
    """A step message that is well-formed but cannot be executed here."""


@dataclass
class _Prepared:
    """A step whose inputs are in hand, ready for the forward pass."""
    message: dict
    members: list[str]
    me: int                     # this worker's index in members
    chunks: list[tuple[int, int, list[int]]]
    num_tokens: int
    inputs: torch.Tensor        # token ids (first stage) or hidden states

    @property
    def sampled(self) -> list[dict]:
        return [s for s in self.message["sample"] if s is not None]


class StageSteps:
    def __init__(self, name: str, spec: StageSpec, runner: ModelRunner, groups: WorkerGroups,
                 hidden: HiddenStates, max_model_len: int,
                 reply: Callable[..., None], report: Callable[[int, Exception], None]):
        self.name, self.spec, self.runner = name, spec, runner
        self.groups, self.hidden = groups, hidden
        self.max_model_len = max_model_len
        self.reply = reply      # reply(step=, tokens=, logprobs=): the last stage's answer
        self.report = report    # report(step, error)
        self.sampler = Sampler()

    def run(self, messages: list[dict], written: Callable[[list[dict]], None]) -> None:
        """Run the step messages in one forward pass; written(messages) once
        their KV is in the caches."""
        prepared = []
        for m in messages:
            try:
                p = self._prepare(m)
            except (BadStep, CommError) as error:
                self._failed(m, error)
                continue
            if p is not None:
                prepared.append(p)
        if not prepared:
            return
        # One forward pass over the micro-batches of both pipelines: decode is
        # bound by reading the weights, so the larger batch costs little more.
        chunks = [c for p in prepared for c in p.chunks]
        rows = None
        if self.spec.is_last:
            # On the host, like the token ids: the runner's decode graphs
            # copy them without a synchronisation.
            rows = sample_rows([n for n, _, _ in chunks],
                               [s is not None for p in prepared for s in p.message["sample"]])
        out = self.runner.forward(torch.cat([p.inputs for p in prepared]), chunks, rows)
        written([p.message for p in prepared])
        start = 0
        for p in prepared:
            size = len(p.sampled) if self.spec.is_last else p.num_tokens
            try:
                self._finish(p, out[start:start + size])
            except CommError as error:
                self._failed(p.message, error)
            start += size

    def _failed(self, m: dict, error: Exception) -> None:
        """A step that failed is reported, unless its group was rebuilt on
        another thread meanwhile (its op then refused to run on the new
        generation): nobody waits for such a step."""
        if isinstance(error, CommError) and m["generation"] != self.groups.generation(m["group"]):
            return
        self.report(m["step"], error)

    def _prepare(self, m: dict) -> _Prepared | None:
        """Check a step and gather its inputs; None for a stale step."""
        if not self.groups.known(m["group"]):
            raise BadStep(f"not a member of group {m['group']!r}")
        members = self.groups.members(m["group"])
        if members is None or m["generation"] != self.groups.generation(m["group"]):
            return None  # sent before the group was aborted or rebuilt: nobody waits for it
        chunks = self._check_chunks(m["seqs"])
        num_tokens = sum(n for n, _, _ in chunks)
        me = members.index(self.name)
        if self.spec.is_last and (m["sample"] is None or len(m["sample"]) != len(chunks)):
            raise BadStep("the last stage needs one sample entry per sequence")
        if self.spec.is_first:
            ids = m["token_ids"]
            vocab = self.runner.stage.cfg.vocab_size
            if ids is None or len(ids) != num_tokens or not all(0 <= t < vocab for t in ids):
                raise BadStep(f"the first stage needs {num_tokens} token ids in [0, vocab)")
            inputs = torch.tensor(ids, dtype=torch.int64)
        else:
            inputs = self.hidden.recv(m["group"], m["generation"], members[me - 1], num_tokens)
        return _Prepared(m, members, me, chunks, num_tokens, inputs)

    def _check_chunks(self, seqs: list) -> list[tuple[int, int, list[int]]]:
        if not seqs:
            raise BadStep("a step needs at least one sequence")
        block_size, num_blocks = self.runner.block_size, self.runner.num_blocks
        for n, start, table in seqs:
            if n < 1 or start < 0 or start + n > len(table) * block_size:
                raise BadStep(f"chunk of {n} tokens at {start} does not fit its "
                              f"{len(table)} blocks")
            if start + n > self.max_model_len:
                raise BadStep(f"positions up to {start + n} exceed max_model_len {self.max_model_len}")
            if not all(0 <= b < num_blocks for b in table):
                raise BadStep(f"block ids must be in [0, {num_blocks})")
        return [(n, start, table) for n, start, table in seqs]

    def _finish(self, p: _Prepared, out: torch.Tensor) -> None:
        if not self.spec.is_last:
            self.hidden.send(p.message["step"], p.message["group"], p.message["generation"],
                             p.members[p.me + 1], out)
            return
        rows = p.sampled
        params = [SamplingParams(temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"],
                                 min_p=r["min_p"], seed=r["seed"], logprobs=r["logprobs"])
                  for r in rows]
        sampled = self.sampler.sample_requests(out, params, [r["index"] for r in rows])
        logprobs = [None if lp is None else [lp, [list(pair) for pair in top]]
                    for lp, top in zip(sampled.logprobs, sampled.top_logprobs)]
        self.reply(step=p.message["step"], tokens=sampled.token_ids, logprobs=logprobs)
