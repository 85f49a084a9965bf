"""Scenarios run by the worker processes of e2e/test_comm.py (see comm_workers.py).

Every scenario takes (mgr, store, me, members, **kwargs) and returns a small
dict of what it observed; the test asserts on it.
"""
from __future__ import annotations

import threading
import time

import torch

from helpers.comm_workers import BUILD_DEADLINE_S
from kevlarflow import _comm
from kevlarflow.comm.manager import CommAborted, CommError, CommManager, CommTimeout


def _failure(e: CommError, t0: float) -> dict:
    return dict(kind=type(e).__name__, elapsed=time.monotonic() - t0, message=str(e),
                group=e.group, generation=e.generation, op=e.op, peer=e.peer)


def _wait_until(predicate, what: str, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.005)


def ops_values(mgr: CommManager, store, me, members):
    mgr.build("g", members, deadline_s=BUILD_DEADLINE_S)
    r, n = mgr.rank("g"), len(members)
    x = torch.full((5,), float(r + 1))
    mgr.allreduce("g", x)
    xi = torch.full((3,), r + 1, dtype=torch.int64)
    mgr.allreduce("g", xi)
    root = members[n - 2]
    b = torch.arange(4, dtype=torch.int32) * (100 if me == root else -1)
    mgr.broadcast("g", b, root)
    # A ring: everyone sends to the next and receives from the previous one;
    # isend first, or the blocking sends would wait for each other.
    nxt, prv = members[(r + 1) % n], members[(r - 1) % n]
    pending = mgr.isend("g", torch.full((3,), 10.0 * r), nxt)
    got = torch.full((3,), -1.0)
    mgr.recv("g", got, prv)
    pending.wait()
    p2p = None
    if r == 0:
        mgr.send("g", torch.tensor([7, 8], dtype=torch.int32), members[1])
    elif r == 1:
        t = torch.zeros(2, dtype=torch.int32)
        mgr.recv("g", t, members[0])
        p2p = t.tolist()
    # Last, as it breaks the group: bytes of one dtype never land in another.
    mismatch = None
    if r == 0:
        sent = mgr.isend("g", torch.tensor([1.5, 2.5]), members[1])
        # Give up on the send only after rank 1's receive has ended: giving up
        # first aborts the group, which would end that receive as a peer
        # failure instead of the timeout this checks.
        store.wait(["mismatch/received"])
        try:
            sent.wait(deadline_s=1.0)
            mismatch = "delivered"
        except CommError as e:
            mismatch = type(e).__name__
    elif r == 1:
        t = torch.full((2,), -7, dtype=torch.int32)
        try:
            mgr.recv("g", t, members[0], deadline_s=1.0)
            mismatch = ("received", t.tolist())
        except CommTimeout:
            mismatch = ("CommTimeout", t.tolist())
        store.set("mismatch/received", "1")
    return dict(rank=r, generation=mgr.generation("g"), allreduce=x.tolist(),
                allreduce_int=xi.tolist(), broadcast=b.tolist(), ring=got.tolist(), p2p=p2p,
                pending_done=pending.done, members=mgr.members("g"), mismatch=mismatch)


def failure_then_shrink(mgr: CommManager, store, me, members, victim, op_deadline_s):
    mgr.build("tp", members, deadline_s=BUILD_DEADLINE_S)
    warm = torch.ones(4)
    mgr.allreduce("tp", warm)
    assert warm.tolist() == [float(len(members))] * 4
    if me == victim:
        store.set(f"ready/{me}", "1")
        store.wait(["never"])  # the parent kills or stops this process here
        return None
    store.set(f"entering/{me}", "1")
    t0 = time.monotonic()
    try:
        mgr.allreduce("tp", torch.ones(4), deadline_s=op_deadline_s)
        failure = None
    except CommError as e:
        failure = _failure(e, t0)
    healthy_after_failure = mgr.healthy("tp")
    t0 = time.monotonic()
    try:
        mgr.allreduce("tp", torch.ones(4))
        broken = None
    except CommAborted as e:
        broken = _failure(e, t0)
    old_rank = mgr.rank("tp")
    generation = mgr.shrink("tp", [victim], deadline_s=BUILD_DEADLINE_S)
    r = mgr.rank("tp")
    y = torch.full((4,), float(r + 1))
    mgr.allreduce("tp", y)
    return dict(failure=failure, broken=broken, healthy_after_failure=healthy_after_failure,
                generation=generation, old_rank=old_rank, rank=r, members=mgr.members("tp"),
                after_shrink=y.tolist(), healthy=mgr.healthy("tp"))


