"""Turns a scheduled batch into tensors, runs the model, returns logits."""
from __future__ import annotations

import logging

import torch

from kevlarflow.engine.cuda_graphs import MAX_GRAPH_CONTEXT, GraphedDecode
from kevlarflow.engine.scheduler import ScheduledBatch
from kevlarflow.model.attention_metadata import AttentionMetadata
from kevlarflow.model.stage import DecoderStage

log = logging.getLogger("kevlarflow.engine")


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
    # Two tensors, views of which are the fields: on a GPU two uploads from
    # pinned memory, queued on the stream, where one per field from pageable
    # memory would each wait for the GPU to catch up.
    longs = upload(torch.tensor(positions + slots, dtype=torch.int64), device)
    ints = upload(torch.tensor([b for table in tables for b in table] + seq_lens + starts,
                               dtype=torch.int32), device)
    n, s, table_size = len(positions), len(chunks), len(chunks) * max_blocks
    return AttentionMetadata(
        positions=longs[:n], slot_mapping=longs[n:],
        block_tables=ints[:table_size].view(s, max_blocks),
        seq_lens=ints[table_size:table_size + s], query_start_loc=ints[table_size + s:],
        max_query_len=max(n for n, _, _ in chunks))


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory, without the
    host waiting (torch's pinned allocator keeps the buffer until the copy
    is done)."""
    device = torch.device(device)
    if host.device == device:
        return host
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def sample_rows(chunk_tokens: list[int], samples: list[bool],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows of a batch of chunks whose logits are needed: the last token of
    each chunk that is sampled."""
    ends = torch.tensor(chunk_tokens, dtype=torch.int64).cumsum(0) - 1
    return ends[torch.tensor(samples, dtype=torch.bool)].to(device)


class ModelRunner:
    """One stage of a model (the whole model in the in-process engine) on a
    paged KV cache: the one path from a batch of chunks to the kernels, for
    the in-process engine and for a deployment's workers alike.

    On CUDA, unless enforce_eager, pure decode steps of up to max_num_seqs
    sequences, at contexts up to MAX_GRAPH_CONTEXT, replay CUDA graphs (engine/cuda_graphs.py), all captured here,
    at start: a capture later would stall the step that needs it, and in a
    worker would run while other threads use the GPU. Every other step (and
    every step on the CPU) runs eagerly."""

    def __init__(self, stage: DecoderStage, num_blocks: int, block_size: int,
                 attention_backend: str = "native", device: str = "cpu",
                 max_num_seqs: int = 64, max_model_len: int | None = None,
                 enforce_eager: bool = False):
        self.stage, self.block_size = stage, block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.attention_backend = attention_backend
        self.kv_caches = allocate_kv_cache(stage, num_blocks, block_size, self.device)
        self.decode_graphs: GraphedDecode | None = None
        if self.device.type == "cuda" and not enforce_eager:
            self.decode_graphs = GraphedDecode(
                stage, self.kv_caches, block_size, max_num_seqs,
                min(max_model_len or stage.layers[0].self_attn.rope.max_positions,
                    MAX_GRAPH_CONTEXT), attention_backend)
            try:
                self.decode_graphs.capture()
            except RuntimeError as error:
                # A step that cannot be captured is a bug to fix, not a reason
                # to stop serving: said loudly, and every step runs eagerly.
                log.error("decode steps run eagerly: capturing their CUDA graphs failed: %s",
                          error)
                self.decode_graphs = None

    def forward(self, inputs: torch.Tensor, chunks: list[tuple[int, int, list[int]]],
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: token ids (first stage) or hidden states, one row per token
        of the chunks (tokens, first position, block table), in batch order,
        on the host or the runner's device. The last stage returns fp32 logits
        of the given rows; the others their hidden states."""
        if self.decode_graphs is not None:
            out = self.decode_graphs(inputs, chunks, rows)
            if out is not None:
                return out
        meta = attention_metadata(chunks, self.block_size, self.device)
        if rows is not None:
            rows = upload(rows, self.device)
        return self.stage(upload(inputs, self.device), meta, self.kv_caches, logits_indices=rows,
                          attention_backend=self.attention_backend)

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """fp32 logits [number of sequences to sample, vocab], in batch order."""
        ids = [t for seq, n in batch.items
               for t in seq.token_ids(seq.num_computed_tokens, seq.num_computed_tokens + n)]
        # On the host: the decode graphs copy them without a synchronisation.
        rows = sample_rows([n for _, n in batch.items], batch.samples())
        return self.forward(torch.tensor(ids, dtype=torch.int64), batch.chunks(), rows)
