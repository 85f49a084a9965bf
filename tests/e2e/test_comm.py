"""The communicator manager (kevlarflow.comm.manager) on CPU gloo, with real
processes: values of every op, a peer SIGKILLed or SIGSTOPped in the middle of
a collective, shrink after it, abort with a hung peer, generations that never
mix, and the argument checks."""
from __future__ import annotations

import datetime
import gc
import signal
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from helpers import comm_scenarios as sc
from helpers.comm_workers import Workers
from kevlarflow import _comm
from kevlarflow.comm.manager import (CommAborted, CommError, CommManager, CommTimeout,
                                  PeerFailure, store_prefix)

# What a deadline may be overrun by: waking up, raising, crossing into Python
# on a loaded 2-core machine.
MARGIN_S = 1.0


def test_ops_give_the_right_values_on_four_ranks():
    with Workers(4, sc.ops_values) as w:
        out = w.collect(w.members)
    for i, me in enumerate(w.members):
        r = out[me]
        assert r["rank"] == i and r["generation"] == 0 and r["members"] == w.members
        assert r["allreduce"] == [10.0] * 5
        assert r["allreduce_int"] == [10] * 3
        assert r["broadcast"] == [0, 100, 200, 300]
        assert r["ring"] == [10.0 * ((i - 1) % 4)] * 3
        assert r["pending_done"]
    assert out["w0.1"]["p2p"] == [7, 8]
    # A float32 send never matches an int32 recv (the dtype is the gloo tag).
    assert out["w0.1"]["mismatch"] == ("CommTimeout", [-7, -7])
    assert out["w0.0"]["mismatch"] in ("CommTimeout", "PeerFailure")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_peer_lost_in_a_collective_then_shrink(sig):
    op_deadline_s = 1.5
    victim = "w0.1"  # in the middle, so that shrinking renumbers the ranks after it
    with Workers(4, sc.failure_then_shrink, victim=victim, op_deadline_s=op_deadline_s) as w:
        survivors = [m for m in w.members if m != victim]
        w.wait_keys([f"ready/{victim}"] + [f"entering/{m}" for m in survivors])
        w.signal(victim, sig)
        out = w.collect(survivors)
        codes = w.exitcodes(survivors)
    assert codes == {m: 0 for m in survivors}
    kinds = set()
    for i, me in enumerate(survivors):
        r = out[me]
        f = r["failure"]
        assert f is not None, f"{me}: the allreduce succeeded without {victim}"
        kinds.add(f["kind"])
        assert f["kind"] in ("PeerFailure", "CommTimeout"), f
        assert f["elapsed"] < op_deadline_s + MARGIN_S, f
        if f["kind"] == "CommTimeout":
            assert f["elapsed"] >= op_deadline_s * 0.9, f  # not before the deadline
        assert (f["group"], f["generation"], f["op"]) == ("tp", 0, "allreduce")
        assert "'tp'" in f["message"] and "generation 0" in f["message"]
        # Broken until shrunk: the next op fails at once.
        assert not r["healthy_after_failure"]
        assert r["broken"] is not None and r["broken"]["elapsed"] < 0.1, r["broken"]
        assert "unusable" in r["broken"]["message"]
        # Shrunk: the next generation, survivors only, ranks renumbered.
        assert r["generation"] == 1 and r["members"] == survivors
        assert r["rank"] == i and r["old_rank"] == w.members.index(me)
        assert r["after_shrink"] == [6.0] * 4
        assert r["healthy"]
    # A killed peer closes its sockets; a stopped one can only be caught by the deadline.
    assert ("PeerFailure" if sig == signal.SIGKILL else "CommTimeout") in kinds, kinds


