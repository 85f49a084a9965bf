"""CUDA kernels against the reference. Marked gpu: skipped without CUDA."""
import pytest
import torch

from kevlarflow import ops, reference
from helpers.kv_batches import TOLERANCES, make_batch

pytestmark = pytest.mark.gpu


def to_cuda(batch):
    for name in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                 "query_start_loc"):
        setattr(batch, name, getattr(batch, name).cuda())
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("window", [0, 50])
def test_cuda_paged_attention(dtype, head_dim, block_size, window):
    batch = to_cuda(make_batch([1, 37, 64, 90, 16, 700], [1, 37, 1, 13, 0, 200], 8, 2, head_dim,
                               block_size, dtype=dtype, seed=head_dim))
    out = ops.paged_attention(*batch.args(), sliding_window=window)
    expected = reference.paged_attention(*batch.args(), sliding_window=window)
    assert torch.isfinite(out).all()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_decode_matches_cpu_kernel(backend):
    batch = make_batch([2048, 100, 1], [1, 1, 1], 32, 8, 128, 16, dtype=torch.float32)
    cpu = ops.paged_attention(*batch.args())
    gpu = ops.paged_attention(*to_cuda(batch).args(), backend=backend)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-5, rtol=1e-4)


def test_cuda_cache_ops_bit_exact():
    caches = [torch.randn(50, 16, 2, 64, device="cuda").to(torch.bfloat16) for _ in range(4)]
    ids = torch.tensor([3, 49, 0, 17], device="cuda")
    staging = ops.pack_blocks(caches, ids)
    assert torch.equal(staging, reference.pack_blocks(caches, ids))
    pinned = torch.empty(staging.shape, dtype=staging.dtype, pin_memory=True)
    ops.pack_blocks(caches, ids, pinned)  # device kernel writes host memory
    torch.cuda.synchronize()
    assert torch.equal(pinned, staging.cpu())
    other = [torch.zeros_like(c) for c in caches]
    ops.unpack_blocks(pinned, ids, other)
    torch.cuda.synchronize()
    assert all(torch.equal(o[ids], c[ids]) for o, c in zip(other, caches))
    mapping = torch.tensor([[3, 4], [49, 5]], device="cuda")
    expected = [c.clone() for c in caches]
    reference.copy_blocks(expected, mapping)
    ops.copy_blocks(caches, mapping)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))
    key = torch.randn(5, 2, 64, device="cuda").to(torch.bfloat16)
    slots = torch.tensor([0, -1, 799, 33, 2], device="cuda")
    kc, vc = caches[0].clone(), caches[1].clone()
    ek, ev = kc.clone(), vc.clone()
    reference.reshape_and_cache(key, key, ek, ev, slots)
    ops.reshape_and_cache(key, key, kc, vc, slots)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


def test_cuda_rejects_mixed_devices():
    batch = to_cuda(make_batch([20, 9], [1, 9], 4, 2, 64, 8))
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.paged_attention(batch.query, batch.key_cache, batch.value_cache,
                            batch.block_tables.cpu(), batch.seq_lens, batch.query_start_loc,
                            batch.scale)
    caches = [torch.zeros(4, 8, 2, 16, device="cuda")]
    with pytest.raises(RuntimeError, match="must be pinned"):
        ops.pack_blocks(caches, torch.tensor([1], device="cuda"), torch.empty(1, 1, 8, 2, 16))
