"""The KV replicator with CUDA caches (marked gpu: skipped without CUDA):
blocks and spans arrive bit-exact over a real gloo link between two
processes, CUDA to CUDA and across devices (the staging layout is the CPU
packer's); a pack waits for KV writes still queued on the compute stream, on
one stream or several, without the submitting thread waiting; caches the
replicator cannot take are refused with a message."""
from __future__ import annotations

import pytest
import torch

from helpers import replicator_scenarios as sc
from helpers.comm_workers import Workers
from kevlarflow import _C, _comm

pytestmark = pytest.mark.gpu

SOURCE, BACKUP = "w0.0", "w0.1"
# About a second of GPU time (torch.cuda._sleep spins for this many cycles).
SLEEP_CYCLES = 2_000_000_000


def _spans(num_blocks, block_rows):
    """(step, src, dst, begin, end): a step of many one-row spans (one
    transfer holds hundreds of them), whole blocks, and spans of several
    rows, one of them resubmitted so that rows coalesce."""
    ones = list(range(0, num_blocks // 2, 2))
    one_row = (1, ones, [num_blocks - 1 - b for b in ones],
               [b % block_rows for b in ones], [b % block_rows + 1 for b in ones])
    whole = (2, [1, 5, 9], [0, 2, 4], [0, 0, 0], [block_rows] * 3)
    several = (5, [3, 7], [6, 8], [2, 0], [block_rows - 1, 5])
    again = (6, [3], [6], [block_rows - 1], [block_rows])  # the rest of block 3
    return [one_row, whole, several, again]


@pytest.mark.parametrize("source_device,backup_device",
                         [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize("shape,dtype", [((512, 16, 2, 64), "bfloat16"),
                                         ((64, 8, 1, 3), "float16")],
                         ids=["wide-rows", "odd-rows"])
def test_cuda_caches_replicate_bit_exact(shape, dtype, source_device, backup_device):
    steps = _spans(shape[0], shape[1])
    with Workers(2, sc.cuda_copies_spans, shape=shape, dtype=dtype, steps=steps,
                 source_device=source_device, backup_device=backup_device) as w:
        out = w.collect(w.members, timeout_s=120.0)
    src, dst = out[SOURCE], out[BACKUP]
    assert src["accepted"] == [True] * len(steps) and src["stats"]["error"] == ""
    assert dst["acked"] == [step for step, *_ in steps]
    sent = {}
    for _, s_ids, d_ids, begin, end in steps:
        for s, d, b, e in zip(s_ids, d_ids, begin, end):
            sent.update({(d, r): (s, r) for r in range(b, e)})
    sc.check_rows_arrived(src["rows"], dst["rows"], sent)


@pytest.mark.parametrize("streams", ["default", "side", "two"])
def test_a_pack_waits_for_writes_still_queued(streams):
    with Workers(2, sc.cuda_pending_write, streams=streams, sleep_cycles=SLEEP_CYCLES) as w:
        out = w.collect(w.members, timeout_s=120.0)
    src, dst = out[SOURCE], out[BACKUP]
    # The premise: the write was still queued when submit returned, and
    # submit did not wait for it.
    assert src["pending"], "the GPU finished the write before submit returned: sleep longer"
    assert src["submit_s"] < 0.25, src["submit_s"]
    assert src["stats"]["error"] == ""
    assert dst["calls"] == [[1], [2, 3] if streams == "two" else [2]]
    assert dst["blocks"][5] == src["blocks"][3] and any(src["blocks"][3])
    if streams == "two":
        assert dst["blocks"][6] == src["blocks"][4] and any(src["blocks"][4])
    assert not any(dst["blocks"][0])


# ---- one process ------------------------------------------------------------

def test_cuda_caches_accepted_or_refused_with_a_message(solo):
    caches = [torch.zeros(8, 2, 4, device="cuda") for _ in range(4)]
    if not _C.built_with_cuda:  # a CPU build of kevlarflow against a CUDA torch
        with pytest.raises(ValueError, match="built without CUDA"):
            _comm.KVReplicator(solo._core, caches, 1 << 20, 1.0)
        return
    rep = _comm.KVReplicator(solo._core, caches, 1 << 20, 1.0)
    assert (rep.num_blocks, rep.block_bytes, rep.row_bytes) == (8, 4 * 2 * 4 * 4, 4 * 4 * 4)


def test_mixed_devices_are_refused(solo):
    cuda = [torch.zeros(8, 2, 4, device="cuda") for _ in range(2)]
    cpu = [torch.zeros(8, 2, 4) for _ in range(2)]
    with pytest.raises(ValueError, match=r"device of the first \(cuda:0\), got one on cpu"):
        _comm.KVReplicator(solo._core, cuda + cpu, 1 << 20, 1.0)
    with pytest.raises(ValueError, match=r"device of the first \(cpu\), got one on cuda:0"):
        _comm.KVReplicator(solo._core, cpu + cuda, 1 << 20, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        _comm.KVReplicator(solo._core, [torch.zeros(4, 2, 8, device="cuda").transpose(0, 2)],
                           1 << 20, 1.0)
    if torch.cuda.device_count() > 1:
        other = torch.zeros(8, 2, 4, device="cuda:1")
        with pytest.raises(ValueError, match=r"device of the first \(cuda:0\), got one on cuda:1"):
            _comm.KVReplicator(solo._core, cuda + [other], 1 << 20, 1.0)
