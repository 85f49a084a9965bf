"""The NCCL backend of the communicator manager: a single-rank communicator on
one GPU (build, allreduce, broadcast, abort, rebuild, shrink), and, on any
machine, a clear error instead of a crash where NCCL cannot be used."""
from __future__ import annotations

import ctypes
import datetime
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from kevlarflow import _C, _comm
from kevlarflow.comm import nccl
from kevlarflow.comm.manager import CommAborted, CommManager


def _libnccl_loads() -> bool:
    try:
        ctypes.CDLL("libnccl.so.2")
        return True
    except OSError:
        return False


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=30))


def test_nccl_where_it_cannot_work_is_a_clear_error(store):
    reason = nccl.unavailable_reason()
    if not _C.built_with_cuda:
        assert "built without CUDA" in reason
    if not _libnccl_loads():
        assert "libnccl.so.2" in _comm.nccl_library_error()
        assert _comm.nccl_version() == 0
    if not reason:
        pytest.skip("NCCL is usable here: see the GPU tests")
    with pytest.raises(RuntimeError, match=r"CommManager\(backend='nccl'\): .*NCCL|CUDA"):
        CommManager(store, "a", backend="nccl")


def test_asking_for_nccl_never_crashes_the_process():
    code = ("import torch.distributed as dist\n"
            "from kevlarflow.comm.manager import CommManager\n"
            "s = dist.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
            "try:\n"
            "    CommManager(s, 'a', backend='nccl').close()\n"
            "except RuntimeError as e:\n"
            "    print('refused:', e)\n"
            "print('alive')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("alive")


@pytest.mark.gpu
def test_single_rank_nccl_communicator(store):
    reason = nccl.unavailable_reason()
    assert not reason, reason
    mgr = CommManager(store, "g0", deadline_s=10.0, backend="nccl")
    try:
        mgr.build("tp", ["g0"])
        x = torch.arange(1024, dtype=torch.float32, device="cuda")
        mgr.allreduce("tp", x)
        assert torch.equal(x.cpu(), torch.arange(1024, dtype=torch.float32))
        b = torch.full((8,), 3, dtype=torch.bfloat16, device="cuda")
        mgr.broadcast("tp", b, "g0")
        assert b.float().cpu().tolist() == [3.0] * 8
        with pytest.raises(ValueError, match="takes CUDA tensors"):
            mgr.allreduce("tp", torch.ones(2))
        with pytest.raises(ValueError, match="does not take ComplexFloat"):
            mgr.allreduce("tp", torch.ones(2, dtype=torch.complex64, device="cuda"))
        mgr.abort("tp")
        with pytest.raises(CommAborted):
            mgr.allreduce("tp", x)
        assert mgr.rebuild("tp", ["g0"]) == 1
        y = torch.ones(16, device="cuda")
        mgr.allreduce("tp", y)
        assert y.sum().item() == 16
        # Excluding nobody connects anew (ncclCommShrink refuses an empty
        # list; it needs a second rank to exclude, so one GPU cannot test it).
        assert mgr.shrink("tp", []) == 2
        mgr.allreduce("tp", y)
        torch.cuda.synchronize()
        assert y.sum().item() == 16 and mgr.healthy("tp")
        print("NCCL", _comm.nccl_version())
    finally:
        mgr.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL takes one rank per GPU: a shrink needs two GPUs")
def test_nccl_and_gloo_groups_side_by_side_then_a_shrink():
    from helpers import comm_scenarios as sc
    from helpers.comm_workers import Workers

    n = min(torch.cuda.device_count(), 4)
    with Workers(n, sc.nccl_on_own_gpus, leaver=f"w0.{n - 1}", deadline_s=10.0) as w:
        out = w.collect(w.members, timeout_s=120)
    total = float(sum(range(1, n + 1)))
    for me in w.members:
        assert out[me]["pipe"] == [total] * 8 and out[me]["ctl"] == [float(n)] * 2
        assert out[me]["ones"] == [float(n)] * 3 and out[me]["device_kept"]
        assert out[me]["no_new_context"]
        assert out[me]["backends"] == ["nccl", "gloo"]
    survivors = w.members[:-1]
    for me in survivors:
        r = out[me]
        assert r["generation"] == 1 and r["members"] == survivors
        assert r["after_shrink"] == [float(sum(range(1, n)))] * 4
        assert r["backend_after"] == "nccl"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL takes one rank per GPU: two groups over two ranks need two GPUs")
def test_ops_of_two_nccl_groups_never_wait_for_each_other():
    from helpers import comm_scenarios as sc
    from helpers.comm_workers import Workers

    with Workers(2, sc.nccl_groups_in_crossed_order, deadline_s=10.0) as w:
        out = w.collect(w.members, timeout_s=120)
    sender, receiver = (out[me] for me in w.members)
    assert receiver["got"] == {"a": [1.0], "b": [2.0]}
    assert sender["elapsed"] < 10.0 and receiver["elapsed"] < 10.0
