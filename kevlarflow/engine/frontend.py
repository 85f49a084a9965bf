"""What every engine does with requests, whatever runs the model: validate
prompts, keep a Sequence per request, turn sampled tokens into text, check stop
conditions and build RequestOutputs. An engine subclass decides where a
sequence goes when it is added (`_submit`) and what is released when it ends
(`_release`)."""
from __future__ import annotations

import itertools
import time

from kevlarflow.engine.detokenizer import IncrementalDetokenizer, StopChecker, should_stop_on_token
from kevlarflow.engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from kevlarflow.engine.params import SamplingParams
from kevlarflow.engine.sequence import Sequence


class _RequestState:
    """Frontend companions of a sequence: text decoding and stop strings."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stops = StopChecker.from_params(params)


class RequestFrontend:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int],
                 max_model_len: int, pool_tokens: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        eos = set(eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.max_model_len = max_model_len
        self.pool_tokens = pool_tokens
        # A sequence can never outgrow its pool: it would preempt itself forever.
        self.max_seq_len = min(max_model_len, pool_tokens)
        self.sequences: dict[str, Sequence] = {}
        self._states: dict[str, _RequestState] = {}
        self._ids = itertools.count()

    # Subclass hooks -----------------------------------------------------------

    def _submit(self, seq: Sequence) -> None:
        raise NotImplementedError

    def _release(self, seq: Sequence) -> None:
        raise NotImplementedError

    # Requests ---------------------------------------------------------------

    def prepare_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, or ValueError saying why it cannot be served."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, (list, tuple)) and prompt:
            vocab = self.vocab_size
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
                       arrival_time=arrival_time or time.time())
        state = _RequestState(self.tokenizer, params)
        self._submit(seq)  # may refuse the request: then nothing is recorded
        self.sequences[request_id] = seq
        self._states[request_id] = state
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return None
        seq.finish_reason = "abort"
        return self._finish(seq, "", [])

    # Tokens in, outputs out ---------------------------------------------------

    def _append_sampled(self, seq: Sequence, token: int, now: float, logprob: float | None = None,
                        top: list[tuple[int, float]] | None = None) -> RequestOutput:
        """A token sampled for seq, with its logprob and the top ones if the
        request asked for them: the output of this step."""
        entry = None if logprob is None else TokenLogprob(token, logprob, top)
        return self._append_token(seq, token, now, entry)

    def _append_token(self, seq: Sequence, token: int, now: float,
                      logprob: TokenLogprob | None = None) -> RequestOutput:
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
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
        self._release(seq)
        del self.sequences[seq.request_id]
        return self._output(seq, new_text, new_tokens)

    def _output(self, seq: Sequence, new_text: str, new_tokens: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            text=seq.text, token_ids=list(seq.output_token_ids), new_text=new_text,
            new_token_ids=new_tokens, finished=seq.is_finished, finish_reason=seq.finish_reason,
            metrics=RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time,
                                   seq.num_preemptions, seq.tokens_run),
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None)
