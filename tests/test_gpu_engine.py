"""The in-process engine on CUDA: the same greedy tokens as on the CPU, no
host synchronisation inside a forward step, decode steps replayed from CUDA
graphs with the eager steps' results, clear refusals. Marked gpu: skipped
without CUDA."""
import pytest
import torch

from kevlarflow import LLM, SamplingParams
from helpers.models import tiny_model
from kevlarflow.engine.cuda_graphs import PaddedDecode
from kevlarflow.engine.model_runner import ModelRunner, attention_metadata, sample_rows
from kevlarflow.model.config import ModelConfig
from kevlarflow.model.loader import load_stage
from kevlarflow.model.stage import StageSpec

pytestmark = pytest.mark.gpu

PROMPTS = ["the quick brown fox", "one two", "a b c d e f g h i j k l m n o p q r s t u v w"]


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_greedy_tokens_on_cuda_are_the_cpu_engine_s(backend):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    args = dict(dtype="float32", load_progress=False, block_size=8)
    cpu = [o.token_ids for o in LLM(tiny_model("llama"), **args).generate(PROMPTS, params)]
    gpu_llm = LLM(tiny_model("llama"), device="cuda", attention_backend=backend, **args)
    assert gpu_llm.engine.runner.kv_caches[0][0].is_cuda
    assert all(p.is_cuda for p in gpu_llm.engine.stage.parameters())
    assert [o.token_ids for o in gpu_llm.generate(PROMPTS, params)] == cpu


def test_a_forward_step_never_synchronises_with_the_host():
    """Everything a step needs is made on the host first (token ids, block
    tables); the forward pass itself, attention included, then runs with
    CUDA's sync debugging set to fail on any synchronisation."""
    cfg = ModelConfig.from_pretrained(tiny_model("llama"))
    stage = load_stage(tiny_model("llama"), cfg=cfg, progress=False, device="cuda")
    runner = ModelRunner(stage, num_blocks=64, block_size=8, device="cuda")
    chunks = [(20, 0, [0, 1, 2]), (1, 30, [3, 4, 5, 6]), (7, 9, [7, 8])]
    meta = attention_metadata(chunks, 8, "cuda")
    ids = torch.randint(0, cfg.vocab_size, (28,), device="cuda")
    rows = sample_rows([n for n, _, _ in chunks], [True, True, False], "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = stage(ids, meta, runner.kv_caches, logits_indices=rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (2, cfg.vocab_size) and torch.isfinite(logits).all()


def test_refusals_name_the_device_and_the_memory():
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"device='cuda:{count}' does not exist: {count} GPU"):
        LLM(tiny_model("llama"), device=f"cuda:{count}")
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match=r"needs [\d.]+ GiB on cuda:\d .* KV cache\) but only "
                                         r"[\d.]+ of its [\d.]+ GiB are free"):
        LLM(tiny_model("llama"), device="cuda", kv_cache_memory=2 * free, load_progress=False)


# Output lengths that make the decode batch shrink from 7 sequences to 1, so
# that steps run at sizes needing padding (7, 6, 5 -> 8; 3 -> 4) and not.
GRAPH_PROMPTS = PROMPTS + ["hello", "x y z", "numbers 1 2 3", "the end"]
GRAPH_LENGTHS = [5, 9, 13, 17, 21, 25, 30]


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_decode_steps_from_graphs_give_the_eager_and_the_cpu_tokens(backend):
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in GRAPH_LENGTHS]
    args = dict(dtype="float32", load_progress=False, block_size=8, max_num_seqs=16)
    cpu = [o.token_ids for o in LLM(tiny_model("llama"), **args).generate(GRAPH_PROMPTS, params)]
    eager = LLM(tiny_model("llama"), device="cuda", attention_backend=backend,
                enforce_eager=True, **args)
    assert eager.engine.runner.decode_graphs is None
    graphs = LLM(tiny_model("llama"), device="cuda", attention_backend=backend, **args)
    decode = graphs.engine.runner.decode_graphs
    assert sorted(decode.graphs) == [1, 2, 4, 8, 16] and decode.replays == 0
    assert [o.token_ids for o in eager.generate(GRAPH_PROMPTS, params)] == cpu
    assert [o.token_ids for o in graphs.generate(GRAPH_PROMPTS, params)] == cpu
    # Every prompt is prefilled in the first step (they fit its token
    # budget), which samples each first token; every later step is a pure
    # decode step, and each of them was a replay.
    assert decode.replays == max(GRAPH_LENGTHS) - 1


