"""Streaming clients of the chaos run, and the status poller beside them.

Each client sends one greedy streaming completion at a time (random token-id
prompt, seeded lengths, end of sequence ignored) and waits an exponential
think time before the next, so that arrivals are Poisson-like. Chunks carry
their token ids (return_token_ids), so the stream can be checked token by
token against the failure-free output."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field

from kevlarflow.bench import sse

FIRST_ID = 16  # prompts skip the first ids: special tokens live there


@dataclass
class RequestRecord:
    client: int
    prompt: list[int]
    max_tokens: int
    start_s: float
    end_s: float | None = None
    status: int | None = None         # HTTP status of the answer
    token_ids: list[int] = field(default_factory=list)  # as streamed, in order
    token_times_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""                   # "" when the stream ended normally

    @property
    def ok(self) -> bool:
        return not self.error and self.finish_reason is not None

    def as_json(self) -> dict:
        return asdict(self)


@dataclass
class Load:
    clients: int = 4
    think_s: float = 0.5         # mean pause between a client's requests
    prompt_len: int = 32         # mean prompt tokens (log-normal)
    output_len: int = 24         # mean output tokens (uniform in [len/2, 3 len/2])
    vocab: int = 1000
    timeout_s: float = 120.0     # a request that takes longer counts as lost
    seed: int = 0


def draw(rng: random.Random, load: Load) -> tuple[list[int], int]:
    n_in = max(1, min(8 * load.prompt_len, int(rng.lognormvariate(0, 0.6) * load.prompt_len)))
    n_out = rng.randint(max(1, load.output_len // 2), max(1, 3 * load.output_len // 2))
    return [rng.randrange(FIRST_ID, load.vocab) for _ in range(n_in)], n_out


async def one_request(session, url: str, model: str, record: RequestRecord, t0: float,
                      timeout_s: float) -> None:
    import aiohttp

    body = {"model": model, "prompt": record.prompt, "max_tokens": record.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            record.status = response.status
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return
            async for chunk in sse.chunks(response):
                if "error" in chunk:
                    record.error = str(chunk["error"].get("message", chunk["error"]))
                    return
                for choice in chunk.get("choices", []):
                    ids = choice.get("token_ids") or []
                    record.token_ids += ids
                    record.token_times_s += [time.monotonic() - t0] * len(ids)
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
            if record.finish_reason is None:
                record.error = "the stream ended without a finish reason"
    except asyncio.TimeoutError:
        record.error = f"no answer within {timeout_s:.0f} s"
    except Exception as error:  # noqa: BLE001 (every failure of a request is recorded)
        record.error = f"{type(error).__name__}: {error}"
    finally:
        record.end_s = time.monotonic() - t0


async def client(index: int, session, url: str, model: str, load: Load, t0: float,
                 stop_s: float, records: list[RequestRecord]) -> None:
    rng = random.Random(load.seed * 1000 + index)
    while time.monotonic() - t0 < stop_s:
        prompt, max_tokens = draw(rng, load)
        record = RequestRecord(index, prompt, max_tokens, time.monotonic() - t0)
        records.append(record)
        await one_request(session, url, model, record, t0, load.timeout_s)
        await asyncio.sleep(rng.expovariate(1 / load.think_s) if load.think_s > 0 else 0)


async def poll_status(session, url: str, t0: float, stop: asyncio.Event,
                      samples: list[dict], interval_s: float = 0.25) -> None:
    """/status every interval: phases, workers and stage coverage over time."""
    while not stop.is_set():
        try:
            async with session.get(url + "/status") as response:
                body = await response.json()
            samples.append(dict(t_s=time.monotonic() - t0, events=body["recent_events"],
                                **_digest(body)))
        except Exception:  # noqa: BLE001 (a missed sample is a gap in the timeline)
            pass
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


def _every_stage_has(workers: dict, stages: int, good) -> bool:
    return all(any(good(w) and w["stage"] == s for w in workers.values()) for s in range(stages))


def _digest(status: dict) -> dict:
    workers = status["workers"]
    stages = status["pp_size"]
    return dict(
        phases=[i["phase"] for i in status["instances"]],
        serving=[i["serving"] for i in status["instances"]],
        # A move back to a replacement pauses its instance on purpose.
        moving_back=[i["phase"] == "draining" or (i["phase"] == "building"
                                                  and i["reason"] == "moving back")
                     for i in status["instances"]],
        home=[i["workers"] == i["home"] for i in status["instances"]],
        borrowed=[w for i in status["instances"] for w in i["borrowed"]],
        states={name: w["state"] for name, w in workers.items()},
        every_stage_live=_every_stage_has(workers, stages, lambda w: w["live"]),
        every_stage_ready=_every_stage_has(workers, stages, lambda w: w["state"] == "ready"),
        blocks_used=sum(w["blocks_used"] for w in workers.values()),
        replica_blocks_used=status["replication"]["replica_blocks_used"],
        requests=sum(i["requests"] for i in status["instances"]),
        healthy=status["healthy"])
