"""Offline throughput: the same model and prompts through KevlarFlow and
through transformers' batched generate, in one run; on a GPU also KevlarFlow
with every step eager (no CUDA graphs).

Each measurement runs in a fresh subprocess (so peak RSS is that engine's
own), the engines alternate, and the report gives the median and range of
the repeats and the ratio of medians."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("kevlarflow", "transformers", "kevlarflow-eager")


def default_model_dir(preset: str, flavour: str) -> Path:
    root = Path(os.environ.get("KEVLARFLOW_CACHE", Path.home() / ".cache" / "kevlarflow"))
    return root / "models" / f"{preset}-{flavour}-seed0"


def ensure_model(preset: str, flavour: str) -> str:
    path = default_model_dir(preset, flavour)
    if not (path / "config.json").is_file():
        from kevlarflow.model.make_model import make_model

        print(f"writing the {preset} {flavour} checkpoint to {path} ...", file=sys.stderr)
        make_model(path, preset=preset, flavour=flavour, seed=0)
    return str(path)


def make_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    # Skip the first ids: special tokens live there.
    return torch.randint(16, vocab, (count, length), generator=gen).tolist()


def make_workload(vocab: int, count: int, prompt_len: int, output_len: int, lengths: str,
                  seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts and per-request output lengths. "fixed": every request has the
    given lengths. "varied": lengths drawn from a seeded log-normal with those
    means (chat traffic is long-tailed), clipped to [4, 4 x mean]."""
    import torch

    if lengths == "fixed":
        return make_prompts(vocab, count, prompt_len, seed), [output_len] * count
    gen = torch.Generator().manual_seed(seed)

    def draw(mean: int) -> list[int]:
        sigma = 0.8
        mu = torch.log(torch.tensor(float(mean))) - sigma ** 2 / 2
        values = torch.exp(mu + sigma * torch.randn(count, generator=gen))
        return values.round().clamp(4, 4 * mean).int().tolist()

    prompt_lens, output_lens = draw(prompt_len), draw(output_len)
    prompts = [torch.randint(16, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    return prompts, output_lens


def run_kevlarflow(model: str, prompts, output_lens: list[int], dtype: str | None,
                   device: str = "cpu", enforce_eager: bool = False) -> dict:
    from kevlarflow import LLM, SamplingParams

    tokens_in_flight = sum(len(p) + n for p, n in zip(prompts, output_lens))
    llm = LLM(model, dtype=dtype, load_progress=False, block_size=16,
              max_num_seqs=len(prompts), max_num_batched_tokens=2048,
              kv_cache_memory=tokens_in_flight * llm_kv_bytes(model, dtype) + (16 << 20),
              device=device, enforce_eager=enforce_eager)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in output_lens]
    llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    return {"seconds": elapsed, "generated_tokens": generated}


def llm_kv_bytes(model: str, dtype: str | None) -> int:
    import torch

    from kevlarflow.model.config import ModelConfig

    cfg = ModelConfig.from_pretrained(model)
    if dtype:
        cfg.dtype = getattr(torch, dtype)
    return cfg.kv_bytes_per_token


def run_transformers(model: str, prompts, output_lens: list[int], dtype: str | None,
                     batch_size: int, device: str = "cpu") -> dict:
    """Static batching, as transformers does it: each batch is left-padded to
    its longest prompt and runs until its longest output is done. Only the
    tokens each request asked for count as generated."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype) if dtype else "auto")
    hf.to(device).eval()
    with torch.inference_mode():
        warm = torch.tensor([prompts[0]], device=device)
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), batch_size):
            batch, wanted = prompts[i:i + batch_size], output_lens[i:i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, p in enumerate(batch):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(wanted),
                        min_new_tokens=max(wanted), do_sample=False, eos_token_id=None,
                        pad_token_id=0)
            generated += sum(wanted)
        elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "generated_tokens": generated}


def worker(args) -> None:
    from kevlarflow.model.config import ModelConfig

    prompts, output_lens = make_workload(ModelConfig.from_pretrained(args.model).vocab_size,
                                         args.num_requests, args.prompt_len, args.output_len,
                                         args.lengths)
    if args.worker.startswith("kevlarflow"):
        result = run_kevlarflow(args.model, prompts, output_lens, args.dtype, args.device,
                                enforce_eager=args.worker == "kevlarflow-eager")
    else:
        result = run_transformers(args.model, prompts, output_lens, args.dtype,
                                  args.hf_batch_size, args.device)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        import torch

        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / (1 << 20)
    print(json.dumps(result))


def measure(args, engine: str) -> dict:
    cmd = [sys.executable, "-m", "kevlarflow.bench.throughput", "--worker", engine,
           "--model", args.model, "--num-requests", str(args.num_requests),
           "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
           "--hf-batch-size", str(args.hf_batch_size), "--lengths", args.lengths,
           "--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    # Its stderr goes where ours goes: a worker's error, or its log line that
    # decode graphs could not be captured, must show in the report.
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    from kevlarflow.model.device import device_option

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="HF model folder (default: the preset, made if missing)")
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--flavour", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", choices=["fixed", "varied"], default="fixed",
                        help="fixed: every request has the given lengths; varied: long-tailed "
                             "lengths with those means")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", type=device_option,
                        help="where both engines run (on cuda KevlarFlow also runs eagerly, "
                             "without CUDA graphs, as a third engine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    args.model = args.model or ensure_model(args.preset, args.flavour)
    engines = ENGINES if args.device == "cuda" else ENGINES[:2]
    runs = {engine: [] for engine in engines}
    for _ in range(args.repeats):
        for engine in engines:  # alternate, so noise hits them alike
            runs[engine].append(measure(args, engine))
            r = runs[engine][-1]
            print(f"  {engine:12} {r['generated_tokens'] / r['seconds']:8.1f} tok/s  "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    where = torch_device_name() if args.device == "cuda" else f"{os.cpu_count()} cores"
    print(f"\n{args.num_requests} requests x {args.prompt_len} prompt / {args.output_len} output "
          f"tokens ({args.lengths} lengths), model {args.model}, dtype {args.dtype or 'checkpoint'}, "
          f"{where}, {args.repeats} repeats")
    print(f"{'engine':14} {'tok/s median':>13} {'(min-max)':>17} {'peak RSS MiB':>13}")
    medians = {}
    for engine, results in runs.items():
        rates = sorted(r["generated_tokens"] / r["seconds"] for r in results)
        medians[engine] = statistics.median(rates)
        rss = max(r["peak_rss_mib"] for r in results)
        print(f"{engine:14} {medians[engine]:>13.1f} {f'({rates[0]:.1f}-{rates[-1]:.1f})':>17} "
              f"{rss:>13.0f}")
    print(f"kevlarflow / transformers: {medians['kevlarflow'] / medians['transformers']:.2f}x")
    if "kevlarflow-eager" in medians:
        print(f"kevlarflow / kevlarflow-eager (CUDA graphs): "
              f"{medians['kevlarflow'] / medians['kevlarflow-eager']:.2f}x")


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


if __name__ == "__main__":
    main()
