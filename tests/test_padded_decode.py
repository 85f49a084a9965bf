"""Decode steps at static, padded shapes (engine/cuda_graphs.py), run eagerly
on the CPU: the forward pass a CUDA graph replays on a GPU. Padding rows
never change a real row and write no K/V, and a padded step samples the
unpadded step's tokens: on a whole model, and on the first and on a later
stage of a two-stage pipeline.

Logits are compared bit for bit where the arithmetic allows: between two
steps of the same padded size. Against the unpadded step they agree to
fp32 rounding only: the CPU's matrix products choose their blocking by the
number of rows, so a row's sums are ordered differently at 3 rows than at 4
(the GPU tests compare graphs with the eager padded step bit for bit)."""
import pytest
import torch

from helpers.models import tiny_model
from kevlarflow import LLM
from kevlarflow.engine.cuda_graphs import PaddedDecode, batch_sizes
from kevlarflow.engine.model_runner import ModelRunner, attention_metadata, sample_rows
from kevlarflow.model.config import ModelConfig
from kevlarflow.model.loader import load_stage
from kevlarflow.model.stage import StageSpec

BLOCK = 8
MAX_SEQS = 16
MAX_LEN = 96        # 12 blocks a sequence at most
NUM_BLOCKS = 400    # room for 20 sequences of 12 blocks, plus block 0 left to the padding
NUM_SEQS = 20


def test_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(5) == [1, 2, 4, 5]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError):
        batch_sizes(0)


# The stages tested: the whole tiny model (fp32; token ids in, logits out),
# and the two stages of a two-stage split of it (token ids in, hidden states
# out; hidden states in, logits out).
STAGES = ["whole", "first", "later"]


@pytest.fixture(scope="module")
def stages():
    path = tiny_model("llama")
    num_layers = ModelConfig.from_pretrained(path).num_layers
    specs = {"whole": StageSpec.split(num_layers, 1, 0), "first": StageSpec.split(num_layers, 2, 0),
             "later": StageSpec.split(num_layers, 2, 1)}
    return {name: load_stage(path, spec, progress=False, max_positions=MAX_LEN)
            for name, spec in specs.items()}


