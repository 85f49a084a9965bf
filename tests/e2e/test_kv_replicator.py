"""The native KV replicator (kevlarflow._comm.KVReplicator) over a real gloo
link between two processes: blocks arrive bit-identical, resubmitted blocks
coalesce, transfers stay bounded, a hung backup never blocks the sender's
caller, keepalives keep an idle link alive, the backup refuses block ids it
does not have; then the argument checks, in one process."""
from __future__ import annotations

import signal

import pytest
import torch

from helpers import replicator_scenarios as sc
from helpers.comm_workers import Workers
from kevlarflow import _comm

SOURCE, BACKUP = "w0.0", "w0.1"


def _zero(raw: bytes) -> bool:
    return not any(raw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_arrive_bit_identical(dtype):
    # Scattered pairs: backup ids differ from source ids and come out of order;
    # step numbers need not be consecutive.
    steps = [(100, [3, 7, 1], [12, 0, 5]),
             (101, [15, 2], [9, 4]),
             (105, [8, 0, 11, 6], [14, 2, 7, 10])]
    with Workers(2, sc.copies_blocks, dtype=dtype, steps=steps) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    assert src["accepted"] == [True] * 3
    written = {}
    for _, s_ids, d_ids in steps:
        written.update(zip(d_ids, s_ids))
    for b, raw in enumerate(dst["blocks"]):
        if b in written:
            assert raw == src["blocks"][written[b]], f"backup block {b}"
        else:
            assert _zero(raw), f"backup block {b} was never sent but changed"
    assert dst["acked"] == [100, 101, 105]
    assert src["stats"]["blocks_submitted"] == src["stats"]["blocks_sent"] == 9
    assert src["stats"]["blocks_coalesced"] == 0 and src["stats"]["error"] == ""
    assert src["stats"]["bytes_sent"] == 9 * src["block_bytes"]
    assert dst["stats"]["blocks_received"] == 9


def test_only_the_rows_written_travel_and_resubmitted_rows_coalesce():
    # Step 1 writes row 0 of block 0 and goes at once. Behind it, a prefill
    # writes rows 0 and 1 of source block 3 (backup block 5); decode steps
    # then write rows 2 and 3 of it, and rows 0 and 1 of block 9 (backup
    # block 2), all before the next transfer: block 5's entry is the union of
    # its rows, sent once.
    steps = [(1, [0], [0], [0], [1]),
             (2, [3], [5], [0], [2]),
             (3, [3], [5], [2], [3]),
             (4, [3, 9], [5, 2], [3, 0], [4, 1]),
             (5, [9], [2], [1], [2])]
    with Workers(2, sc.copies_rows, steps=steps) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    assert src["accepted"] == [True] * 5 and dst["acked"] == [1, 2, 3, 4, 5]
    sent = {(0, 0): (0, 0)} | {(5, r): (3, r) for r in range(4)} | {(2, r): (9, r) for r in range(2)}
    sc.check_rows_arrived(src["rows"], dst["rows"], sent)
    stats = src["stats"]
    assert (stats["blocks_submitted"], stats["blocks_coalesced"], stats["blocks_sent"]) == (6, 3, 3)
    assert stats["transfers"] == 2
    assert stats["bytes_sent"] == dst["stats"]["bytes_received"] == 7 * src["row_bytes"]


def test_resubmitted_blocks_coalesce():
    num_steps = 50
    with Workers(2, sc.coalesces, num_steps=num_steps) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    stats = src["stats"]
    assert stats["blocks_coalesced"] > 0, stats
    # Bounded by the backup blocks written, however far the link is behind.
    assert src["max_pending"] == 2
    # Each submitted block was either sent or merged into one still pending.
    assert stats["blocks_sent"] + stats["blocks_coalesced"] == stats["blocks_submitted"] == 100
    assert dst["stats"]["blocks_received"] == stats["blocks_sent"]
    # The latest contents win: those of the last step's source blocks.
    last = num_steps - 1
    assert dst["blocks"][5] == src["blocks"][last % 8]
    assert dst["blocks"][11] == src["blocks"][8 + last % 8]
    assert all(_zero(raw) for b, raw in enumerate(dst["blocks"]) if b not in (5, 11))
    assert dst["acked"] == list(range(num_steps))


def test_a_flush_sends_what_is_pending_without_waiting_for_the_interval():
    with Workers(2, sc.flushes, interval_s=30.0) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    assert dst["acked"] == [1, 2]
    assert dst["waited_s"] < 5.0, dst["waited_s"]  # not the 30 s interval
    assert dst["blocks"][1] == src["blocks"][1] and dst["blocks"][2] == src["blocks"][2]


def test_transfers_are_bounded():
    src_ids, dst_ids = [0, 1, 2, 3, 4, 5, 6], [15, 3, 9, 1, 12, 6, 10]
    with Workers(2, sc.bounded_transfers, step=7, src=src_ids, dst=dst_ids,
                 blocks_per_transfer=2) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    calls = [c for c in dst["calls"] if c[0] or c[1]]  # keepalives aside
    # Two blocks a transfer, oldest first; only the last one completes the step.
    assert [(steps, n) for steps, n, _ in calls] == [([], 2), ([], 2), ([], 2), ([7], 1)]
    assert [written for _, _, written in calls] == [
        sorted(dst_ids[:2]), sorted(dst_ids[:4]), sorted(dst_ids[:6]), sorted(dst_ids)]
    assert src["stats"]["transfers"] == 4 and src["stats"]["blocks_sent"] == 7
    for s, d in zip(src_ids, dst_ids):
        assert dst["blocks"][d] == src["blocks"][s]
    assert dst["acked"] == [7]


def test_hung_backup_never_blocks_the_caller():
    deadline_s = 10.0
    shape = (64, 16384)  # 64 KiB a block and cache, 256 KiB a block over the 4 caches
    with Workers(2, sc.hung_backup, shape=shape, steps=40, pairs_per_step=8,
                 deadline_s=deadline_s) as w:
        w.wait_keys(["ready"])
        w.signal(BACKUP, signal.SIGSTOP)
        w.store.set("stopped", "1")
        r = w.collect([SOURCE])[SOURCE]
        w.signal(BACKUP, signal.SIGKILL)
        codes = w.exitcodes([SOURCE])
    assert codes == {SOURCE: 0}
    assert r["data_bytes"] >= 64 << 20  # far beyond what socket buffers hold
    assert r["accepted"] == [True] * 40
    # Functional bounds, far below the deadline the sender is stuck on.
    assert r["total_submit_s"] < 2.0, r["submit_s"]
    assert r["stop_s"] < 1.0, r
    before = r["before_stop"]
    assert 0 < before["pending_blocks"] <= 64 and before["blocks_coalesced"] > 0, before
    assert before["error"] == ""
    # Stopped: the send failed as aborted, nothing is pending, submit refuses.
    assert r["after_stop"]["pending_blocks"] == 0
    assert "abort" in r["after_stop"]["error"], r["after_stop"]
    assert r["submit_after_stop"] is False


def test_keepalives_keep_an_idle_link_alive():
    deadline_s, keepalive_s = 2.0, 0.2
    # Idle for longer than the receive deadline: only keepalives end those receives.
    with Workers(2, sc.keepalive, keepalive_s=keepalive_s,
                 receive_deadline_s=deadline_s, idle_s=2.5) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    idle = dst["idle"]
    assert all(steps == [] for steps, _ in idle), idle
    assert len(idle) >= 5, idle
    assert max(took for _, took in idle) < deadline_s / 2, idle
    assert dst["acked"] == [42]
    assert dst["blocks"][2] == src["blocks"][4]
    assert src["stats"]["transfers"] == 1  # keepalives are not counted
    assert src["stats"]["blocks_sent"] == dst["stats"]["blocks_received"] == 1


def test_backup_refuses_block_ids_it_does_not_have():
    # Block 8 exists on the source (16 blocks) but not on the backup (8): the
    # source only checks dst >= 0, the backup must refuse the whole transfer,
    # the valid block 3 included, before writing anything.
    with Workers(2, sc.refuses_out_of_range, src=[2, 5], dst=[3, 8], backup_blocks=8) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    assert src["accepted"] is True
    assert dst["error"] is not None and "block id 8 is outside [0, 8)" in dst["error"], dst
    assert all(_zero(raw) for raw in dst["blocks"])
    assert dst["stats"]["blocks_received"] == 0
    assert src["stop_s"] < 1.0


def test_backup_refuses_rows_outside_its_blocks():
    # Blocks of 4 rows at the source, of 2 at the backup (a link out of step):
    # whole blocks of the source are rows it does not have.
    with Workers(2, sc.refuses_out_of_range, src=[2], dst=[3], backup_blocks=16,
                 backup_rows=2) as w:
        out = w.collect(w.members)
    dst = out[BACKUP]
    assert dst["error"] is not None and "rows [0, 4) of block 3 are not a range within a " \
        "block of 2" in dst["error"], dst
    assert all(_zero(raw) for raw in dst["blocks"])
    assert dst["stats"]["blocks_received"] == 0


# ---- one process ------------------------------------------------------------

def _caches(n=4, shape=(8, 2, 4), dtype=torch.float32):
    return [torch.zeros(shape, dtype=dtype) for _ in range(n)]


def test_constructor_checks(solo):
    m = solo._core
    one_block = 4 * 2 * 4 * 4  # 4 caches x [2, 4] float32
    cases = [
        (lambda: _comm.KVReplicator(m, [], 1 << 20, 1.0), ValueError, "no caches"),
        (lambda: _comm.KVReplicator(m, _caches()[:3] + [torch.zeros(8, 2, 5)], 1 << 20, 1.0),
         ValueError, "shape and dtype of the first"),
        (lambda: _comm.KVReplicator(m, _caches()[:3] + [torch.zeros(9, 2, 4)], 1 << 20, 1.0),
         ValueError, "shape and dtype of the first"),
        (lambda: _comm.KVReplicator(m, _caches()[:3] + _caches(1, dtype=torch.bfloat16),
                                    1 << 20, 1.0), ValueError, "shape and dtype of the first"),
        (lambda: _comm.KVReplicator(m, [torch.zeros(4, 2, 8).transpose(0, 2)], 1 << 20, 1.0),
         ValueError, "contiguous CPU tensors"),
        (lambda: _comm.KVReplicator(m, [torch.zeros(8, 2, device="meta")], 1 << 20, 1.0),
         ValueError, "contiguous CPU tensors"),
        (lambda: _comm.KVReplicator(m, [torch.zeros(0, 2, 4)], 1 << 20, 1.0), ValueError,
         "no block"),
        (lambda: _comm.KVReplicator(m, _caches(), one_block - 1, 1.0), ValueError,
         rf"max_transfer_bytes {one_block - 1} is below one block \({one_block} bytes\)"),
        (lambda: _comm.KVReplicator(m, _caches(), 1 << 20, 0.0), ValueError,
         "keepalive_s must be a positive"),
        (lambda: _comm.KVReplicator(m, _caches(), 1 << 20, -1.0), ValueError,
         "keepalive_s must be a positive"),
        (lambda: _comm.KVReplicator(m, [[0.0]], 1 << 20, 1.0), TypeError, "incompatible"),
        (lambda: _comm.KVReplicator(None, _caches(), 1 << 20, 1.0), ValueError, "no communicator manager"),
    ]
    for call, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call()
    rep = _comm.KVReplicator(m, _caches(), one_block, 1.0)  # exactly one block is enough
    assert (rep.num_blocks, rep.block_bytes, rep.row_bytes) == (8, one_block, one_block // 2)


def test_submit_and_lifecycle_checks(solo):
    rep = _comm.KVReplicator(solo._core, _caches(), 1 << 20, 60.0)
    # Arguments are checked whether or not a link runs.
    with pytest.raises(ValueError, match="differ in length"):
        rep.submit([0, 1], [0], 1)
    for src, dst in (([8], [0]), ([-1], [0]), ([0], [-1])):
        with pytest.raises(ValueError, match=r"block ids must be in \[0, 8\)"):
            rep.submit(src, dst, 1)
    with pytest.raises(TypeError):
        rep.submit(["x"], [0], 1)
    # Rows: a range within a block of 2, one per pair, or none at all.
    for begin, end in (([0], [3]), ([1], [1]), ([-1], [1]), ([2], [1])):
        with pytest.raises(ValueError, match=r"are not a range within a block of 2"):
            rep.submit([0], [1], 1, begin, end)
    for begin, end in (([0], []), ([0, 0], [1, 1]), ([], [1])):
        with pytest.raises(ValueError, match="one row range per block"):
            rep.submit([0], [1], 1, begin, end)
    assert rep.submit([0], [1], 1, [0], [1]) is False
    assert rep.submit([0], [1], 1) is False  # no link yet: nothing queued
    rep.stop()
    rep.stop()  # stopping what is not running is fine
    # With a 60 s keepalive the thread sends nothing before the second start.
    rep.start("link", "b")
    with pytest.raises(RuntimeError, match="stop\\(\\) it first"):
        rep.start("link", "b")
    rep.stop()
    rep.stop()
    assert rep.stats()["pending_blocks"] == 0 and rep.stats()["error"] == ""


def test_a_link_that_fails_stops_and_says_why(solo):
    rep = _comm.KVReplicator(solo._core, _caches(), 1 << 20, 60.0)
    rep.start("no-such-group", "b")
    assert rep.submit([0], [1], 1) is True  # queued; the thread's send then fails
    sc._wait_until(lambda: rep.stats()["error"] != "", "the link failing")
    assert "unknown communicator group 'no-such-group'" in rep.stats()["error"]
    assert rep.submit([0], [1], 2) is False
    assert rep.stats()["pending_blocks"] == 0
    rep.start("no-such-group", "b")  # a failed link can be started again
    assert rep.stats()["error"] == ""
    rep.stop()


def test_staging_is_reused_by_transfers_that_grow_and_shrink():
    # One transfer a step: a row, three whole blocks (staging grows), two rows
    # of one block (the larger buffer is reused), six blocks (it grows
    # again), a row. The source rewrites its blocks before each step: a
    # transfer carrying anything of an earlier one would show.
    steps = [([3], [5], [1], [2]),
             ([0, 1, 2], [7, 8, 9], [0, 0, 0], [4, 4, 4]),
             ([3], [5], [2], [4]),
             ([4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15], [0] * 6, [4] * 6),
             ([10], [0], [3], [4])]
    with Workers(2, sc.staging_reuse, steps=steps) as w:
        out = w.collect(w.members)
    src, dst = out[SOURCE], out[BACKUP]
    sent = {}
    for i, (s_ids, d_ids, begin, end) in enumerate(steps):
        for s, d, b, e in zip(s_ids, d_ids, begin, end):
            for r in range(b, e):
                sent[d, r] = src["rows"][i][s][r]
        for b, rows in enumerate(dst["rows"][i]):
            for r, raw in enumerate(rows):
                if (b, r) in sent:
                    assert raw == sent[b, r], f"step {i}: backup block {b} row {r}"
                else:
                    assert _zero(raw), f"step {i}: backup block {b} row {r} changed"
    row_bytes = len(src["rows"][0][0][0])
    assert dst["stats"]["bytes_received"] == len(sent) * row_bytes


def test_receives_on_two_links_at_once_each_get_their_blocks():
    # Staging is per receive: two links into one replicator, received by a
    # thread each, must not share a buffer.
    # 8 KiB a block and cache; a block of its own each step: 48 transfers a link.
    shape, num_steps = (48, 16, 8, 16), 48
    with Workers(3, sc.two_links_in, shape=shape, num_steps=num_steps) as w:
        out = w.collect(w.members)
    sources, backup = w.members[:2], out[w.members[2]]
    assert backup["errors"] == []
    assert backup["acked"] == {s: list(range(num_steps)) for s in sources}
    half = shape[0]
    for k, s in enumerate(sources):
        assert out[s]["stats"]["blocks_sent"] == num_steps and out[s]["stats"]["error"] == ""
        for b in range(half):
            assert backup["blocks"][k * half + b] == out[s]["blocks"][b], f"{s} block {b}"
    assert backup["stats"]["blocks_received"] == 2 * num_steps