@pytest.mark.parametrize("stage", [0, 1], ids=["first-stage", "later-stage"])
def test_a_graph_replays_the_eager_padded_step_bit_for_bit(stage):
    """The same kernels on the same shapes: a replay and the eager padded
    step (the CPU tests' reference) give the same bits, at every size."""
    path = tiny_model("llama")
    cfg = ModelConfig.from_pretrained(path)
    spec = StageSpec.split(cfg.num_layers, 2, stage)
    loaded = load_stage(path, spec, cfg, progress=False, max_positions=256, device="cuda")
    runner = ModelRunner(loaded, num_blocks=200, block_size=8, device="cuda", max_num_seqs=16,
                         max_model_len=256)
    reference = PaddedDecode(loaded, runner.kv_caches, 8, 16, 256)
    gen = torch.Generator().manual_seed(0)
    tables = torch.randperm(199, generator=gen).add(1)[:16 * 12].view(16, 12).tolist()
    for n in [1, 3, 5, 8, 9, 13, 16]:
        lengths = torch.randint(1, 90, (n,), generator=gen).tolist()
        chunks = [(1, p, t) for p, t in zip(lengths, tables)]
        if stage == 0:
            inputs = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
        else:
            inputs = torch.randn(n, cfg.hidden_size, generator=gen).cuda()
        before = runner.decode_graphs.replays
        got = runner.forward(inputs, chunks)
        assert runner.decode_graphs.replays == before + 1
        expected = reference(inputs, chunks)  # rewrites the same K/V
        assert got.shape == expected.shape and torch.equal(got, expected), n


def test_contexts_past_the_graphs_longest_decode_eagerly(monkeypatch):
    """Graphs are sized for MAX_GRAPH_CONTEXT, not max_model_len; a decode
    step at a longer context runs eagerly and gives the eager runner's bits."""
    import kevlarflow.engine.model_runner as model_runner

    monkeypatch.setattr(model_runner, "MAX_GRAPH_CONTEXT", 64)
    cfg = ModelConfig.from_pretrained(tiny_model("llama"))
    stage = load_stage(tiny_model("llama"), cfg=cfg, progress=False, max_positions=256,
                       device="cuda")
    graphs = ModelRunner(stage, num_blocks=64, block_size=8, device="cuda", max_num_seqs=4,
                         max_model_len=256)
    eager = ModelRunner(stage, num_blocks=64, block_size=8, device="cuda", max_num_seqs=4,
                        max_model_len=256, enforce_eager=True)
    assert graphs.decode_graphs.max_context == 64 and graphs.decode_graphs.max_blocks == 8
    ids = torch.randint(0, cfg.vocab_size, (1,))
    within = [(1, 40, list(range(6)))]
    torch.testing.assert_close(graphs.forward(ids, within), eager.forward(ids, within))
    assert graphs.decode_graphs.replays == 1
    past = [(1, 100, list(range(13)))]  # both caches hold the same (zero) keys
    assert torch.equal(graphs.forward(ids, past), eager.forward(ids, past))
    assert graphs.decode_graphs.replays == 1


def test_a_decode_step_from_a_graph_never_synchronises_with_the_host():
    """Filling the graph's buffers (from pinned host memory) and the replay
    run under CUDA's sync debugging set to fail on any synchronisation."""
    cfg = ModelConfig.from_pretrained(tiny_model("llama"))
    stage = load_stage(tiny_model("llama"), cfg=cfg, progress=False, max_positions=512,
                       device="cuda")
    runner = ModelRunner(stage, num_blocks=64, block_size=8, device="cuda", max_num_seqs=8,
                         max_model_len=512)
    chunks = [(1, 20, [0, 1, 2]), (1, 30, [3, 4, 5, 6]), (1, 9, [7, 8])]
    ids = torch.randint(0, cfg.vocab_size, (3,))
    rows = sample_rows([1, 1, 1], [True, False, True])
    runner.forward(ids, chunks, rows)  # a first step, outside the check
    torch.cuda.synchronize()
    before = runner.decode_graphs.replays
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = runner.forward(ids, chunks, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.decode_graphs.replays == before + 1
    assert logits.shape == (2, cfg.vocab_size) and torch.isfinite(logits).all()
