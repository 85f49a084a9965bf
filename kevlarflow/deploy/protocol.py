"""Control-plane messages: msgpack maps checked against an explicit schema.

Never pickle: a peer that can reach the socket can then only send data, and
data that does not match the schema for its direction is rejected with a
ProtocolError before anything acts on it. A message is {"type": name, ...}
with exactly the fields its schema names.

Spec grammar: int, float (an int is accepted), str, bool; Opt(spec) (or None);
[spec] (a list of any length); (spec, spec, ...) (a list of that length);
{field: spec} (a map with exactly those fields)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 64 << 20  # far above any real step; bounds what a peer can make us hold


class ProtocolError(ValueError):
    """Bytes that are not a valid message for this side of the socket."""


@dataclass(frozen=True)
class Opt:
    spec: Any


_SAMPLING = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
             "seed": Opt(int), "index": int, "logprobs": Opt(int)}

# A worker's replication work so far (replication.worker.WorkerReplication.totals).
REPLICATION_TOTALS = {"bytes_sent": int, "bytes_received": int, "pack_s": float,
                      "send_s": float, "unpack_s": float}

# Worker -> controller.
TO_CONTROLLER = {
    "register": {"pid": int, "host": str, "instance": Opt(int), "stage": Opt(int)},
    # checkpoint: model/fingerprint.encode() of what it loaded.
    # device: where it loaded ("cpu", "cuda:K"); nccl: NCCL works in its process.
    "ready": {"worker": str, "load_s": float, "num_blocks": int, "checkpoint": str,
              "device": str, "nccl": bool},
    # A build that connected, or could not (a member missing, dead, or the
    # generation called off); a generation that was aborted is not reported.
    # Sent by the build's thread on a socket of its own, hence the name.
    "group_ready": {"worker": str, "group": str, "generation": int},
    "group_failed": {"worker": str, "group": str, "generation": int, "message": str},
    # Tokens sampled by a last stage, in the order of the step's sampled rows.
    "result": {"step": int, "tokens": [int], "logprobs": [Opt((float, [(int, float)]))]},
    "error": {"step": Opt(int), "kind": str, "message": str},
    # From a worker's heartbeat thread, on a socket of its own, every interval;
    # with its replicator's running totals once it has one (replication.worker).
    "heartbeat": {"worker": str, "replication": Opt(REPLICATION_TOTALS)},
    # From a backup's receiver thread: the KV these steps wrote at the source
    # (the other member of the link group) is now in the backup's replica blocks.
    "replicated": {"worker": str, "group": str, "generation": int, "steps": [int]},
}

# Controller -> worker.
TO_WORKER = {
    "assign": {"worker": str, "instance": int, "stage": int, "num_stages": int, "model": str,
               "dtype": Opt(str), "block_size": int, "num_blocks": int, "max_model_len": int,
               "store_port": int, "store_prefix": str, "deadline_s": float,
               "attention_backend": str, "threads": int,
               "heartbeat_s": float, "replica_blocks": int, "replication_transfer_bytes": int,
               "replication_interval_s": float, "device": str,
               # Decode steps of up to max_num_seqs sequences replay CUDA
               # graphs on a GPU, unless enforce_eager.
               "max_num_seqs": int, "enforce_eager": bool},
    # backend: "gloo" or "nccl" (comm/backend_choice.py).
    "build_group": {"group": str, "members": [str], "generation": int, "backend": str},
    # To the heartbeat socket, so that it acts even while the worker is blocked
    # in an op of that group: abort that generation (built or being built);
    # its queued steps are then skipped.
    "abort_group": {"group": str, "generation": int},
    # Leave a group for good; sent before its replica blocks become live.
    "leave_group": {"group": str},
    # Send the replicas pending on this worker's link now: an instance it
    # lends to drains, and waits for them to move back.
    "flush_replication": {},
    # One micro-batch for one stage. seqs: (tokens this step, first position,
    # this stage's block table). token_ids on the first stage only; sample on
    # the last only: one entry per sequence whose last token is computed now.
    # replicate: (block, backup's block, first row, end row): the rows of each
    # block to copy to the backup afterwards. priority: a step of an instance
    # that has not completed one since a failure (read_ahead.next_index).
    "step": {"step": int, "group": str, "generation": int, "seqs": [(int, int, [int])],
             "token_ids": Opt([int]),
             "sample": Opt([Opt(_SAMPLING)]),
             "replicate": Opt([(int, int, int, int)]), "priority": bool},
    "shutdown": {},
    # This worker may not serve (it loaded another checkpoint): it exits.
    "refused": {"reason": str},
}


def encode(schema: dict, type_: str, **fields) -> bytes:
    """Check fields against the schema and pack them; a bug of ours, not a peer's,
    if this raises."""
    message = {"type": type_, **fields}
    _check_message(schema, message)
    return msgpack.packb(message, use_bin_type=True)


def decode(schema: dict, data: bytes) -> dict:
    """The message in data, or ProtocolError saying what is wrong with it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as error:  # msgpack raises several types for bad bytes
        raise ProtocolError(f"not msgpack: {error}") from None
    _check_message(schema, message)
    return message


def _check_message(schema: dict, message: Any) -> None:
    if not isinstance(message, dict):
        raise ProtocolError(f"a message is a map, got {type(message).__name__}")
    type_ = message.get("type")
    if not isinstance(type_, str) or type_ not in schema:
        raise ProtocolError(f"unknown message type {type_!r}; expected one of {sorted(schema)}")
    fields = {k: v for k, v in message.items() if k != "type"}
    _check(schema[type_], fields, type_)


def _check(spec: Any, value: Any, where: str) -> None:
    if isinstance(spec, Opt):
        if value is not None:
            _check(spec.spec, value, where)
    elif spec is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
    elif spec in (int, str, bool):
        if not isinstance(value, spec) or (spec is int and isinstance(value, bool)):
            raise ProtocolError(f"{where}: expected {spec.__name__}, got {type(value).__name__}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check(spec[0], item, f"{where}[{i}]")
    elif isinstance(spec, tuple):
        if not isinstance(value, list) or len(value) != len(spec):
            raise ProtocolError(f"{where}: expected a list of {len(spec)}, got {value!r:.80}")
        for i, (item_spec, item) in enumerate(zip(spec, value)):
            _check(item_spec, item, f"{where}[{i}]")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        if set(value) != set(spec):
            missing, extra = sorted(set(spec) - set(value)), sorted(map(str, set(value) - set(spec)))
            raise ProtocolError(f"{where}: missing fields {missing}, unexpected fields {extra}")
        for key, item_spec in spec.items():
            _check(item_spec, value[key], f"{where}.{key}")
    else:  # pragma: no cover - a schema bug
        raise TypeError(f"bad spec {spec!r}")
