"""Sampler: greedy, filters, per-request seeds, distribution and logprobs."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sampler import Sampler, make_generator


def random_logits(rows, vocab, seed=0, scale=3.0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax():
    logits = random_logits(8, 1000)
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 8)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 5.0], [7.0, 7.0, 7.0, 7.0, 7.0]])
    out = Sampler()(logits, [SamplingParams(temperature=0), SamplingParams(top_k=1)])
    assert out.token_ids == [1, 0]


def test_top_k_1_is_greedy_even_with_temperature_and_seed():
    logits = random_logits(6, 300, seed=1)
    params = [SamplingParams(top_k=1, temperature=1.7, seed=i) for i in range(6)]
    generators = [make_generator(i) for i in range(6)]
    assert Sampler()(logits, params, generators).token_ids == logits.argmax(-1).tolist()


def test_tiny_temperature_samples_the_argmax():
    # With a clear winner, T=0.01 leaves it probability 1 - e^-100 per step.
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]]).repeat(200, 1)
    out = Sampler(torch.Generator().manual_seed(0))(logits, [SamplingParams(temperature=0.01)] * 200)
    assert set(out.token_ids) == {2}


def reference_keeps(logits_row, temperature, top_k, top_p, min_p, token):
    """Whether the filters, done in float64, clearly keep `token` (with slack at
    the boundaries, where float32 rounding may go either way)."""
    probs = torch.softmax(logits_row.double() / temperature, -1)
    order = probs.argsort(descending=True, stable=True)
    rank = (order == token).nonzero().item()
    vocab = len(probs)
    k = top_k if top_k > 0 else vocab
    if rank >= k:
        return False
    top = probs[order[:k]]
    mass_above = (top[:rank].sum() / top.sum()).item()
    if top_p < 1 and mass_above >= top_p + 1e-5:
        return False
    return probs[token].item() >= min_p * probs.max().item() - 1e-6


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(2, 64), seed=st.integers(0, 2**31),
       temperature=st.floats(0.05, 3.0), top_k=st.integers(-1, 70),
       top_p=st.floats(0.01, 1.0), min_p=st.floats(0.0, 1.0))
def test_filtered_tokens_are_never_sampled(vocab, seed, temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if params.greedy:
        return
    row = random_logits(1, vocab, seed=seed)[0]
    draws = 256
    out = Sampler(torch.Generator().manual_seed(seed))(row.repeat(draws, 1), [params] * draws)
    for token in set(out.token_ids):
        assert reference_keeps(row, temperature, top_k, top_p, min_p, token), token


def test_filters_leave_only_the_expected_tokens_possible():
    # probs ~ [0.64, 0.24, 0.09, 0.03, ...]: each filter alone cuts after token 1.
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    for params in [SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(min_p=0.3)]:
        out = Sampler(torch.Generator().manual_seed(1))(logits.repeat(2000, 1), [params] * 2000)
        assert set(out.token_ids) == {0, 1}, params


def seeded_tokens(batch_layout, steps=12, vocab=500):
    """Tokens of the request "A" (seed 1234) over a few steps, sampled inside a
    batch laid out as `batch_layout`, whose other rows vary."""
    others = {"B": SamplingParams(seed=99), "C": SamplingParams(), "D": SamplingParams(temperature=0),
              "E": SamplingParams(top_k=5, seed=1234)}
    target = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, seed=1234)
    generators = {name: make_generator(p.seed) for name, p in others.items()}
    generators["A"] = make_generator(target.seed)
    sampler = Sampler()
    tokens = []
    for step in range(steps):
        logits = torch.stack([random_logits(1, vocab, seed=1000 * step + (0 if name == "A" else ord(name)))[0]
                              for name in batch_layout])
        params = [target if name == "A" else others[name] for name in batch_layout]
        out = sampler(logits, params, [generators[name] for name in batch_layout])
        tokens.append(out.token_ids[batch_layout.index("A")])
    return tokens


def test_seeded_request_is_independent_of_the_batch():
    alone = seeded_tokens("A")
    assert len(set(alone)) > 3  # it really samples
    for layout in ["BAC", "CDA", "ADEB", "EDCBA"]:
        assert seeded_tokens(layout) == alone, layout


def test_seeded_request_needs_its_generator():
    with pytest.raises(ValueError, match="generator"):
        Sampler()(random_logits(1, 10), [SamplingParams(seed=3)])


def chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


@pytest.mark.parametrize("params,expected", [
    (SamplingParams(), [0.5, 0.25, 0.125, 0.0625, 0.0625]),
    (SamplingParams(temperature=0.5), [64 / 86, 16 / 86, 4 / 86, 1 / 86, 1 / 86]),
    (SamplingParams(top_p=0.8), [4 / 7, 2 / 7, 1 / 7, 0, 0]),
])
def test_empirical_distribution(params, expected):
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0]]) * math.log(2)
    draws = 20000
    out = Sampler(torch.Generator().manual_seed(2024))(logits.repeat(draws, 1), [params] * draws)
    counts = [out.token_ids.count(i) for i in range(5)]
    support = [i for i, p in enumerate(expected) if p > 0]
    assert all(counts[i] == 0 for i in range(5) if expected[i] == 0)
    # Critical chi-square value for p = 1e-6 at <= 4 degrees of freedom is < 34.
    assert chi_square([counts[i] for i in support], [expected[i] for i in support]) < 34


def test_logprobs_are_raw_log_softmax():
    logits = random_logits(4, 50, seed=5)
    params = [SamplingParams(temperature=0.3, top_k=3, logprobs=5), SamplingParams(logprobs=0),
              SamplingParams(temperature=0, logprobs=20), SamplingParams()]
    out = Sampler(torch.Generator().manual_seed(0))(logits, params)
    expected = torch.log_softmax(logits.double(), -1)
    for row in range(3):
        token = out.token_ids[row]
        assert out.logprobs[row] == pytest.approx(expected[row, token].item(), abs=1e-5)
        k = params[row].logprobs
        top = out.top_logprobs[row]
        assert len(top) == k
        best = expected[row].topk(k).indices.tolist() if k else []
        assert [t for t, _ in top] == best
        for token_id, logprob in top:
            assert logprob == pytest.approx(expected[row, token_id].item(), abs=1e-5)
    assert out.top_logprobs[1] == []
    assert out.logprobs[3] is None and out.top_logprobs[3] is None


def test_bad_batch_shapes_are_refused():
    with pytest.raises(ValueError, match="params"):
        Sampler()(random_logits(2, 10), [SamplingParams()])