def test_abort_never_blocks_with_a_hung_peer():
    victim = "w0.2"
    with Workers(3, sc.abort_with_hung_peer, victim=victim) as w:
        survivors = [m for m in w.members if m != victim]
        w.wait_keys([f"ready/{victim}"])
        w.signal(victim, signal.SIGSTOP)
        w.store.set("stopped", "1")
        out = w.collect(survivors)
        # The processes exit although a retired group may still be tearing down.
        codes = w.exitcodes(survivors)
    assert codes == {m: 0 for m in survivors}
    for me in survivors:
        r = out[me]
        assert r["abort_s"] < 0.05, r
        assert r["blocked_error"] == "CommAborted" and not r["thread_alive"], r
        assert r["woke_s"] < 0.5, r
        assert r["shrink_s"] < 10, r
        assert r["generation"] == 1 and r["after_shrink"] == [3.0] * 3
        assert r["close_s"] < 0.05, r
    # Rank 0's stuck allreduce holds its gloo worker until gloo's own (60 s)
    # timeout: its teardown was still pending when abort and close returned.
    assert out["w0.0"]["pending_after_abort"] >= 1
    assert out["w0.0"]["pending_at_end"] >= 1


def test_generations_never_mix():
    with Workers(2, sc.generations_never_mix) as w:
        out = w.collect(w.members)
    a, b = out["w0.0"], out["w0.1"]
    assert b["generation"] == 1
    assert b["first"] == [222.0]  # the message of generation 1, not the old one
    assert b["second_outcome"] == "CommTimeout" and b["second"] == [-1.0]
    assert a["old_outcome"] in ("PeerFailure", "CommTimeout", "CommError"), a
    # An op naming the generation it belongs to is refused on a newer one.
    for outcome in (a["stale_isend"], b["stale_recv"]):
        assert outcome.startswith("CommAborted") and "of generation 0" in outcome, outcome
    # Members building different generations of one group never connect.
    assert a["other_generation"] == b["other_generation"] == "CommTimeout"


# ---- one process ------------------------------------------------------------

@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=30))


@pytest.fixture
def solo(store):
    mgr = CommManager(store, "a", deadline_s=1.0)
    mgr.build("g", ["a"])
    yield mgr
    mgr.close()


def test_single_member_group_lifecycle(solo):
    x = torch.arange(3, dtype=torch.float32)
    solo.allreduce("g", x)
    solo.broadcast("g", x, "a")
    assert x.tolist() == [0.0, 1.0, 2.0]
    assert (solo.generation("g"), solo.members("g"), solo.rank("g")) == (0, ["a"], 0)
    assert solo.rebuild("g", ["a"]) == 1
    assert solo.shrink("g", []) == 2
    solo.abort("g")
    assert solo.has("g") and not solo.healthy("g") and solo.generation("g") == 2
    with pytest.raises(CommAborted, match=r"allreduce on group 'g' generation 2.*aborted") as e:
        solo.allreduce("g", x)
    assert (e.value.group, e.value.generation, e.value.op) == ("g", 2, "allreduce")
    assert solo.rebuild("g", ["a"]) == 3
    solo.allreduce("g", x)
    assert not solo.has("other")
    assert solo.rebuild("other", ["a"]) == 0


def test_a_generation_is_built_once(solo):
    for generation in (0, -1):
        with pytest.raises(ValueError, match="generation"):
            solo.build("g", ["a"], generation=generation)
    solo.abort("g")
    with pytest.raises(ValueError, match="not newer than generation 0"):
        solo.build("g", ["a"], generation=0)
    solo.build("g", ["a"], generation=5)
    assert solo.generation("g") == 5
    assert store_prefix("g", 5) != store_prefix("g", 6)


