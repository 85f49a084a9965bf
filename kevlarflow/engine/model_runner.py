"""Turns a scheduled batch into tensors, runs the model, returns logits."""
from __future__ import annotations

import torch

from kevlarflow.engine.scheduler import ScheduledBatch
from kevlarflow.model.attention_metadata import AttentionMetadata
from kevlarflow.model.stage import DecoderStage


def allocate_kv_cache(stage: DecoderStage, num_blocks: int, block_size: int,
                      device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg = stage.cfg
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=cfg.dtype, device=device),
             torch.zeros(shape, dtype=cfg.dtype, device=device)) for _ in stage.layers]


class ModelRunner:
    def __init__(self, stage: DecoderStage, num_blocks: int, block_size: int,
                 attention_backend: str = "native", device: str = "cpu"):
        self.stage, self.block_size = stage, block_size
        self.device = torch.device(device)
        self.attention_backend = attention_backend
        self.kv_caches = allocate_kv_cache(stage, num_blocks, block_size, self.device)

    def prepare(self, batch: ScheduledBatch):
        """Token ids, attention metadata, and the batch rows whose logits are
        needed: the last token of every chunk that reaches its sequence's end."""
        bs = self.block_size
        input_ids, positions, slots, seq_lens, logits_rows = [], [], [], [], []
        starts = [0]
        max_blocks = max(len(seq.block_table) for seq, _ in batch.items)
        # Entries past a sequence's blocks are padding the kernels never read.
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table))
                  for seq, _ in batch.items]
        for seq, n in batch.items:
            begin, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.token_ids(begin, end))
            positions.extend(range(begin, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            seq_lens.append(end)
            starts.append(starts[-1] + n)
            if end == seq.num_tokens:
                logits_rows.append(starts[-1] - 1)
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=self.device))
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        return ids, meta, torch.tensor(logits_rows, dtype=torch.int64, device=self.device)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """fp32 logits [number of sequences to sample, vocab], in batch order."""
        ids, meta, rows = self.prepare(batch)
        return self.stage(ids, meta, self.kv_caches, logits_indices=rows,
                          attention_backend=self.attention_backend)
