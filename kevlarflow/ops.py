"""Python entry points of the native ops (torch.ops.kevlarflow.*).

Importing this module loads the extension, which registers the ops and their
CPU (and, in a CUDA build, CUDA) kernels; the fake implementations below give
their output shapes to torch.compile without running them.
"""
from __future__ import annotations

import torch

from kevlarflow import _C  # noqa: F401  (registers the ops)

ATTENTION_BACKENDS = ("native", "triton")


def _check_one_device(op: str, *tensors) -> None:
    """The fakes see mixed-device calls first (a meta tensor routes the whole
    call to them), so they reject them as the kernels would."""
    flat = [t for x in tensors for t in (x if isinstance(x, (list, tuple)) else [x])]
    devices = {t.device for t in flat}
    if len(devices) > 1:
        raise RuntimeError(f"{op} needs all tensors on one device, got {sorted(map(str, devices))}")


@torch.library.register_fake("kevlarflow::paged_attention")
def _paged_attention_fake(query, key_cache, value_cache, block_tables, seq_lens,
                          query_start_loc, scale, sliding_window=0, max_query_len=-1):
    _check_one_device("paged_attention", query, key_cache, value_cache, block_tables, seq_lens,
                      query_start_loc)
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.register_fake("kevlarflow::reshape_and_cache")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping, trusted=False):
    _check_one_device("reshape_and_cache", key, value, key_cache, value_cache, slot_mapping)


@torch.library.register_fake("kevlarflow::copy_blocks")
def _copy_blocks_fake(caches, block_mapping):
    _check_one_device("copy_blocks", caches, block_mapping)


def _check_staging_device(op: str, caches, block_ids, staging) -> None:
    _check_one_device(op, caches, block_ids)
    if staging.device != caches[0].device and not (caches[0].is_cuda and staging.is_cpu):
        raise RuntimeError(f"{op} needs all tensors on one device (or a pinned host "
                           f"staging buffer for CUDA caches), got {staging.device}")


@torch.library.register_fake("kevlarflow::pack_blocks")
def _pack_blocks_fake(caches, block_ids, staging):
    _check_staging_device("pack_blocks", caches, block_ids, staging)


@torch.library.register_fake("kevlarflow::unpack_blocks")
def _unpack_blocks_fake(staging, block_ids, caches):
    _check_staging_device("unpack_blocks", caches, block_ids, staging)


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                    scale: float, sliding_window: int = 0, backend: str = "native",
                    max_query_len: int | None = None):
    """Attention of a mixed batch of decode and prefill-with-context chunks.

    See csrc/kernels/paged_attention.h for the layout. backend "triton" runs
    the Triton kernel (GPU, or CPU under TRITON_INTERPRET=1).

    max_query_len: the longest chunk, from a caller that built the batch and
    vouches for the index tensors' contents (the engine). Then nothing is
    read back from them: no device synchronisation on a GPU. None: their
    contents are checked on a host copy, and a bad one raises.
    """
    if backend == "native":
        return torch.ops.kevlarflow.paged_attention(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
            float(scale), int(sliding_window), -1 if max_query_len is None else int(max_query_len))
    if backend == "triton":
        from kevlarflow.triton import paged_attention_triton
        return paged_attention_triton(query, key_cache, value_cache, block_tables, seq_lens,
                                      query_start_loc, float(scale), int(sliding_window),
                                      max_query_len=max_query_len)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                      trusted: bool = False) -> None:
    """Write each token's K/V row into its cache slot; slots < 0 are skipped.
    trusted: the caller vouches for slot_mapping (inside the cache, no slot
    twice), which is then not read back (no device synchronisation)."""
    torch.ops.kevlarflow.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                                           bool(trusted))


def copy_blocks(caches: list[torch.Tensor], block_mapping: torch.Tensor) -> None:
    """Copy block src -> dst in every cache for each row (src, dst) of block_mapping."""
    torch.ops.kevlarflow.copy_blocks(caches, block_mapping)


def staging_shape(caches: list[torch.Tensor], num_blocks: int) -> tuple[int, ...]:
    """Shape of the staging buffer for num_blocks blocks: block-major, so any run
    of consecutive blocks is one contiguous slice of it."""
    return (num_blocks, len(caches), *caches[0].shape[1:])


def pack_blocks(caches: list[torch.Tensor], block_ids: torch.Tensor,
                staging: torch.Tensor | None = None) -> torch.Tensor:
    """Gather blocks block_ids of every cache into one contiguous buffer.

    Pass staging to reuse a buffer (a pinned host buffer for CUDA caches works);
    otherwise one is allocated next to the caches."""
    if staging is None:
        staging = torch.empty(staging_shape(caches, block_ids.numel()),
                              dtype=caches[0].dtype, device=caches[0].device)
    torch.ops.kevlarflow.pack_blocks(caches, block_ids, staging)
    return staging


def unpack_blocks(staging: torch.Tensor, block_ids: torch.Tensor,
                  caches: list[torch.Tensor]) -> None:
    """Scatter a staging buffer from pack_blocks into blocks block_ids (distinct)."""
    torch.ops.kevlarflow.unpack_blocks(staging, block_ids, caches)