def test_build_with_a_missing_member_times_out(store):
    mgr = CommManager(store, "a", deadline_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(CommTimeout, match="build on group 'g' generation 0") as e:
        mgr.build("g", ["a", "b"])
    assert 0.9 <= time.monotonic() - t0 < 1.0 + MARGIN_S
    assert (e.value.group, e.value.generation, e.value.op) == ("g", 0, "build")
    assert mgr.has("g") and not mgr.healthy("g")
    with pytest.raises(CommAborted, match="building generation 0 failed"):
        mgr.allreduce("g", torch.ones(1))
    assert mgr.rebuild("g", ["a"]) == 1
    mgr.allreduce("g", torch.ones(1))
    mgr.close()


def test_failed_builds_keep_no_store_connection_open(store):
    """Each build waits on a store client of its own. One that fails keeps
    its error, for whoever reports it, but not that client: a worker whose
    builds keep being called off (faults in a burst) must not pile up
    connections to the controller's store until a garbage collection runs."""
    def client():
        return dist.TCPStore("127.0.0.1", store.port, is_master=False,
                             timeout=datetime.timedelta(seconds=30))

    def connections():
        return sum(1 for c in psutil.Process().net_connections("tcp")
                   if c.raddr and c.raddr.port == store.port and c.status == "ESTABLISHED")

    mgr = CommManager(client(), "a", deadline_s=20.0, connect_store=client)
    gc.disable()
    try:
        before = connections()
        builds = []  # kept, errors and all, as a worker keeps a build until it reports it
        for generation in range(4):
            build = mgr.start_build("g", ["a", "b"], generation)  # b never comes
            build.cancel("called off")
            with pytest.raises(CommAborted, match="called off"):
                build.wait(10)
            builds.append(build)
        # One more: the client that calls builds off, kept for the next one.
        assert connections() == before + 1
    finally:
        gc.enable()
        mgr.close()


def test_closed_manager_refuses_everything(solo):
    solo.close()
    solo.close()
    with pytest.raises(CommAborted, match="closed"):
        solo.allreduce("g", torch.ones(1))
    with pytest.raises(CommAborted, match="closed"):
        solo.rebuild("g", ["a"])


def test_bad_arguments_are_clear_errors(store, solo):
    x = torch.ones(4)
    cases = [
        (lambda: solo.allreduce("nope", x), ValueError, "unknown communicator group 'nope'"),
        (lambda: solo.send("g", x, "zz"), ValueError, "'zz' is not a member of generation 0"),
        (lambda: solo.broadcast("g", x, "zz"), ValueError, "'zz' is not a member"),
        (lambda: solo.send("g", x, "a"), ValueError, "is this process itself"),
        (lambda: solo.allreduce("g", torch.ones(4, 4).t()), ValueError, "contiguous"),
        (lambda: solo.allreduce("g", torch.ones(2, device="meta")), ValueError,
         "gloo backend takes CPU tensors, got one on meta"),
        (lambda: solo.allreduce("g", torch.ones(2, dtype=torch.complex64)), ValueError,
         "does not take ComplexFloat"),
        (lambda: solo.allreduce("g", torch.ones(2, dtype=torch.bool)), ValueError,
         "does not take Bool"),
        (lambda: solo.allreduce("g", torch.ones(2).to_sparse()), ValueError, "dense"),
        (lambda: solo.allreduce("g", x, deadline_s=0), ValueError, "deadline_s must be a positive"),
        (lambda: solo.allreduce("g", x, deadline_s=float("nan")), ValueError, "positive"),
        (lambda: solo.build("h", ["b", "c"]), ValueError, "'a'.*not among the members"),
        (lambda: solo.build("h", ["a", "a"]), ValueError, "listed twice"),
        (lambda: solo.build("h", []), ValueError, "empty member list"),
        (lambda: solo.shrink("g", ["a"]), ValueError, "cannot exclude itself"),
        (lambda: solo.shrink("g", ["zz"]), ValueError, "'zz' is not a member"),
        (lambda: solo.shrink("nope", []), ValueError, "unknown communicator group"),
        (lambda: CommManager(store, "a", backend="mpi"), ValueError, "unknown communicator backend"),
        (lambda: CommManager(store, "a", deadline_s=-1), ValueError, "positive"),
        (lambda: CommManager(store, ""), ValueError, "empty member id"),
        (lambda: CommManager("not a store", "a"), TypeError, "torch.distributed.Store"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
    # None of them broke the group.
    assert solo.healthy("g")
    solo.allreduce("g", x)


def test_error_classes_form_one_family():
    for cls in (CommTimeout, PeerFailure, CommAborted):
        assert issubclass(cls, CommError)
    assert issubclass(CommError, RuntimeError)


def test_an_aborted_group_is_torn_down_in_the_background(solo):
    """abort hands the group's transport to the reaper, which destroys it
    soon when nothing holds it up (no op stuck on a hung peer)."""
    before = _comm.retired_pending()
    solo.abort("g")
    deadline = time.monotonic() + 10
    while _comm.retired_pending() > before:
        assert time.monotonic() < deadline, "the retired group was never torn down"
        time.sleep(0.01)
    solo.rebuild("g", ["a"])  # and the group can be built again
    x = torch.ones(2)
    solo.allreduce("g", x)
    assert x.tolist() == [1.0, 1.0]
