"""The simulator's inputs: what each part of serving and of recovery costs,
and the deployment. Loaded from a JSON file (a flat object of these fields),
from a preset, and overridden field by field from the command line.

Every number of the presets is explained in docs/simulator.md."""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

GB = 1e9
GBIT = 1e9 / 8  # bytes per second of a 1 Gbit/s link


@dataclass(frozen=True)
class Costs:
    # Deployment
    instances: int
    stages: int
    max_num_batched_tokens: int   # token budget of one micro-batch
    max_num_seqs: int             # running sequences per instance
    # Start-up of one worker
    process_start_s: float        # process (or container) up, libraries imported
    worker_init_s: float          # after the weights: KV pool, warm-up, graphs
    weight_bytes_per_stage: float
    weight_load_bytes_per_s: float  # from disk, cache or network, per worker
    comm_build_s: float           # one instance's pipeline communicator
    # Failure detection
    detect_kill_s: float          # the heartbeat socket breaks
    detect_hang_s: float          # heartbeats stop for the hang timeout
    # Links between workers: activations to the next stage, KV to the backup
    link_bytes_per_s: float
    activation_bytes_per_token: float
    kv_bytes_per_token_per_stage: float
    replication_interval_s: float
    # One stage's forward step on a micro-batch: base + per token
    step_base_s: float
    step_prefill_token_s: float
    step_decode_token_s: float    # with its share of attention over the context
    # Cores the workers share (0: each worker has its own device, as on GPUs).
    # A stage step then takes longer by max(1, busy workers / cores).
    cpu_cores: float = 0
    # 1: each instance's workers have cpu_cores / instances cores of their
    # own (`bench failover --pin-instances`); 0: all share all the cores.
    pinned_instances: float = 0
    # Before a failed slot's new process can start (a node provisioned).
    replacement_delay_s: float = 0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"cost {f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"cost {f.name} must not be negative, got {value!r}")
        for name in ("instances", "stages", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if value != int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("weight_load_bytes_per_s", "link_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.step_base_s + self.step_prefill_token_s <= 0 or \
                self.step_base_s + self.step_decode_token_s <= 0:
            raise ValueError("a forward step must cost some time: step_base_s and the per-token "
                             "costs are all zero")

    def stage_step_s(self, prefill_tokens: float, decode_tokens: float) -> float:
        """One stage's step on a micro-batch: the forward pass, or sending its
        activations on if the link is slower (the send overlaps the next step)."""
        compute = self.step_base_s + self.step_prefill_token_s * prefill_tokens \
            + self.step_decode_token_s * decode_tokens
        send = self.activation_bytes_per_token * (prefill_tokens + decode_tokens) \
            / self.link_bytes_per_s
        return max(compute, send)

    def stage_load_s(self) -> float:
        """A fresh worker, from nothing to ready: process, weights, init."""
        return self.process_start_s + self.weight_bytes_per_stage / self.weight_load_bytes_per_s \
            + self.worker_init_s

    def contended(self, factor: float) -> "Costs":
        """The same machine with `factor` times less CPU per worker: when
        workers (and the controller) outnumber the cores, every CPU-bound cost
        grows by that factor (steps, process start and init, loading weights
        from the page cache); links and detection do not."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"a contention factor must be positive, got {factor!r}")
        return replace(self, step_base_s=self.step_base_s * factor,
                       step_prefill_token_s=self.step_prefill_token_s * factor,
                       step_decode_token_s=self.step_decode_token_s * factor,
                       process_start_s=self.process_start_s * factor,
                       worker_init_s=self.worker_init_s * factor,
                       weight_load_bytes_per_s=self.weight_load_bytes_per_s / factor)

    def with_overrides(self, **changes) -> "Costs":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown cost field(s) {sorted(unknown)}; known: "
                             f"{', '.join(f.name for f in fields(self))}")
        # JSON and the command line give ints for the deployment fields as floats sometimes.
        ints = {"instances", "stages", "max_num_batched_tokens", "max_num_seqs"}
        for k in ints & set(changes):
            if isinstance(changes[k], float) and changes[k].is_integer():
                changes[k] = int(changes[k])
        return replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)


FIELDS = tuple(f.name for f in fields(Costs))
REQUIRED = tuple(f.name for f in fields(Costs) if f.default is MISSING)
NOTE_KEY = "note"  # the one extra key a costs file may hold: free text on its origin


def from_dict(data: dict, origin: str = "costs") -> Costs:
    if not isinstance(data, dict):
        raise ValueError(f"{origin}: expected a JSON object of cost fields, got {type(data).__name__}")
    values = {k: v for k, v in data.items() if k != NOTE_KEY}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"{origin}: unknown field(s) {unknown}")
    missing = [f for f in REQUIRED if f not in values]
    if missing:
        raise ValueError(f"{origin}: missing field(s) {missing}")
    try:
        return Costs(**values)
    except ValueError as exc:
        raise ValueError(f"{origin}: {exc}") from None


def read_json(path: str | Path, what: str):
    """A JSON file's contents; what cannot be read is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def load_file(path: str | Path) -> Costs:
    return from_dict(read_json(path, "costs file"), str(path))


def save_file(costs: Costs, path: str | Path, note: str = "") -> None:
    data = costs.to_json()
    if note:
        data[NOTE_KEY] = note
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def local_costs_path() -> Path:
    """Where --calibrate keeps this machine's costs for `--costs local`."""
    root = Path(os.environ.get("KEVLARFLOW_CACHE", Path.home() / ".cache" / "kevlarflow"))
    return root / "sim-costs-local.json"


# Llama-3.1-8B: 32 layers, hidden 4096, 8 KV heads x 128, bf16; 8.03e9 parameters.
_LLAMA8B_KV_PER_TOKEN_PER_STAGE = 2 * 32 * 8 * 128 * 2 / 4   # 4 stages
# Llama-3-70B: 80 layers, hidden 8192, 8 KV heads x 128, bf16; 70.6e9 parameters.
_LLAMA70B_KV_PER_TOKEN_PER_STAGE = 2 * 80 * 8 * 128 * 2 / 4

PRESETS = {
    # The paper's setting: Llama-3.1-8B, 4 stages of one A100/H100-class GPU
    # each, every worker on its own node, nodes linked at 1 Gbit/s.
    "paper": Costs(
        instances=2, stages=4, max_num_batched_tokens=512, max_num_seqs=256,
        process_start_s=60.0,          # container start, CUDA context, imports
        worker_init_s=60.0,            # NCCL/engine init, KV profiling, CUDA graph capture
        weight_bytes_per_stage=16.06 * GB / 4,
        weight_load_bytes_per_s=1 * GBIT,  # a restart fetches its stage over the 1 Gbit/s network
        comm_build_s=2.0,              # one NCCL communicator over TCP
        detect_kill_s=0.1, detect_hang_s=1.0,
        link_bytes_per_s=1 * GBIT,
        activation_bytes_per_token=4096 * 2,
        kv_bytes_per_token_per_stage=_LLAMA8B_KV_PER_TOKEN_PER_STAGE,
        replication_interval_s=0.5,
        # A quarter of 8B is 2e9 parameters, 4 GB bf16, read once a step at
        # ~2 TB/s: ~2 ms, ~4 ms with launches and sampling; 4 GFLOP per token
        # at ~400 TFLOP/s (an H100 at ~40% of its dense bf16 peak): ~10 us;
        # a decode token also reads its context's KV (~32 KB per token of it).
        step_base_s=4e-3, step_prefill_token_s=10e-6, step_decode_token_s=15e-6),
    # Llama-3-70B, 4 stages of 8 GPUs each (tensor parallel inside a node over
    # NVLink), nodes linked by 200 Gbit/s InfiniBand.
    "70b": Costs(
        instances=2, stages=4, max_num_batched_tokens=512, max_num_seqs=256,
        process_start_s=60.0, worker_init_s=90.0,
        weight_bytes_per_stage=141.2 * GB / 4,
        weight_load_bytes_per_s=200 * GBIT,   # fetched from a peer or store over InfiniBand
        comm_build_s=5.0,                     # TP (8 ranks) and PP communicators
        detect_kill_s=0.1, detect_hang_s=1.0,
        link_bytes_per_s=200 * GBIT,
        activation_bytes_per_token=8192 * 2,
        kv_bytes_per_token_per_stage=_LLAMA70B_KV_PER_TOKEN_PER_STAGE,
        replication_interval_s=0.5,
        # 35 GB per stage over 8 GPUs: 4.4 GB each at ~2 TB/s plus all-reduces: ~5 ms;
        # ~35 GFLOP per token per stage over 8 GPUs at ~400 TFLOP/s each: ~11 us,
        # ~15 us with the all-reduces.
        step_base_s=5e-3, step_prefill_token_s=15e-6, step_decode_token_s=20e-6),
}


def resolve(spec: str) -> Costs:
    """A preset name, "local" (this machine, written by --calibrate), or a file."""
    if spec in PRESETS:
        return PRESETS[spec]
    if spec == "local":
        path = local_costs_path()
        if not path.is_file():
            raise ValueError(f"no calibrated costs at {path}: run `kevlarflow bench simulate "
                             "--calibrate` first")
        return load_file(path)
    if not Path(spec).is_file():
        raise ValueError(f"--costs {spec!r}: not a preset ({', '.join(sorted(PRESETS))}, local) "
                         "nor an existing file")
    return load_file(spec)


def parse_override(text: str) -> tuple[str, float]:
    """FIELD=VALUE from --set."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE")
    if name not in FIELDS:
        raise ValueError(f"--set {text!r}: unknown field {name!r}; known: {', '.join(FIELDS)}")
    try:
        return name, float(value)
    except ValueError:
        raise ValueError(f"--set {text!r}: {value!r} is not a number") from None