class Sequences:
    """NUM_SEQS sequences of different lengths on scattered blocks (none on
    block 0, which a padding row attends to), prefilled through the whole
    model and through both stages. Its runners' caches are the state each
    test step starts from."""

    def __init__(self, stages):
        gen = torch.Generator().manual_seed(0)
        self.vocab = stages["whole"].cfg.vocab_size
        order = torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1
        self.lengths = [int(n) for n in torch.randint(1, MAX_LEN - 2, (NUM_SEQS,), generator=gen)]
        # Every table holds a sequence's most blocks: more than its context
        # needs, as a worker's tables may.
        per_seq = MAX_LEN // BLOCK
        self.tables = [order[i * per_seq:(i + 1) * per_seq].tolist() for i in range(NUM_SEQS)]
        self.runners = {name: ModelRunner(s, NUM_BLOCKS, BLOCK) for name, s in stages.items()}
        # The CPU runs eagerly.
        assert all(r.decode_graphs is None for r in self.runners.values())
        chunks = [(n, 0, t) for n, t in zip(self.lengths, self.tables)]
        ids = torch.randint(0, self.vocab, (sum(self.lengths),), generator=gen)
        rows = sample_rows(self.lengths, [True] * NUM_SEQS)
        self.runners["whole"].forward(ids, chunks, rows)
        hidden = self.runners["first"].forward(ids, chunks)
        self.runners["later"].forward(hidden, chunks, rows)
        self.gen = gen

    def caches(self, stage: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of a stage's caches after the prefill."""
        return [(k.clone(), v.clone()) for k, v in self.runners[stage].kv_caches]

    def decode_chunks(self, picked: list[int]) -> list[tuple[int, int, list[int]]]:
        return [(1, self.lengths[i], self.tables[i]) for i in picked]

    def inputs(self, stage: str, n: int) -> torch.Tensor:
        if stage != "later":
            return torch.randint(0, self.vocab, (n,), generator=self.gen)
        cfg = self.runners[stage].stage.cfg
        return torch.randn(n, cfg.hidden_size, generator=self.gen, dtype=cfg.dtype)


@pytest.fixture(scope="module")
def seqs(stages):
    return Sequences(stages)


def eager(seqs, stage, caches, inputs, chunks, rows=None):
    """The unpadded step, as the runner runs it on the CPU, on these caches."""
    return seqs.runners[stage].stage(inputs, attention_metadata(chunks, BLOCK), caches,
                                     logits_indices=rows)


def padded(seqs, stage, caches):
    return PaddedDecode(seqs.runners[stage].stage, caches, BLOCK, MAX_SEQS, MAX_LEN)


def slots_of(chunks):
    return {t[p // BLOCK] * BLOCK + p % BLOCK for _, p, t in chunks}


def flat(caches):
    return [c.view(-1, *c.shape[2:]) for pair in caches for c in pair]


# Sizes that need padding (3 -> 4, 5 -> 8, 9 and 13 -> 16) and some that do
# not, in an order where a smaller step follows a larger one on the same
# buffers (what an earlier step left in them must not matter).
STEPS = [13, 3, 9, 1, 5, 16, 2, 7]


@pytest.mark.parametrize("stage", STAGES)
def test_a_padded_step_gives_the_unpadded_step_s_results(seqs, stage):
    decode = padded(seqs, stage, seqs.caches(stage))
    for n in STEPS:
        picked = torch.randperm(NUM_SEQS, generator=seqs.gen)[:n].tolist()
        chunks = seqs.decode_chunks(picked)
        assert decode.size_for(chunks) == next(s for s in decode.sizes if s >= n)
        inputs = seqs.inputs(stage, n)
        # NaN in the slots the step writes: a slot left unwritten shows.
        written = sorted(slots_of(chunks))
        for cache in flat(decode.kv_caches):
            cache[written] = float("nan")
        before = [(k.clone(), v.clone()) for k, v in decode.kv_caches]
        unpadded_caches = [(k.clone(), v.clone()) for k, v in before]
        expected = eager(seqs, stage, unpadded_caches, inputs, chunks)
        got = decode(inputs, chunks)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected)
        if stage != "first":  # logits: the greedy tokens
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
        # K/V went into every slot of the step, and nowhere else: not into
        # slot 0 of block 0, which the padding rows attend to. (Its values
        # are what the outputs above were computed from; the next test
        # compares them bit for bit.)
        for now, then in zip(flat(decode.kv_caches), flat(before)):
            assert not now[written].isnan().any()
            untouched = torch.ones(now.shape[0], dtype=torch.bool)
            untouched[written] = False
            assert torch.equal(now[untouched], then[untouched])


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("n", [3, 5, 9, 13])
def test_padding_rows_never_change_a_real_row(seqs, stage, n):
    """n sequences padded to size S, and the same n with S - n other real
    sequences in the padding rows' place: the n rows come out with the same
    bits (same shapes, so the same arithmetic; rows are independent)."""
    picked = torch.randperm(NUM_SEQS, generator=seqs.gen).tolist()
    chunks = seqs.decode_chunks(picked[:n])
    alone = padded(seqs, stage, seqs.caches(stage))
    size = alone.size_for(chunks)
    assert size > n
    inputs = seqs.inputs(stage, size)
    got = alone(inputs[:n], chunks)
    full = padded(seqs, stage, seqs.caches(stage))
    others = full(inputs, seqs.decode_chunks(picked[:size]))
    assert torch.equal(got, others[:n])
    # And the K/V the n rows wrote, in every layer.
    slots = sorted(slots_of(chunks))
    for mine, theirs in zip(flat(alone.kv_caches), flat(full.kv_caches)):
        assert torch.equal(mine[slots], theirs[slots])


@pytest.mark.parametrize("stage", ["whole", "later"])
def test_a_last_stage_returns_the_sampled_rows_only(seqs, stage):
    """A one-token chunk that ends no sequence (a prompt chunked down to its
    last tokens) is not sampled: its logits are left out."""
    decode = padded(seqs, stage, seqs.caches(stage))
    chunks = seqs.decode_chunks([4, 0, 7, 11, 2])
    inputs = seqs.inputs(stage, 5)
    rows = torch.tensor([0, 2, 3])
    expected = eager(seqs, stage, seqs.caches(stage), inputs, chunks, rows)
    got = decode(inputs, chunks, rows)
    assert got.shape == (3, seqs.vocab)
    torch.testing.assert_close(got, expected)
    assert decode(inputs[:0], [], None) is None
    assert decode(inputs, chunks, rows[:0]).shape == (0, seqs.vocab)


def test_only_decode_steps_that_fit_are_padded(seqs):
    decode = padded(seqs, "first", seqs.caches("first"))
    one = seqs.decode_chunks([0])
    assert decode.size_for(one) == 1
    assert decode.size_for([(2, 0, seqs.tables[0])]) is None                 # a prefill chunk
    assert decode.size_for(one + [(3, 0, seqs.tables[1])]) is None           # a mixed batch
    assert decode.size_for(seqs.decode_chunks(list(range(MAX_SEQS + 1)))) is None  # too many
    assert decode.size_for([(1, MAX_LEN, seqs.tables[0])]) is None           # past max_context
    assert decode(seqs.inputs("first", 2), [(2, 0, seqs.tables[0])]) is None
    with pytest.raises(ValueError, match="2 input rows for 1 decode chunks"):
        decode(seqs.inputs("first", 2), one)


def test_the_cpu_engine_runs_eagerly():
    llm = LLM(tiny_model("llama"), load_progress=False, block_size=8, enforce_eager=False)
    assert llm.engine.runner.decode_graphs is None
    with pytest.raises(ValueError, match="enforce_eager must be a bool"):
        LLM(tiny_model("llama"), load_progress=False, enforce_eager="no")
