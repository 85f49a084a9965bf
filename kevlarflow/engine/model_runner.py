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


def attention_metadata(chunks: list[tuple[int, int, list[int]]], block_size: int,
                       device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata of a batch of chunks (number of tokens, position of the first,
    the sequence's block table), in batch order."""
    bs = block_size
    positions, slots, seq_lens, starts = [], [], [], [0]
    max_blocks = max(len(table) for _, _, table in chunks)
    # Entries past a sequence's blocks are padding the kernels never read.
    tables = [table + [0] * (max_blocks - len(table)) for _, _, table in chunks]
    for n, begin, table in chunks:
        end = begin + n
        positions.extend(range(begin, end))
        slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
        seq_lens.append(end)
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device))


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
        chunks = [(n, seq.num_computed_tokens, seq.block_table) for seq, n in batch.items]
        meta = attention_metadata(chunks, self.block_size, self.device)
        input_ids, logits_rows, row = [], [], 0
        for seq, n in batch.items:
            input_ids.extend(seq.token_ids(seq.num_computed_tokens, seq.num_computed_tokens + n))
            row += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                logits_rows.append(row - 1)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        return ids, meta, torch.tensor(logits_rows, dtype=torch.int64, device=self.device)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """fp32 logits [number of sequences to sample, vocab], in batch order."""
        ids, meta, rows = self.prepare(batch)
        return self.stage(ids, meta, self.kv_caches, logits_indices=rows,
                          attention_backend=self.attention_backend)
