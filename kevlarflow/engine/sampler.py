"""Choose the next token of every row of a batch of logits.

Each row carries its own SamplingParams. Greedy rows take the argmax. Sampled
rows go through temperature, top-k, top-p and min-p, then an exponential race
(argmax of probs / Exp(1) noise), which picks token i with probability p_i and
can never pick a filtered (zero-probability) token.

Seeded requests: for the n-th output token of a request the engine passes
`request_generator(params, n)`, a generator seeded from (seed, n) alone; the
sampler draws that row's noise from it, on that row alone. So a seeded token
depends on nothing but the logits, the seed and its index: not on the rest of
the batch, the row's position in it, or which process sampled the tokens
before it (a request that moves to another worker after a failure carries no
generator state).
Unseeded rows share the sampler's generator (torch's default one if None).

Logprobs are "raw": log_softmax of the logits as the model gave them, before
temperature and filtering (vLLM's default), so they measure the model, not
the sampling settings, and greedy and sampled requests report the same numbers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from kevlarflow.engine.params import SamplingParams


@dataclass
class SampleOutput:
    token_ids: list[int]
    # The sampled token's raw logprob; None where params.logprobs is None.
    logprobs: list[float | None]
    # The params.logprobs best (token id, logprob) pairs, best first; [] for
    # logprobs=0, None where params.logprobs is None.
    top_logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with seed, or None for None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def request_generator(params: SamplingParams, token_index: int,
                      device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator for output token `token_index` of a request: None for
    unseeded or greedy requests, else one seeded from (seed, token_index)."""
    if params.seed is None or params.greedy:
        return None
    key = params.seed.to_bytes(9, "little", signed=True) + token_index.to_bytes(8, "little")
    mixed = hashlib.blake2b(key, digest_size=8).digest()
    return make_generator(int.from_bytes(mixed, "little") >> 1, device)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Probabilities [m, vocab] after temperature, top-k, top-p and min-p, in
    that order; dropped tokens get exactly 0, the best token is always kept.
    The per-row settings are 1-D tensors of length m; top_k <= 0 is off."""
    vocab = logits.shape[-1]
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    # A stable sort breaks ties by the lower token id, so the filters are deterministic.
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device)

    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    keep = rank[None, :] < k[:, None]

    # Top-p works on the distribution top-k left, renormalized (as vLLM and HF do):
    # keep a token while the mass of the tokens ranked above it is below top_p.
    after_top_k = sorted_probs * keep
    mass_above = torch.nn.functional.pad(torch.cumsum(after_top_k, dim=-1)[:, :-1], (1, 0))
    nucleus = mass_above < top_p[:, None] * after_top_k.sum(dim=-1, keepdim=True)
    # top_p = 1 is "off"; rounding in the cumsum must not drop the tail then.
    keep &= nucleus | (top_p[:, None] >= 1.0)

    # Min-p compares with the best token, so renormalizing would not change it.
    keep &= sorted_probs >= min_p[:, None] * sorted_probs[:, :1]
    keep[:, 0] = True

    keep_by_token = torch.empty_like(keep).scatter_(-1, order, keep)
    return probs.masked_fill(~keep_by_token, 0.0)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, token i with probability probs_i / sum(probs)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    # An Exp(1) draw can be exactly 0; 0/0 would be NaN and win the argmax.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _check_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: list[torch.Generator | None]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(generators) != len(params):
        raise ValueError(f"logits [num_rows, vocab] need one params and one generator (or None) per row, "
                         f"got logits {tuple(logits.shape)}, {len(params)} params, {len(generators)} generators")
    for p, g in zip(params, generators):
        if p.seed is not None and g is None and not p.greedy:
            raise ValueError("a seeded request needs its generator (request_generator)")


class Sampler:
    def __init__(self, generator: torch.Generator | None = None):
        # Shared by all unseeded rows; None means torch's default generator.
        self.generator = generator

    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None] | None = None) -> SampleOutput:
        n = len(params)
        generators = [None] * n if generators is None else list(generators)
        _check_batch(logits, params, generators)
        logits = logits.float()

        token_ids = torch.empty(n, dtype=torch.long, device=logits.device)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        shared_rows = [i for i, p in enumerate(params) if not p.greedy and generators[i] is None]
        own_rows = [i for i, p in enumerate(params) if not p.greedy and generators[i] is not None]

        if greedy_rows:
            # argmax returns the first maximum: ties go to the lowest token id.
            token_ids[greedy_rows] = logits[greedy_rows].argmax(dim=-1)
        if shared_rows:
            token_ids[shared_rows] = self._sample(logits[shared_rows], [params[i] for i in shared_rows],
                                                  self.generator)
        for i in own_rows:
            # One row at a time: the same ops on the same data whatever the batch.
            token_ids[i] = self._sample(logits[i:i + 1], [params[i]], generators[i])[0]

        sampled = token_ids.tolist()
        logprobs, top_logprobs = self._logprobs(logits, params, token_ids)
        return SampleOutput(sampled, logprobs, top_logprobs)

    def sample_requests(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                        token_indices: Sequence[int]) -> SampleOutput:
        """The next token of each row's request, whose output token it is
        (token_indices): seeded requests draw from request_generator."""
        generators = [request_generator(p, i, logits.device) for p, i in zip(params, token_indices)]
        return self(logits, params, generators)

    @staticmethod
    def _sample(logits: torch.Tensor, params: list[SamplingParams],
                generator: torch.Generator | None) -> torch.Tensor:
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=logits.device)

        probs = filtered_probs(logits,
                               column([p.temperature for p in params], torch.float32),
                               column([p.top_k for p in params], torch.long),
                               column([p.top_p for p in params], torch.float32),
                               column([p.min_p for p in params], torch.float32))
        return exponential_race(probs, generator)

    @staticmethod
    def _logprobs(logits: torch.Tensor, params: Sequence[SamplingParams], token_ids: torch.Tensor):
        n = len(params)
        logprobs: list[float | None] = [None] * n
        top_logprobs: list[list[tuple[int, float]] | None] = [None] * n
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return logprobs, top_logprobs

        raw = torch.log_softmax(logits[rows], dim=-1)
        chosen = raw.gather(-1, token_ids[rows, None]).squeeze(-1).tolist()
        most = min(max(params[i].logprobs for i in rows), raw.shape[-1])
        top_values, top_ids = (t.tolist() for t in raw.topk(most, dim=-1))

        for j, i in enumerate(rows):
            k = params[i].logprobs
            logprobs[i] = chosen[j]
            top_logprobs[i] = list(zip(top_ids[j][:k], top_values[j][:k]))
        return logprobs, top_logprobs
