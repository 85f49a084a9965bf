"""The in-process engine on CUDA: the same greedy tokens as on the CPU, no
host synchronisation inside a forward step, clear refusals. Marked gpu:
skipped without CUDA."""
import pytest
import torch

from kevlarflow import LLM, SamplingParams
from helpers.models import tiny_model
from kevlarflow.engine.model_runner import ModelRunner, attention_metadata, sample_rows
from kevlarflow.model.config import ModelConfig
from kevlarflow.model.loader import load_stage

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
