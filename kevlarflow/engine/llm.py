"""The offline API: LLM(path).generate(prompts, params)."""
from __future__ import annotations

from dataclasses import fields

from tqdm import tqdm

from kevlarflow.engine.llm_engine import EngineConfig, LLMEngine
from kevlarflow.engine.outputs import RequestOutput
from kevlarflow.engine.params import SamplingParams


class LLM:
    """Runs a model from a local Hugging Face folder. Keyword arguments are
    EngineConfig fields (block_size, kv_cache_memory, max_num_batched_tokens,
    max_num_seqs, max_model_len, enable_prefix_caching, dtype, ...). With
    DeploymentConfig fields (num_instances, pp_size, ...) the model is served
    by a deployment of worker processes instead of in this process; call
    shutdown() (or use `with LLM(...) as llm:`) to stop them."""

    def __init__(self, model: str, **engine_args):
        from kevlarflow.deploy.controller import DeploymentConfig, Controller

        local = {f.name for f in fields(EngineConfig)}
        known = {f.name for f in fields(DeploymentConfig)}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(f"unknown engine arguments {unknown}; known: {sorted(known)}")
        if set(engine_args) <= local:
            self.engine = LLMEngine(model, EngineConfig(**engine_args))
        else:
            self.engine = Controller(model, DeploymentConfig(**engine_args))
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown:
            shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        # Validate everything before anything is queued: a bad input fails the call cleanly.
        for sp in per_prompt:
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"params must be SamplingParams, got {type(sp).__name__}")
        token_ids = [self.engine.prepare_prompt(prompt) for prompt in prompts]
        seqs = [self.engine.add_request(p, sp, prompt_token_ids=ids)
                for p, sp, ids in zip(prompts, per_prompt, token_ids)]
        order = {seq.request_id: i for i, seq in enumerate(seqs)}
        results: list[RequestOutput | None] = [None] * len(seqs)
        with tqdm(total=len(seqs), disable=not progress, desc="generating") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results
