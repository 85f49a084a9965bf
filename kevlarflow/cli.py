"""The `kevlarflow` command line (also `python -m kevlarflow`).

Each subcommand is an `_add_<name>` function that registers its parser and
sets `run`. What a subcommand needs beyond torch (make-model: the
`tokenizers` library) is imported in its `run`, so that a missing optional
library breaks only that subcommand.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _run_make_model(args: argparse.Namespace) -> int:
    from kevlarflow.model.make_model import make_model

    written = make_model(args.path, preset=args.preset, flavour=args.flavour, seed=args.seed,
                         dtype=args.dtype)
    print(f"wrote {args.preset} {args.flavour} (seed {args.seed}) to {written.path}")
    for name in written.files:
        print(f"  {name:<40} {_human_bytes((written.path / name).stat().st_size):>10}")
    print(f"{written.parameters / 1e6:.1f}M parameters, {_human_bytes(written.bytes_on_disk)} on disk, "
          f"{written.seconds:.1f} s")
    return 0


def _add_make_model(subparsers) -> None:
    from kevlarflow.model.presets import DTYPE_NAMES, FLAVOURS, PRESETS

    parser = subparsers.add_parser(
        "make-model", help="write a seeded random-weight Hugging Face checkpoint",
        description="Write a random-weight checkpoint (config, safetensors, tokenizer) that "
                    "transformers loads; the same arguments always give the same bytes.")
    parser.add_argument("path", type=Path, help="folder to write (created if needed)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--flavour", choices=sorted(FLAVOURS), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                        help="weight dtype (default: float32 for tiny, bfloat16 otherwise)")
    parser.set_defaults(run=_run_make_model)


# The demo's two settings: a restart on this machine, and on a new node that
# takes 30 s to come up; each instance on cores of its own
# (docs/failover-benchmark.md says why).
DEMO_OPTIONS = ("--out", "demo-results", "--preset", "small", "--pin-instances",
                "--modes", "kevlarflow,restart", "--replacement-delay", "0,30")


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="what `make demo` runs: the failover benchmark's preset, a restart on this "
                     "machine and on a new node (tables, JSON and plots in demo-results/); any "
                     "of its options may follow", add_help=False)
    parser.add_argument("args", nargs=argparse.REMAINDER)

    def run(args):
        from kevlarflow.bench.failover import main as failover
        failover([*DEMO_OPTIONS, *args.args])
        return 0

    parser.set_defaults(run=run)


BENCHMARKS = {"kernels": "kevlarflow.bench.kernels", "throughput": "kevlarflow.bench.throughput",
              "pipeline": "kevlarflow.bench.pipeline", "comm": "kevlarflow.bench.comm",
              "failover": "kevlarflow.bench.failover", "serve": "kevlarflow.bench.serve",
              "simulate": "kevlarflow.bench.simulate", "chaos": "kevlarflow.bench.chaos"}


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (kernels, throughput, pipeline, comm, failover, serve, simulate, chaos)")
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")

    def run(args):
        import importlib
        importlib.import_module(BENCHMARKS[args.benchmark]).main(args.args)
        return 0

    parser.set_defaults(run=run)

def _add_worker(subparsers) -> None:
    from kevlarflow.model.device import device_option

    parser = subparsers.add_parser(
        "worker", help="run one worker of a deployment, registering with its controller",
        description="Start a worker that connects to a running controller, is assigned a "
                    "pipeline stage, loads that stage's weights and serves it.")
    parser.add_argument("--controller", required=True, metavar="HOST:PORT",
                        help="the controller's control socket")
    parser.add_argument("--instance", type=int, default=None,
                        help="ask for this instance (default: any free slot)")
    parser.add_argument("--stage", type=int, default=None, help="ask for this stage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this worker")
    parser.add_argument("--join-token", default=None,
                        help="the deployment's join token (default: $KEVLARFLOW_JOIN_TOKEN; "
                             "prefer the variable: a command line is visible to every user)")
    parser.add_argument("--cpus", default=None, metavar="LIST",
                        help="run on these CPUs only, e.g. 0,1 (default: any)")
    parser.add_argument("--device", default=None, metavar="cpu|cuda:K", type=device_option,
                        help="run on this device (default: the one the controller assigns "
                             "to its slot)")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)

    def run(args):
        if (args.instance is None) != (args.stage is None):
            parser.error("--instance and --stage go together")
        if args.cpus is not None:
            try:
                os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
            except (ValueError, OSError) as exc:
                parser.error(f"--cpus {args.cpus!r}: not a list of this machine's CPUs ({exc})")
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        host, sep, port = args.controller.rpartition(":")
        if not sep or not host or not port.isdigit():
            parser.error(f"--controller must be HOST:PORT, got {args.controller!r}")
        from kevlarflow.deploy.join import TOKEN_ENV, JoinKeys
        from kevlarflow.deploy.worker import main as worker_main
        # Without one the worker is refused, which says clearly why.
        keys = JoinKeys(args.join_token or os.environ.get(TOKEN_ENV, ""))
        return worker_main(args.controller, keys, args.instance, args.stage, args.threads,
                           args.parent_pid, args.device)

    parser.set_defaults(run=run)


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL_PATH at /v1/completions and /v1/chat/completions (plus /health, "
                    "/status, /metrics). With --instances or --pp above 1 the model runs in a "
                    "fault-tolerant deployment of worker processes; else in this process.")
    parser.add_argument("model", help="a Hugging Face checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: MODEL_PATH as given)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $KEVLARFLOW_API_KEY if set)")
    parser.add_argument("--instances", type=int, default=1, help="pipeline instances")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages per instance")
    parser.add_argument("--enable-fault-injection", action="store_true",
                        help="add POST /v1/fault {instance, stage, kind} (kill or hang a worker)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory", type=int, default=256 << 20,
                        help="bytes of KV pool (per worker in a deployment)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:K in this process; a deployment takes cpu or "
                             "cuda (its workers round-robin over the visible GPUs)")
    parser.add_argument("--transport", choices=("auto", "gloo"), default="auto",
                        help="links between a deployment's workers: auto (NCCL between "
                             "workers on distinct GPUs, else Gloo) or gloo everywhere")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on CUDA, run every step eagerly (default: decode steps replay "
                             "CUDA graphs)")
    parser.add_argument("--hang-timeout", type=float, default=1.0,
                        help="seconds of silence before a worker is declared hung")
    parser.add_argument("--recovery", choices=("kevlarflow", "restart"), default="kevlarflow")
    parser.add_argument("--replacement-delay", type=float, default=0.0, metavar="S",
                        help="seconds before a failed worker's replacement can start (a cluster "
                             "provisioning a node; default 0: at once, on this machine)")
    parser.add_argument("--outage-timeout", type=float, default=30.0, metavar="S",
                        help="while some stage has no live worker, requests wait this long for "
                             "one (then recompute), before they fail and new ones get a 503; "
                             "0: fail at once")
    parser.add_argument("--join-token", default=None,
                        help="what workers prove to join (default: $KEVLARFLOW_JOIN_TOKEN, else "
                             "a new random one handed to the workers it starts)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                        help="on SIGTERM or Ctrl-C, how long open requests may go on; then "
                             "they end with an error (a stream: an error event, then [DONE])")
    parser.add_argument("--log-level", default="info")

    def run(args):
        import logging

        if args.instances < 1 or args.pp < 1:
            parser.error("--instances and --pp must be >= 1")
        if not 0 <= args.shutdown_grace < float("inf"):
            parser.error(f"--shutdown-grace must be a number of seconds >= 0, got "
                         f"{args.shutdown_grace}")
        import uvicorn

        from kevlarflow.engine.async_engine import AsyncEngine
        from kevlarflow.engine.llm_engine import EngineConfig
        from kevlarflow.server import build_app
        from kevlarflow.server.shutdown import GracefulServer

        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        common = dict(dtype=args.dtype, block_size=args.block_size,
                      kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      max_model_len=args.max_model_len, device=args.device,
                      enforce_eager=args.enforce_eager)
        # What an engine that cannot start raises: not a checkpoint, one that
        # does not fit, a port taken, workers that never came up.
        start_errors: tuple[type[Exception], ...] = (ValueError, OSError)
        if args.instances * args.pp > 1:
            from kevlarflow.deploy.controller import DeploymentConfig, DeploymentError
            from kevlarflow.deploy.join import TOKEN_ENV
            start_errors += (DeploymentError,)
            config = DeploymentConfig(num_instances=args.instances, pp_size=args.pp,
                                      hang_timeout_s=args.hang_timeout, recovery=args.recovery,
                                      replacement_delay_s=args.replacement_delay,
                                      outage_timeout_s=args.outage_timeout,
                                      join_token=args.join_token or os.environ.get(TOKEN_ENV),
                                      transport=args.transport, **common)
        else:
            config = EngineConfig(**common)
        try:
            config.validate()
        except ValueError as error:
            parser.error(str(error))
        try:
            engine = AsyncEngine(args.model, config)
        except start_errors as error:  # one line, not a traceback
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        api_key = args.api_key if args.api_key is not None else os.environ.get("KEVLARFLOW_API_KEY")
        app = build_app(engine, args.served_model_name or args.model, api_key=api_key,
                        enable_fault_injection=args.enable_fault_injection,
                        max_body_bytes=args.max_body_bytes)
        # SIGTERM/SIGINT: a graceful shutdown (server/shutdown.py); the app's
        # lifespan then stops the engine and reaps a deployment's workers.
        server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port,
                                               log_level=args.log_level),
                                engine, args.shutdown_grace)
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        finally:
            engine.shutdown()  # again if the lifespan did: it is idempotent
        if not server.started:  # e.g. the port is taken: uvicorn logged why
            return 3
        return 0

    parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kevlarflow", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_make_model(subparsers)
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_worker(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # demo and bench hand the rest of the line, as it is, to the tool they
    # run (parsing it here would reorder the options it does not know).
    head = {"demo": 1, "bench": 2}.get(argv[0] if argv else "")
    if head and len(argv) >= head and not {"-h", "--help"} & set(argv[:head]):
        args = parser.parse_args(argv[:head])
        args.args = argv[head:]
    else:
        args = parser.parse_args(argv)
    return args.run(args)