def abort_with_hung_peer(mgr: CommManager, store, me, members, victim):
    mgr.build("g", members, deadline_s=BUILD_DEADLINE_S)
    mgr.allreduce("g", torch.ones(2))
    if me == victim:
        store.set(f"ready/{me}", "1")
        store.wait(["never"])
        return None
    store.wait(["stopped"])
    # An op that only an abort can end early: a deadline far beyond the test.
    seen = {}

    def blocked():
        try:
            if me == members[0]:
                mgr.allreduce("g", torch.ones(2), deadline_s=60)
            else:
                mgr.recv("g", torch.ones(2), victim, deadline_s=60)
        except CommError as e:
            seen["error"] = type(e).__name__
        seen["woke"] = time.monotonic()

    thread = threading.Thread(target=blocked)
    thread.start()
    _wait_until(lambda: mgr._core.inflight("g") == 1, "the blocked op being issued")
    t0 = time.monotonic()
    mgr.abort("g")
    abort_s = time.monotonic() - t0
    mgr.abort("g")  # idempotent
    mgr.abort("no-such-group")
    thread.join(10)
    woke_s = seen["woke"] - t0 if "woke" in seen else None
    pending_after_abort = _comm.retired_pending()
    t0 = time.monotonic()
    generation = mgr.shrink("g", [victim], deadline_s=BUILD_DEADLINE_S)
    shrink_s = time.monotonic() - t0
    y = torch.full((3,), float(mgr.rank("g") + 1))
    mgr.allreduce("g", y)
    # The first generation's teardown may still wait on its stuck gloo op:
    # close() must not wait for it either.
    t0 = time.monotonic()
    mgr.close()
    close_s = time.monotonic() - t0
    return dict(abort_s=abort_s, woke_s=woke_s, blocked_error=seen.get("error"),
                thread_alive=thread.is_alive(), pending_after_abort=pending_after_abort,
                shrink_s=shrink_s, generation=generation, after_shrink=y.tolist(),
                close_s=close_s, pending_at_end=_comm.retired_pending())


def generations_never_mix(mgr: CommManager, store, me, members):
    a, b = members
    mgr.build("g", members, deadline_s=BUILD_DEADLINE_S)
    if me == a:
        # Generation 0 keeps a message in flight while the peer moves on; a
        # second manager plays the part of this process's next generation.
        old = mgr.isend("g", torch.tensor([111.0]), b)
        store.set("old_sent", "1")
        nxt = CommManager(store, me, deadline_s=2.0)
        nxt.build("g", members, generation=1, deadline_s=BUILD_DEADLINE_S)
        store.wait(["b_posting"])
        # An op of a step of generation 0, issued once generation 1 is up
        # (a build on another thread): refused, never sent to b at 1.
        stale = _outcome(lambda: nxt.isend("g", torch.tensor([333.0]), b, generation=0))
        nxt.send("g", torch.tensor([222.0]), b, generation=1)
        try:
            old.wait(deadline_s=2.0)
            old_outcome = "delivered"
        except CommError as e:
            old_outcome = type(e).__name__
        store.wait(["b_done"])
        nxt.close()
        return dict(old_outcome=old_outcome, stale_isend=stale,
                    other_generation=_build_outcome(mgr, "h", members, 6))
    store.wait(["old_sent"])
    generation = mgr.rebuild("g", members, deadline_s=BUILD_DEADLINE_S)
    stale = _outcome(lambda: mgr.recv("g", torch.tensor([-1.0]), a, generation=0))
    store.set("b_posting", "1")
    first = torch.tensor([-1.0])
    mgr.recv("g", first, a)
    second = torch.tensor([-1.0])
    try:
        mgr.recv("g", second, a, deadline_s=1.0)
        second_outcome = "received"
    except CommTimeout:
        second_outcome = "CommTimeout"
    store.set("b_done", "1")
    return dict(generation=generation, first=first.tolist(), second=second.tolist(),
                second_outcome=second_outcome, stale_recv=stale,
                other_generation=_build_outcome(mgr, "h", members, 5))


