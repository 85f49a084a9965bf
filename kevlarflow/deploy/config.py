"""The configuration of a deployment, and the size of each stage's KV pools."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from kevlarflow.comm.backend_choice import TRANSPORTS
from kevlarflow.deploy.devices import slot_devices
from kevlarflow.engine.llm_engine import EngineConfig
from kevlarflow.model.config import ModelConfig
from kevlarflow.model.stage import StageSpec

RECOVERY_MODES = ("kevlarflow", "restart")


@dataclass
class DeploymentConfig(EngineConfig):
    """EngineConfig's fields apply per worker (kv_cache_memory is each
    worker's pool) and per instance (batching limits)."""
    num_instances: int = 1
    pp_size: int = 1
    host: str = "127.0.0.1"         # where the controller listens (0.0.0.0: every interface)
    port: int = 0                   # control socket; 0 picks a free port
    store_port: int = 0             # rendezvous store; 0 picks a free port
    spawn_workers: bool = True      # False: wait for `kevlarflow worker --controller HOST:PORT`
    # What lets a worker join (None: a new random token, which only the
    # workers this controller spawns are given; see deploy/join.py).
    join_token: str | None = field(default=None, repr=False)
    worker_threads: int = 1         # torch threads per worker
    # CPUs the workers this controller spawns run on, one set per instance
    # (instance i takes set i mod len): each instance on hardware of its own,
    # as on a cluster where a worker owns its GPU. None: not pinned.
    instance_cpus: tuple[tuple[int, ...], ...] | None = None
    comm_deadline_s: float = 30.0   # bound on every communicator operation
    start_timeout_s: float = 600.0  # for all workers to register, load and connect
    max_in_flight: int | None = None  # micro-batches in flight per instance (default pp_size)
    recovery: str = "kevlarflow"    # or "restart": the baseline of today's stacks
    heartbeat_s: float = 0.1        # interval of worker heartbeats
    hang_timeout_s: float = 1.0     # a worker silent this long is declared hung
    # How long a failed slot waits before a new process for it can start: 0
    # restarts on the same machine at once; a cluster provisions a node.
    replacement_delay_s: float = 0.0
    # When some stage has no live worker at all, the requests of the
    # instances that cannot run wait this long for one (they recompute from
    # scratch once it has joined) and new requests are queued too; then they
    # fail and new ones are refused until a worker joins. 0: fail at once.
    outage_timeout_s: float = 30.0
    # KV replication to the backup worker (recovery="kevlarflow", two or more
    # instances): each worker's replica pool in bytes (None: as large as its
    # live pool, kv_cache_memory; 0: no replication), the most bytes one
    # transfer carries, and the least time between two transfers of a worker
    # (the KV of the steps in between is sent once, coalesced: fewer, larger
    # transfers cost less; a failure recomputes about an interval of tokens).
    replica_memory: int | None = None
    replication_transfer_bytes: int = 16 << 20
    replication_interval_s: float = 0.5
    # device ("cpu" or "cuda") applies to every worker: on "cuda" they go
    # round-robin over the visible GPUs, unless devices names one per slot
    # ("cuda:K", instance by instance). transport "auto" links workers on
    # distinct GPUs with NCCL and the rest with Gloo through host memory;
    # "gloo" always the latter (comm/backend_choice.py).
    devices: tuple[str, ...] | None = None
    transport: str = "auto"

    def validate(self) -> None:
        super().validate()
        for name in ("num_instances", "pp_size", "worker_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.instance_cpus is not None:
            allowed = _usable_cpus()
            if not self.instance_cpus or not all(
                    cpus and all(isinstance(c, int) and c in allowed for c in cpus)
                    for cpus in self.instance_cpus):
                raise ValueError(f"instance_cpus must be non-empty sets of this machine's usable "
                                 f"CPUs {sorted(allowed)}, got {self.instance_cpus!r}")
        if self.max_in_flight is not None and (not isinstance(self.max_in_flight, int)
                                               or self.max_in_flight < 1):
            raise ValueError(f"max_in_flight must be None or a positive int, got {self.max_in_flight!r}")
        if not (0 < self.comm_deadline_s and 0 < self.start_timeout_s):
            raise ValueError("comm_deadline_s and start_timeout_s must be positive")
        if self.recovery not in RECOVERY_MODES:
            raise ValueError(f"recovery must be one of {RECOVERY_MODES}, got {self.recovery!r}")
        if self.join_token is not None and (not isinstance(self.join_token, str)
                                            or len(self.join_token) < 16):
            raise ValueError("join_token must be None or a str of at least 16 characters")
        if not (isinstance(self.replacement_delay_s, (int, float))
                and 0 <= self.replacement_delay_s < float("inf")):
            raise ValueError("replacement_delay_s must be a finite number of seconds >= 0, got "
                             f"{self.replacement_delay_s!r}")
        if not (isinstance(self.outage_timeout_s, (int, float))
                and 0 <= self.outage_timeout_s < float("inf")):
            raise ValueError("outage_timeout_s must be a finite number of seconds >= 0, got "
                             f"{self.outage_timeout_s!r}")
        if not (0 < self.heartbeat_s < self.hang_timeout_s):
            raise ValueError("need 0 < heartbeat_s < hang_timeout_s")
        if self.replica_memory is not None and (not isinstance(self.replica_memory, int)
                                                or self.replica_memory < 0):
            raise ValueError(f"replica_memory must be None or bytes >= 0, got {self.replica_memory!r}")
        if not isinstance(self.replication_transfer_bytes, int) or self.replication_transfer_bytes < 1:
            raise ValueError("replication_transfer_bytes must be a positive int, got "
                             f"{self.replication_transfer_bytes!r}")
        if not (isinstance(self.replication_interval_s, (int, float))
                and 0 <= self.replication_interval_s <= 10):
            raise ValueError("replication_interval_s must be in [0, 10] seconds, got "
                             f"{self.replication_interval_s!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")

    def check_device(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"a deployment's device is 'cpu' or 'cuda' (per-slot GPUs go in "
                             f"devices), got {self.device!r}")
        if self.devices is not None and self.device != "cuda" and \
                any(d != "cpu" for d in self.devices):
            raise ValueError("devices names GPUs: set device='cuda' too")
        if self.spawn_workers:  # else the workers' machines have the GPUs, not this one
            super().check_device()
            self.slot_devices()  # refuses what cannot be placed

    def slot_devices(self) -> list[str]:
        """Each worker slot's device, instance by instance. Workers started
        elsewhere (spawn_workers=False) on "cuda" take their machine's
        current GPU unless they name one (`kevlarflow worker --device`)."""
        slots = self.num_instances * self.pp_size
        if self.device == "cuda" and not self.spawn_workers:
            # Their machines have the GPUs: each worker checks its own device.
            return list(self.devices) if self.devices is not None else ["cuda"] * slots
        visible = torch.cuda.device_count() if self.device == "cuda" else 0
        return slot_devices(self.device, slots, visible, self.devices)


@dataclass
class StagePools:
    """Per stage: blocks of each worker's live pool, bytes of one block, and
    blocks of its replica pool (0 without replication)."""
    live_blocks: list[int]
    block_bytes: list[int]
    replica_blocks: list[int]

    @classmethod
    def of(cls, config: DeploymentConfig, cfg: ModelConfig) -> "StagePools":
        """kv_cache_memory (and replica_memory) bytes for each stage's layers only."""
        bs = config.block_size
        replicate = config.recovery == "kevlarflow" and config.num_instances > 1
        replica_memory = config.kv_cache_memory if config.replica_memory is None \
            else config.replica_memory
        pools = cls([], [], [])
        for s in range(config.pp_size):
            spec = StageSpec.split(cfg.num_layers, config.pp_size, s)
            per_token = spec.kv_bytes_per_token(cfg)
            pools.live_blocks.append(config.kv_cache_memory // (bs * per_token))
            pools.block_bytes.append(bs * per_token)
            pools.replica_blocks.append(replica_memory // (bs * per_token) if replicate else 0)
        if any(pools.replica_blocks) and \
                config.replication_transfer_bytes < max(pools.block_bytes):
            raise ValueError(f"replication_transfer_bytes={config.replication_transfer_bytes} is "
                             f"below one KV block ({max(pools.block_bytes)} bytes)")
        if min(pools.live_blocks) < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of {bs} "
                             f"tokens on some stage")
        return pools


def _usable_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))
