"""Request traces for the serving benchmarks: Poisson arrivals, and per
request a prompt and an output length, either drawn from a seeded
ShareGPT-like distribution or read from a local ShareGPT JSON file.

ShareGPT-like: ShareGPT conversations have long-tailed lengths (most turns
are short, a few are very long); both lengths are log-normal with sigma 1.0,
which gives that shape, scaled to the given means and clipped to
[4, 8 x mean] so that one request cannot outlast the whole run on a small
machine. A trace is a plain list, so every mode of a benchmark replays the
very same requests."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

SIGMA = 1.0        # of the log-normal lengths (ShareGPT's tail)
MIN_TOKENS = 4
MAX_FACTOR = 8     # a length is clipped to MAX_FACTOR x its mean
FIRST_ID = 16      # random prompts skip the first ids: special tokens live there


@dataclass
class Request:
    arrival_s: float        # offset from the start of the trace
    prompt: list[int]       # token ids
    output_len: int         # tokens to generate (end of sequence ignored)


def lognormal_length(rng: random.Random, mean: float) -> int:
    # mu chosen so that the distribution's mean is `mean` before clipping.
    mu = math.log(mean) - SIGMA ** 2 / 2
    return int(min(max(MIN_TOKENS, round(rng.lognormvariate(mu, SIGMA))), MAX_FACTOR * mean))


def arrivals(rate: float, duration_s: float, rng: random.Random) -> list[float]:
    """Poisson arrivals at `rate` per second over `duration_s` seconds."""
    if not (rate > 0 and duration_s > 0):
        raise ValueError(f"need rate > 0 and duration > 0, got {rate} and {duration_s}")
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration_s:
            return times
        times.append(t)


def sharegpt_like(rate: float, duration_s: float, mean_prompt: int, mean_output: int,
                  vocab_size: int, seed: int = 0) -> list[Request]:
    if mean_prompt < MIN_TOKENS or mean_output < MIN_TOKENS:
        raise ValueError(f"mean lengths must be at least {MIN_TOKENS} tokens")
    rng = random.Random(seed)
    trace = []
    for t in arrivals(rate, duration_s, rng):
        n_in, n_out = lognormal_length(rng, mean_prompt), lognormal_length(rng, mean_output)
        trace.append(Request(t, [rng.randrange(FIRST_ID, vocab_size) for _ in range(n_in)], n_out))
    return trace


def sharegpt_file(path: str | Path, rate: float, duration_s: float, tokenizer,
                  max_prompt: int, max_output: int, seed: int = 0) -> list[Request]:
    """Requests from a ShareGPT JSON file (a list of {"conversations": [{"from":
    "human"|"gpt", "value": text}, ...]}): the first human turn is the prompt
    and the reply's token count the output length; conversations are drawn in
    a seeded order, those too long for the limits are skipped."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a ShareGPT JSON file at {path}: {exc}") from None
    pairs = []
    for conv in data if isinstance(data, list) else []:
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(
                isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"{path} holds no conversation with a prompt and a reply")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    times = arrivals(rate, duration_s, rng)
    trace = []
    for prompt_text, reply_text in pairs:
        if len(trace) == len(times):
            break
        prompt = tokenizer.encode(prompt_text)
        n_out = len(tokenizer.encode(reply_text))
        if MIN_TOKENS <= len(prompt) <= max_prompt and MIN_TOKENS <= n_out <= max_output:
            trace.append(Request(times[len(trace)], prompt, n_out))
    if len(trace) < len(times):
        raise ValueError(f"{path}: only {len(trace)} conversations fit the length limits "
                         f"({max_prompt} prompt, {max_output} output tokens), "
                         f"{len(times)} needed")
    return trace


def summary(trace: list[Request]) -> dict:
    """What the JSON report records about a trace."""
    n = len(trace)
    return dict(requests=n,
                mean_prompt_tokens=sum(len(r.prompt) for r in trace) / max(n, 1),
                mean_output_tokens=sum(r.output_len for r in trace) / max(n, 1),
                max_prompt_tokens=max((len(r.prompt) for r in trace), default=0),
                max_output_tokens=max((r.output_len for r in trace), default=0))