def _outcome(op) -> str:
    try:
        op()
    except CommError as e:
        return f"{type(e).__name__}: {e}"
    return "ran"


def _build_outcome(mgr: CommManager, group, members, generation) -> str:
    """Members that disagree on the generation never connect: each waits in
    its own store namespace until the deadline."""
    try:
        mgr.build(group, members, generation=generation, deadline_s=1.0)
        return "connected"
    except CommTimeout:
        return "CommTimeout"


def nccl_on_own_gpus(mgr: CommManager, store, me, members, leaver):
    """One GPU per member, a pipeline group over NCCL next to a Gloo one in
    the same manager; then `leaver` leaves and the others shrink the NCCL
    group without it (ncclCommShrink on a healthy communicator)."""
    index = members.index(me)
    torch.cuda.set_device(index)
    mgr.build("pipe", members, deadline_s=BUILD_DEADLINE_S, backend="nccl")
    mgr.build("ctl", members, deadline_s=BUILD_DEADLINE_S, backend="gloo")
    x = torch.full((8,), float(index + 1), device="cuda")
    mgr.allreduce("pipe", x)
    c = torch.ones(2)
    mgr.allreduce("ctl", c)
    # Called from a thread whose current device is another GPU, the link
    # works on its own device and leaves the thread's as it was, without
    # making a CUDA context on that other GPU.
    other = (index + 1) % len(members)
    torch.cuda.set_device(other)  # (torch may defer making its context)
    other_had_context = torch._C._cuda_hasPrimaryContext(other)
    ones = torch.ones(3, device=f"cuda:{index}")
    mgr.allreduce("pipe", ones)
    torch.cuda.synchronize(index)
    device_kept = torch.cuda.current_device() == other
    no_new_context = torch._C._cuda_hasPrimaryContext(other) == other_had_context
    torch.cuda.set_device(index)
    out = dict(pipe=x.cpu().tolist(), ctl=c.tolist(), ones=ones.cpu().tolist(),
               device_kept=device_kept, no_new_context=no_new_context,
               backends=[mgr.backend_of("pipe"), mgr.backend_of("ctl")])
    if me == leaver:
        return out
    generation = mgr.shrink("pipe", [leaver], deadline_s=BUILD_DEADLINE_S)
    y = torch.full((4,), float(mgr.rank("pipe") + 1), device="cuda")
    mgr.allreduce("pipe", y)
    torch.cuda.synchronize()
    out.update(generation=generation, members=mgr.members("pipe"), after_shrink=y.cpu().tolist(),
               backend_after=mgr.backend_of("pipe"))
    return out


def nccl_groups_in_crossed_order(mgr: CommManager, store, me, members):
    """Two NCCL groups over the same two GPUs (the pipelines of two borrowed
    workers): the first member sends on "a" then on "b", the second receives
    on "b" then on "a". Ops queued on one stream would wait for each other
    in that stream's order and never finish; each communicator's own stream
    lets both pairs complete."""
    index = members.index(me)
    torch.cuda.set_device(index)
    for group in ("a", "b"):
        mgr.build(group, members, deadline_s=BUILD_DEADLINE_S, backend="nccl")
    n = 1 << 20
    t0 = time.monotonic()
    if index == 0:
        sends = [mgr.isend(group, torch.full((n,), value, device="cuda"), members[1])
                 for group, value in (("a", 1.0), ("b", 2.0))]
        for op in sends:
            op.wait(deadline_s=10.0)
        return dict(elapsed=time.monotonic() - t0)
    got = {}
    for group in ("b", "a"):
        buffer = torch.empty(n, device="cuda")
        mgr.recv(group, buffer, members[0], deadline_s=10.0)
        got[group] = sorted(set(buffer.cpu().tolist()))
    return dict(got=got, elapsed=time.monotonic() - t0)
