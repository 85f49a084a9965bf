"""Load generator for any OpenAI-compatible completions server.

Sends --num-prompts streaming requests with Poisson arrivals at --rate per
second (random token-id prompts, seeded lengths, greedy, a fixed number of
output tokens each) and prints the percentiles of TTFT (arrival to first
token), TPOT (mean time per output token after the first), ITL (time between
consecutive stream chunks) and end-to-end latency, with the failures.

    kevlarflow bench serve --url http://127.0.0.1:8000 --rate 2 --num-prompts 50
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

from kevlarflow.bench import sse


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    latency: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_request(session, url: str, headers: dict, body: dict) -> Result:
    result = Result()
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for chunk in sse.chunks(response):
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    result.chunk_times.append(time.perf_counter() - start)
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
        result.ok = bool(result.chunk_times)
        if not result.ok:
            result.error = "no token in the stream"
        else:
            result.ttft = result.chunk_times[0]
            result.latency = time.perf_counter() - start
            result.tokens = result.tokens or len(result.chunk_times)
    except Exception as error:  # noqa: BLE001 (any failure of a request is counted, not fatal)
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run_load(args) -> tuple[list[Result], float]:
    import aiohttp

    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/") + "/v1/completions"
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        model = args.model
        if model is None:
            async with session.get(args.url.rstrip("/") + "/v1/models", headers=headers) as r:
                model = (await r.json())["data"][0]["id"]
        tasks = []
        start = time.perf_counter()
        for _ in range(args.num_prompts):
            length = max(1, int(rng.lognormvariate(0, 0.5) * args.prompt_len))
            body = {"model": model, "prompt": [rng.randrange(16, args.vocab) for _ in range(length)],
                    "max_tokens": args.output_len, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(one_request(session, url, headers, body)))
            await asyncio.sleep(rng.expovariate(args.rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1000.0) -> str:
    if not values:
        return "-"
    values = sorted(v * scale for v in values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return (f"mean {statistics.mean(values):8.1f}  p50 {pick(0.5):8.1f}  p90 {pick(0.9):8.1f}  "
            f"p99 {pick(0.99):8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--prompt-len", type=int, default=64, help="mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    parser.add_argument("--vocab", type=int, default=1000, help="prompt token ids are below this")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.num_prompts < 1 or args.output_len < 1 or args.vocab <= 16:
        parser.error("need --rate > 0, --num-prompts >= 1, --output-len >= 1, --vocab > 16")

    results, elapsed = asyncio.run(run_load(args))
    ok = [r for r in results if r.ok]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    print(f"{len(ok)}/{len(results)} requests ok in {elapsed:.1f} s at {args.rate}/s; "
          f"{sum(r.tokens for r in ok) / elapsed:.1f} output tok/s")
    print(f"TTFT ms     {percentiles([r.ttft for r in ok])}")
    print(f"TPOT ms     {percentiles(tpot)}")
    print(f"ITL ms      {percentiles(itl)}")
    print(f"latency ms  {percentiles([r.latency for r in ok])}")
    failures = [r.error for r in results if not r.ok]
    if failures:
        print(f"failures: {len(failures)}, e.g. {failures[0]}")


if __name__ == "__main__":
    main()
