"""`kevlarflow demo`: generate text from a freshly made tiny checkpoint, then
print the CPU attention benchmark table."""
from __future__ import annotations

import argparse
import tempfile
import time

PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "KevlarFlow keeps serving when",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kevlarflow demo", description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip-kernels", action="store_true", help="no benchmark table")
    args = parser.parse_args(argv)

    from kevlarflow import LLM, SamplingParams
    from kevlarflow.model.make_model import make_model

    with tempfile.TemporaryDirectory(prefix="kevlarflow-demo-") as path:
        start = time.perf_counter()
        make_model(path, preset="tiny", flavour="llama", seed=0)
        print(f"made a tiny random-weight Llama checkpoint in {time.perf_counter() - start:.1f} s "
              "(its text is gibberish by construction)")
        llm = LLM(path, load_progress=False)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=0)
        for out in llm.generate(PROMPTS, params):
            m = out.metrics
            print(f"\n> {out.prompt}\n{out.text!r}\n  [{len(out.token_ids)} tokens, "
                  f"finish={out.finish_reason}, ttft {m.ttft * 1e3:.0f} ms, "
                  f"latency {m.latency * 1e3:.0f} ms]")

    if not args.skip_kernels:
        from kevlarflow.bench.kernels import format_table, run

        print("\nCPU paged attention vs gather + SDPA (same run, interleaved):")
        print(format_table(run()))


if __name__ == "__main__":
    main()
