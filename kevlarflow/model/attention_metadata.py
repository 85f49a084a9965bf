"""Per-step batch layout shared by every attention layer of a forward pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    positions: torch.Tensor        # int64 [num_tokens]: position of each token in its sequence
    slot_mapping: torch.Tensor     # int64 [num_tokens]: cache slot for each token's K/V (<0: skip)
    block_tables: torch.Tensor     # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor         # int32 [num_seqs]: context length including this chunk
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: chunk offsets into the token batch
    # The longest chunk, known on the host: the engine built these tensors, so
    # the kernels take their contents on trust and read nothing back.
    max_query_len: int
