"""One pipeline instance in one process: requests in, tokens and text out.

step() runs one scheduling round: schedule, one forward pass over the mixed
batch, sample, then detokenize and check stop conditions."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from kevlarflow.engine.block_manager import BlockManager
from kevlarflow.engine.detokenizer import IncrementalDetokenizer, StopChecker, should_stop_on_token
from kevlarflow.engine.model_runner import ModelRunner
from kevlarflow.engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sampler import Sampler, make_generator
from kevlarflow.engine.scheduler import Scheduler
from kevlarflow.engine.sequence import Sequence, Status
from kevlarflow.model.config import DTYPES, ModelConfig
from kevlarflow.model.loader import load_stage


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
    seed: int = 0                       # of the generator shared by unseeded requests
    load_progress: bool = True

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("block_size", "kv_cache_memory", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


class _RequestState:
    """Engine-side companions of a sequence: text decoding and stop strings."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stops = StopChecker.from_params(params)


class LLMEngine:
    def __init__(self, model: str, config: EngineConfig | None = None, tokenizer=None):
        from transformers import AutoTokenizer

        self.config = config = config or EngineConfig()
        config.validate()
        self.model_config = cfg = ModelConfig.from_pretrained(model)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        dtype = DTYPES[config.dtype] if config.dtype else None
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        self.stage = load_stage(model, cfg=cfg, dtype=dtype, progress=config.load_progress,
                                max_positions=self.max_model_len)
        num_blocks = config.kv_cache_memory // (config.block_size * cfg.kv_bytes_per_token)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of "
                             f"{config.block_size} tokens ({cfg.kv_bytes_per_token} bytes/token)")
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.pool_tokens = num_blocks * config.block_size
        # A sequence can never outgrow the pool: it would preempt itself forever.
        self.max_seq_len = min(self.max_model_len, self.pool_tokens)
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_num_seqs)
        self.runner = ModelRunner(self.stage, num_blocks, config.block_size,
                                  config.attention_backend, config.device)
        self.sampler = Sampler(torch.Generator(device=config.device).manual_seed(config.seed))
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.sequences: dict[str, Sequence] = {}
        self._states: dict[str, _RequestState] = {}
        self._ids = itertools.count()

    # Requests ---------------------------------------------------------------

    def prepare_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, or ValueError saying why it cannot be served."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, (list, tuple)) and prompt:
            vocab = self.model_config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a non-empty string or list of token ids")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the maximum is "
                             f"{self.max_model_len - 1} (max_model_len {self.max_model_len})")
        if len(ids) + 1 > self.pool_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens but the KV pool holds only "
                             f"{self.pool_tokens}: raise kv_cache_memory")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None) -> Sequence:
        """prompt_token_ids: what prepare_prompt(prompt) returned, if the
        caller already validated the prompt (saves tokenizing it twice)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = prompt_token_ids if prompt_token_ids is not None else self.prepare_prompt(prompt)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt if isinstance(prompt, str) else None, ids, params,
                       arrival_time=arrival_time or time.time(),
                       generator=make_generator(params.seed, self.config.device))
        self.sequences[request_id] = seq
        self._states[request_id] = _RequestState(self.tokenizer, params)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return None
        seq.finish_reason = "abort"
        return self._finish(seq, "", [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # One step ---------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("the KV pool cannot hold the next waiting request")
            return []
        logits = self.runner.run(batch)
        for seq, n in batch.items:
            seq.num_computed_tokens += n
            self.blocks.register_full_blocks(seq)
        to_sample = [seq for seq, _ in batch.items if seq.num_computed_tokens == seq.num_tokens]
        if not to_sample:  # only partial prefill chunks this step
            return []
        sampled = self.sampler(logits, [s.params for s in to_sample],
                               [s.generator for s in to_sample])
        now = time.time()
        outputs = []
        for i, seq in enumerate(to_sample):
            token = sampled.token_ids[i]
            if sampled.logprobs[i] is not None:
                seq.logprobs.append(TokenLogprob(token, sampled.logprobs[i], sampled.top_logprobs[i]))
            outputs.append(self._append_token(seq, token, now))
        return outputs

    def _append_token(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        seq.output_token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        state = self._states[seq.request_id]
        reason = should_stop_on_token(token, seq.params, self.eos_token_ids)
        # A stop token's own text is not output (eos is special and skipped anyway).
        if reason is None or seq.params.include_stop_str_in_output:
            check = state.stops.add_text(state.detokenizer.add_tokens([token]))
            if check.stopped:
                reason = "stop"
            new_text = check.text
        else:
            new_text = ""
        if reason is None and (len(seq.output_token_ids) >= seq.params.max_tokens
                               or seq.num_tokens >= self.max_seq_len):
            reason = "length"
        if reason is None:
            seq.text += new_text
            return self._output(seq, new_text, [token])
        seq.finish_reason = reason
        return self._finish(seq, new_text, [token])

    def _finish(self, seq: Sequence, new_text: str, new_tokens: list[int]) -> RequestOutput:
        state = self._states.pop(seq.request_id)
        if not state.stops.stopped:
            # Text held back (an unfinished character, a possible stop string)
            # is released now; it may still complete a stop string.
            new_text += state.stops.add_text(state.detokenizer.flush()).text
            if state.stops.stopped:
                if seq.finish_reason == "length":
                    seq.finish_reason = "stop"
            else:
                new_text += state.stops.flush()
        seq.text += new_text
        seq.finish_time = time.time()
        self.scheduler.finish(seq)
        del self.sequences[seq.request_id]
        return self._output(seq, new_text, new_tokens)

    def _output(self, seq: Sequence, new_text: str, new_tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            text=seq.text, token_ids=list(seq.output_token_ids), new_text=new_text,
            new_token_ids=new_tokens, finished=seq.is_finished, finish_reason=seq.finish_reason,
            metrics=RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time,
                                   seq.num_preemptions),
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None)
