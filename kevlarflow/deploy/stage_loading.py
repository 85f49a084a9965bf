"""A worker's stage, loaded on its device: checked against the device's free
memory first, then built tensor by tensor, with its KV pool (live blocks,
then the replica blocks) and, on a GPU, its decode graphs."""
from __future__ import annotations

import torch

from kevlarflow.engine.model_runner import ModelRunner
from kevlarflow.model.config import DTYPES, ModelConfig
from kevlarflow.model.device import check_fits
from kevlarflow.model.loader import load_stage, stage_bytes
from kevlarflow.model.stage import StageSpec


def load_runner(m: dict, device: torch.device, name: str) -> ModelRunner:
    """The model runner of the stage an `assign` message gives, on device."""
    cfg = ModelConfig.from_pretrained(m["model"])
    dtype = DTYPES[m["dtype"]] if m["dtype"] else None
    if dtype is not None:
        cfg.dtype = dtype
    spec = StageSpec.split(cfg.num_layers, m["num_stages"], m["stage"])
    # Replica blocks follow the live ones in the same caches: after a
    # failure the controller makes them live blocks without a copy.
    num_blocks = m["num_blocks"] + m["replica_blocks"]
    check_fits(device, stage_bytes(cfg, m["max_model_len"], spec),
               num_blocks * m["block_size"] * spec.kv_bytes_per_token(cfg), f"{name}'s stage")
    stage = load_stage(m["model"], spec, cfg, dtype, progress=False,
                       max_positions=m["max_model_len"], device=device)
    # On a GPU the decode graphs are captured here, before any group or
    # replication thread uses it.
    return ModelRunner(stage, num_blocks, m["block_size"], m["attention_backend"], device,
                       m["max_num_seqs"], m["max_model_len"], m["enforce_eager"])
