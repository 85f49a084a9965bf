"""Generation throughput of deployments of the same checkpoint, same run:
one worker (pp=1), one instance of two stages (pp=2), two instances of one
stage, and for reference the in-process engine. Configurations alternate over
the repeats; each repeat starts a fresh deployment (start-up is reported but
not counted in tokens/s)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

from kevlarflow.bench.throughput import ensure_model, make_prompts
from kevlarflow.bench.timing import cpu_model

CONFIGS = {
    "in-process engine": None,
    "pp=1 (1 worker)": dict(num_instances=1, pp_size=1),
    "pp=2 (1 instance x 2 stages)": dict(num_instances=1, pp_size=2),
    "2 instances x 1 stage": dict(num_instances=2, pp_size=1),
}


def run_once(model: str, deployment: dict | None, prompts, max_tokens: int, threads: int):
    import torch

    from kevlarflow import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    args = dict(max_num_batched_tokens=512, max_num_seqs=64)
    start = time.perf_counter()
    if deployment is None:
        torch.set_num_threads(threads)
        llm = LLM(model, load_progress=False, **args)
    else:
        llm = LLM(model, worker_threads=1, **deployment, **args)
    startup = time.perf_counter() - start
    try:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    return sum(len(o.token_ids) for o in outs) / elapsed, startup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--flavour", default="llama")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    model = ensure_model(args.preset, args.flavour)
    from kevlarflow.model.config import ModelConfig

    prompts = make_prompts(ModelConfig.from_pretrained(model).vocab_size, args.requests,
                           args.prompt_len)
    cores = os.cpu_count() or 1
    rates = {name: [] for name in CONFIGS}
    startups = {name: [] for name in CONFIGS}
    for r in range(args.repeats):
        for name, deployment in CONFIGS.items():
            rate, startup = run_once(model, deployment, prompts, args.output_len, cores)
            rates[name].append(rate)
            startups[name].append(startup)
            print(f"repeat {r + 1}/{args.repeats} {name}: {rate:.0f} tok/s", flush=True)

    base = statistics.median(rates["pp=1 (1 worker)"])
    print(f"\n{args.preset} {args.flavour}, {args.requests} requests x {args.prompt_len} prompt / "
          f"{args.output_len} output tokens, greedy; {cores} cores ({cpu_model()}); "
          f"workers 1 torch thread each, in-process engine {cores}; median (min-max) of {args.repeats}")
    print(f"{'configuration':32} {'tok/s':>18} {'vs pp=1':>8} {'start-up s':>11}")
    for name in CONFIGS:
        med = statistics.median(rates[name])
        print(f"{name:32} {med:7.0f} ({min(rates[name]):.0f}-{max(rates[name]):.0f})"
              f" {med / base:7.2f}x {statistics.median(startups[name]):10.1f}")


if __name__ == "__main__":
    main()
