"""One pipeline instance in one process: requests in, tokens and text out.

step() runs one scheduling round: schedule, one forward pass over the mixed
batch, sample, then detokenize and check stop conditions."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.frontend import RequestFrontend
from kevlarflow.engine.model_runner import ModelRunner
from kevlarflow.engine.outputs import RequestOutput
from kevlarflow.engine.sampler import Sampler
from kevlarflow.engine.scheduler import Scheduler
from kevlarflow.engine.sequence import Sequence
from kevlarflow.model.config import DTYPES, ModelConfig
from kevlarflow.model.device import check_fits, resolve_device
from kevlarflow.model.loader import load_stage, stage_bytes


@dataclass
class EngineConfig:
    dtype: str | None = None            # default: the checkpoint's
    block_size: int = 16
    kv_cache_memory: int = 256 << 20    # bytes for the KV pool
    max_num_batched_tokens: int = 512   # token budget of one step (chunked prefill)
    max_num_seqs: int = 64
    max_model_len: int | None = None    # default: the model's maximum
    enable_prefix_caching: bool = False
    attention_backend: str = "native"
    device: str = "cpu"
    # On CUDA, run every step eagerly: no decode step from a CUDA graph.
    enforce_eager: bool = False
    seed: int = 0                       # of the generator shared by unseeded requests
    load_progress: bool = True

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "kv_cache_memory", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        self.check_device()

    def check_device(self) -> None:
        resolve_device(self.device)


class LLMEngine(RequestFrontend):
    def __init__(self, model: str, config: EngineConfig | None = None, tokenizer=None):
        from transformers import AutoTokenizer

        self.config = config = config or EngineConfig()
        config.validate()
        self.model_config = cfg = ModelConfig.from_pretrained(model)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        if config.dtype:
            cfg.dtype = DTYPES[config.dtype]
        max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                            cfg.max_position_embeddings)
        device = resolve_device(config.device)
        check_fits(device, stage_bytes(cfg, max_model_len), config.kv_cache_memory, model)
        self.stage = load_stage(model, cfg=cfg, progress=config.load_progress,
                                max_positions=max_model_len, device=device)
        num_blocks = config.kv_cache_memory // (config.block_size * cfg.kv_bytes_per_token)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of "
                             f"{config.block_size} tokens ({cfg.kv_bytes_per_token} bytes/token)")
        super().__init__(tokenizer, cfg.vocab_size, cfg.eos_token_ids, max_model_len,
                         num_blocks * config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_num_seqs)
        self.runner = ModelRunner(self.stage, num_blocks, config.block_size,
                                  config.attention_backend, device, config.max_num_seqs,
                                  max_model_len, config.enforce_eager)
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(config.seed))

    def _submit(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # One step ---------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("the KV pool cannot hold the next waiting request")
            return []
        to_sample = [seq for (seq, _), s in zip(batch.items, batch.samples()) if s]
        logits = self.runner.run(batch)
        for seq, n in batch.items:
            seq.num_computed_tokens += n
            seq.tokens_run += n
            self.blocks.register_full_blocks(seq)
        if not to_sample:  # only partial prefill chunks this step
            return []
        sampled = self.sampler.sample_requests(logits, [s.params for s in to_sample],
                                               [len(s.output_token_ids) for s in to_sample])
        now = time.time()
        return [self._append_sampled(seq, token, now, lp, top) for seq, token, lp, top in
                zip(to_sample, sampled.token_ids, sampled.logprobs, sampled.top_logprobs)]
