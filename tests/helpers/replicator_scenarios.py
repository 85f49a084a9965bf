"""Scenarios run by the worker processes of e2e/test_kv_replicator.py (see comm_workers.py).

Two workers share one link: members[0] is the source (it submits), members[1]
the backup (it receives). Each scenario returns plain data (block bytes,
steps, stats) that the test asserts on; tensors never cross the queue.
"""
from __future__ import annotations

import time

import torch

from helpers.comm_scenarios import _wait_until
from helpers.comm_workers import BUILD_DEADLINE_S
from kevlarflow import _comm

GROUP = "repl.w0.0"
SHAPE = (16, 4, 2, 8)  # [num_blocks, ...] of each of the 4 caches (2 layers x K, V)
# Long enough that no keepalive interleaves with the transfers a test counts.
QUIET_KEEPALIVE_S = 5.0


def make_caches(shape=SHAPE, dtype="float32", seed=None) -> list[torch.Tensor]:
    """Zeros, or random bits when seeded: every bit pattern, NaNs included,
    must arrive as it was."""
    caches = [torch.zeros(shape, dtype=getattr(torch, dtype)) for _ in range(4)]
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for c in caches:
            fill_random(c, gen)
    return caches


def fill_random(t: torch.Tensor, gen: torch.Generator) -> None:
    raw = t.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))


def block_bytes(caches) -> list[bytes]:
    """Block b's bytes in every cache, concatenated, for each b."""
    return [b"".join(c[b].view(torch.uint8).numpy().tobytes() for c in caches)
            for b in range(caches[0].shape[0])]


def rows_bytes(caches) -> list[list[bytes]]:
    """Row r of block b's bytes in every cache, concatenated, at [b][r]."""
    return [[b"".join(c[b, r].view(torch.uint8).numpy().tobytes() for c in caches)
             for r in range(caches[0].shape[1])] for b in range(caches[0].shape[0])]


def check_rows_arrived(src_rows, dst_rows, sent) -> None:
    """Each backup row named in sent ({(block, row): (source block, row)})
    holds the source's bytes; every other backup row is still zero."""
    for b, rows in enumerate(dst_rows):
        for r, raw in enumerate(rows):
            if (b, r) in sent:
                sb, sr = sent[b, r]
                assert raw == src_rows[sb][sr], f"backup block {b} row {r}"
            else:
                assert not any(raw), f"backup block {b} row {r} was never sent but changed"


def _link(mgr, members, caches, max_transfer_bytes=1 << 20, keepalive_s=QUIET_KEEPALIVE_S):
    mgr.build(GROUP, members, deadline_s=BUILD_DEADLINE_S)
    return _comm.KVReplicator(mgr._core, caches, max_transfer_bytes, keepalive_s)


def _receive_until(rep, source, want_steps, deadline_s=5.0, on_call=None) -> list[int]:
    """Receive until `want_steps` steps are acknowledged; the acks, in order."""
    acked = []
    while len(acked) < want_steps:
        got = rep.receive(GROUP, source, deadline_s)
        acked += got
        if on_call is not None:
            on_call(got)
    return acked


def _finish_source(rep, store) -> dict:
    """Once the backup has everything: stats while the link is still up, then
    stop, then let the backup go (it must not close the link under our stats)."""
    store.wait(["backup_done"])
    # A transfer is counted once its last send returns, which may be a moment
    # after the backup has it.
    received = int(store.get("backup_done"))
    _wait_until(lambda: rep.stats()["blocks_sent"] >= received, "the sender counting its sends")
    stats = rep.stats()
    rep.stop()
    store.set("source_done", "1")
    return stats


def _finish_backup(rep, store) -> None:
    store.set("backup_done", str(rep.stats()["blocks_received"]))
    store.wait(["source_done"])


def copies_blocks(mgr, store, me, members, dtype, steps):
    """steps: [(step, src ids, dst ids)], submitted in order."""
    source, backup = members
    if me == source:
        caches = make_caches(dtype=dtype, seed=1234)
        rep = _link(mgr, members, caches)
        rep.start(GROUP, backup)
        accepted = [rep.submit(src, dst, step) for step, src, dst in steps]
        stats = _finish_source(rep, store)
        return dict(blocks=block_bytes(caches), accepted=accepted, stats=stats,
                    block_bytes=rep.block_bytes)
    caches = make_caches(dtype=dtype)
    rep = _link(mgr, members, caches)
    acked = _receive_until(rep, source, len(steps))
    _finish_backup(rep, store)
    return dict(blocks=block_bytes(caches), acked=acked, stats=rep.stats())


def copies_rows(mgr, store, me, members, steps):
    """steps: [(step, src ids, dst ids, first rows, end rows)]. The first goes
    at once, as a link's first transfer does; the others are submitted while
    the rest of a 30 s interval holds the next transfer back, so that they
    coalesce whatever the threads' timing, and a flush then sends them."""
    source, backup = members
    if me == source:
        caches = make_caches(seed=4321)
        mgr.build(GROUP, members, deadline_s=BUILD_DEADLINE_S)
        rep = _comm.KVReplicator(mgr._core, caches, 1 << 20, QUIET_KEEPALIVE_S, 30.0)
        rep.start(GROUP, backup)
        accepted = []
        for k, (step, src, dst, begin, end) in enumerate(steps):
            accepted.append(rep.submit(src, dst, step, begin, end))
            if k == 0:
                _wait_until(lambda: rep.stats()["pending_blocks"] == 0, "the first transfer taken")
        rep.flush()
        stats = _finish_source(rep, store)
        return dict(rows=rows_bytes(caches), accepted=accepted, stats=stats,
                    row_bytes=rep.row_bytes)
    caches = make_caches()
    rep = _link(mgr, members, caches)
    acked = _receive_until(rep, source, len(steps))
    _finish_backup(rep, store)
    return dict(rows=rows_bytes(caches), acked=acked, stats=rep.stats())


def flushes(mgr, store, me, members, interval_s):
    """Step 1 goes at once (the first transfer); step 2 would wait out the
    interval, and a flush sends it now."""
    source, backup = members
    caches = make_caches(seed=21 if me == source else None)
    mgr.build(GROUP, members, deadline_s=BUILD_DEADLINE_S)
    rep = _comm.KVReplicator(mgr._core, caches, 1 << 20, QUIET_KEEPALIVE_S, interval_s)
    if me == source:
        rep.start(GROUP, backup)
        assert rep.submit([1], [1], 1)
        store.wait(["got1"])
        assert rep.submit([2], [2], 2)
        rep.flush()
        stats = _finish_source(rep, store)
        return dict(blocks=block_bytes(caches), stats=stats)
    acked = _receive_until(rep, source, 1)
    store.set("got1", "1")
    t0 = time.monotonic()
    acked += _receive_until(rep, source, 1)
    waited_s = time.monotonic() - t0
    _finish_backup(rep, store)
    return dict(blocks=block_bytes(caches), acked=acked, waited_s=waited_s)


def coalesces(mgr, store, me, members, num_steps):
    """Every step rewrites a source block and sends it to backup block 5, and
    another one to backup block 11, while the backup is not receiving yet."""
    source, backup = members
    if me == source:
        caches = make_caches(seed=7)
        gen = torch.Generator().manual_seed(8)
        rep = _link(mgr, members, caches)
        rep.start(GROUP, backup)
        max_pending = 0
        for step in range(num_steps):
            a, b = step % 8, 8 + step % 8
            for c in caches:  # what the forward pass of this step wrote
                fill_random(c[a], gen)
                fill_random(c[b], gen)
            assert rep.submit([a, b], [5, 11], step)
            max_pending = max(max_pending, rep.stats()["pending_blocks"])
        store.set("submitted", "1")
        stats = _finish_source(rep, store)
        return dict(blocks=block_bytes(caches), stats=stats, max_pending=max_pending)
    caches = make_caches()
    rep = _link(mgr, members, caches)
    store.wait(["submitted"])  # the link backs up meanwhile
    acked = _receive_until(rep, source, num_steps)
    _finish_backup(rep, store)
    return dict(blocks=block_bytes(caches), acked=acked, stats=rep.stats())


def bounded_transfers(mgr, store, me, members, step, src, dst, blocks_per_transfer):
    source, backup = members
    caches = make_caches(seed=99 if me == source else None)
    one_block = sum(c[0].numel() * c.element_size() for c in caches)
    rep = _link(mgr, members, caches, max_transfer_bytes=blocks_per_transfer * one_block)
    if me == source:
        rep.start(GROUP, backup)
        assert rep.submit(src, dst, step)
        stats = _finish_source(rep, store)
        return dict(blocks=block_bytes(caches), stats=stats)
    calls = []  # per receive(): (steps, blocks it brought, backup blocks written so far)

    def record(got):
        written = [b for b, raw in enumerate(block_bytes(caches)) if any(raw)]
        received = rep.stats()["blocks_received"]
        calls.append((got, received - sum(c[1] for c in calls), written))

    acked = _receive_until(rep, source, 1, on_call=record)
    _finish_backup(rep, store)
    return dict(blocks=block_bytes(caches), acked=acked, calls=calls, stats=rep.stats())


def hung_backup(mgr, store, me, members, shape, steps, pairs_per_step):
    source, backup = members
    caches = make_caches(shape=shape, seed=5 if me == source else None)
    rep = _link(mgr, members, caches, max_transfer_bytes=16 * 4 * caches[0][0].nbytes)
    if me == backup:
        store.set("ready", "1")
        store.wait(["never"])  # the parent stops this process here
        return None
    store.wait(["stopped"])
    num_blocks = shape[0]
    rep.start(GROUP, backup)
    submit_s, accepted, max_pending = [], [], 0
    t0 = time.monotonic()
    for step in range(steps):
        src = [(step * pairs_per_step + k) % num_blocks for k in range(pairs_per_step)]
        dst = [(b + 1) % num_blocks for b in src]
        t = time.monotonic()
        accepted.append(rep.submit(src, dst, step))
        submit_s.append(time.monotonic() - t)
        max_pending = max(max_pending, rep.stats()["pending_blocks"])
    total_submit_s = time.monotonic() - t0
    # The replication thread is stuck in a send to the stopped backup.
    _wait_until(lambda: mgr._core.inflight(GROUP) == 1, "a send blocked on the backup")
    before_stop = rep.stats()
    t0 = time.monotonic()
    rep.stop()
    stop_s = time.monotonic() - t0
    after = rep.stats()
    return dict(submit_s=submit_s, total_submit_s=total_submit_s, accepted=accepted,
                max_pending=max_pending, before_stop=before_stop, stop_s=stop_s,
                after_stop=after, submit_after_stop=rep.submit([0], [1], steps),
                data_bytes=steps * pairs_per_step * rep.block_bytes)


def keepalive(mgr, store, me, members, keepalive_s, receive_deadline_s, idle_s):
    source, backup = members
    caches = make_caches(seed=3 if me == source else None)
    rep = _link(mgr, members, caches, keepalive_s=keepalive_s)
    if me == source:
        rep.start(GROUP, backup)
        store.wait(["idle_done"])  # nothing submitted until the backup idled long enough
        assert rep.submit([4], [2], 42)
        stats = _finish_source(rep, store)
        return dict(blocks=block_bytes(caches), stats=stats)
    idle, t0 = [], time.monotonic()
    while time.monotonic() - t0 < idle_s:
        t = time.monotonic()
        got = rep.receive(GROUP, source, receive_deadline_s)
        idle.append((got, time.monotonic() - t))
    store.set("idle_done", "1")
    # A keepalive may still come before the step.
    acked = _receive_until(rep, source, 1, deadline_s=receive_deadline_s)
    _finish_backup(rep, store)
    return dict(blocks=block_bytes(caches), idle=idle, acked=acked, stats=rep.stats())


def refuses_out_of_range(mgr, store, me, members, src, dst, backup_blocks,
                         backup_rows=SHAPE[1]):
    source, backup = members
    if me == source:
        caches = make_caches(seed=11)
        rep = _link(mgr, members, caches)
        rep.start(GROUP, backup)
        accepted = rep.submit(src, dst, 1)
        store.wait(["backup_done"])
        # The sender may be stuck on the blocks the backup never takes: stop() must not care.
        t0 = time.monotonic()
        rep.stop()
        return dict(accepted=accepted, stop_s=time.monotonic() - t0)
    caches = make_caches(shape=(backup_blocks, backup_rows) + SHAPE[2:])
    rep = _link(mgr, members, caches)
    error = None
    try:
        rep.receive(GROUP, source, 5.0)
    except ValueError as e:
        error = str(e)
    store.set("backup_done", "1")
    return dict(error=error, blocks=block_bytes(caches), stats=rep.stats())


def staging_reuse(mgr, store, me, members, steps):
    """steps: [(src ids, dst ids, first rows, end rows)], one transfer each:
    the source rewrites its source blocks before each step and waits for the
    backup to have it, so staging is reused by transfers that grow and shrink.
    Both snapshot their rows after each step."""
    source, backup = members
    snapshots = []
    if me == source:
        caches = make_caches(seed=31)
        gen = torch.Generator().manual_seed(32)
        rep = _link(mgr, members, caches)
        rep.start(GROUP, backup)
        for i, (src, dst, begin, end) in enumerate(steps):
            for c in caches:
                for b in src:
                    fill_random(c[b], gen)
            assert rep.submit(src, dst, i, begin, end)
            snapshots.append(rows_bytes(caches))
            store.wait([f"got{i}"])
        stats = _finish_source(rep, store)
        return dict(rows=snapshots, stats=stats)
    caches = make_caches()
    rep = _link(mgr, members, caches)
    for i in range(len(steps)):
        assert _receive_until(rep, source, 1) == [i]
        snapshots.append(rows_bytes(caches))
        store.set(f"got{i}", "1")
    _finish_backup(rep, store)
    return dict(rows=snapshots, stats=rep.stats())


def two_links_in(mgr, store, me, members, shape, num_steps):
    """members[0] and members[1] each send to members[2] on a link of their
    own, a block a transfer; the backup receives on both at once, a thread
    each, into disjoint halves of its blocks (source k's block b lands in
    backup block k * half + b)."""
    import threading

    backup = members[2]
    half = shape[0]
    if me != backup:
        k = members.index(me)
        group = f"repl.{me}"
        caches = make_caches(shape=shape, seed=40 + k)
        mgr.build(group, [me, backup], deadline_s=BUILD_DEADLINE_S)
        # One block a transfer: many transfers, interleaved with the other link's.
        rep = _comm.KVReplicator(mgr._core, caches, caches[0][0].nbytes * 4, QUIET_KEEPALIVE_S)
        rep.start(group, backup)
        for step in range(num_steps):
            b = step % half
            assert rep.submit([b], [k * half + b], step)
        store.wait(["backup_done"])
        _wait_until(lambda: rep.stats()["blocks_sent"] == num_steps,
                    "the sender counting its sends")
        stats = rep.stats()
        rep.stop()
        store.set(f"source_done.{me}", "1")
        return dict(blocks=block_bytes(caches), stats=stats)
    caches = make_caches(shape=(2 * half,) + tuple(shape[1:]))
    for source in members[:2]:
        mgr.build(f"repl.{source}", [source, backup], deadline_s=BUILD_DEADLINE_S)
    rep = _comm.KVReplicator(mgr._core, caches, caches[0][0].nbytes * 4, QUIET_KEEPALIVE_S)
    acked, errors = {}, []

    def receive(source):
        try:
            got = []
            while len(got) < num_steps:
                got += rep.receive(f"repl.{source}", source, 10.0)
            acked[source] = got
        except BaseException as e:  # reported to the test below
            errors.append(f"{source}: {e!r}")

    threads = [threading.Thread(target=receive, args=(s,)) for s in members[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.set("backup_done", "1")
    store.wait([f"source_done.{s}" for s in members[:2]])
    return dict(blocks=block_bytes(caches), acked=acked, errors=errors, stats=rep.stats())


# ---- CUDA caches (tests/test_gpu_replication.py) -----------------------------

def cuda_copies_spans(mgr, store, me, members, shape, dtype, steps, source_device,
                      backup_device):
    """copies_rows with each side's caches on its own device ("cuda" or
    "cpu"): a CUDA packer's staging must be laid out as the CPU one's."""
    source, backup = members
    device = source_device if me == source else backup_device
    seed = 4242 if me == source else None
    caches = [c.to(device) for c in make_caches(shape=shape, dtype=dtype, seed=seed)]
    rep = _link(mgr, members, caches)
    if me == source:
        rep.start(GROUP, backup)
        accepted = [rep.submit(src, dst, step, begin, end)
                    for step, src, dst, begin, end in steps]
        stats = _finish_source(rep, store)
        return dict(rows=rows_bytes([c.cpu() for c in caches]), accepted=accepted, stats=stats)
    acked = _receive_until(rep, source, len(steps))
    # What receive wrote is in the caches once it returns, whatever stream reads them.
    rows = rows_bytes([c.cpu() for c in caches])
    _finish_backup(rep, store)
    return dict(rows=rows, acked=acked, stats=rep.stats())


def cuda_pending_write(mgr, store, me, members, streams, sleep_cycles):
    """The source writes a block's KV on the current stream behind about a
    second of GPU work and submits it at once, as a forward pass does:
    - "default": on the default stream;
    - "side": on a stream made current for the write and the submit;
    - "two": block 3 that way on one stream, block 4 at once on another
      stream, both in one transfer (a warm-up transfer first, then a flush,
      so that the interval holds them together).
    The backup must get the written values. The source reports whether the
    write was still pending when submit returned, and how long submit took."""
    source, backup = members
    shape = (8, 16, 4, 64)
    mgr.build(GROUP, members, deadline_s=BUILD_DEADLINE_S)
    caches = [torch.zeros(shape, device="cuda") for _ in range(4)]
    rep = _comm.KVReplicator(mgr._core, caches, 1 << 22, QUIET_KEEPALIVE_S, 30.0)
    if me == backup:
        calls = [rep.receive(GROUP, source, 30.0) for _ in range(2)]
        rows = block_bytes([c.cpu() for c in caches])
        _finish_backup(rep, store)
        return dict(calls=calls, blocks=rows)
    gen = torch.Generator().manual_seed(5)
    values = [[torch.randn(shape[1:], generator=gen).cuda() for _ in caches] for _ in range(2)]
    torch.cuda.synchronize()
    rep.start(GROUP, backup)
    assert rep.submit([0], [0], 1)  # block 0 is zeros: the warm-up transfer
    _wait_until(lambda: rep.stats()["transfers"] == 1, "the warm-up transfer")
    slow = torch.cuda.Stream() if streams != "default" else torch.cuda.current_stream()
    with torch.cuda.stream(slow):
        torch.cuda._sleep(sleep_cycles)  # the rest of a long forward pass
        for c, v in zip(caches, values[0]):
            c[3].copy_(v)
        written = torch.cuda.Event()
        written.record()
        t0 = time.monotonic()
        assert rep.submit([3], [5], 2)
        submit_s = time.monotonic() - t0
    if streams == "two":
        with torch.cuda.stream(torch.cuda.Stream()):
            for c, v in zip(caches, values[1]):
                c[4].copy_(v)
            assert rep.submit([4], [6], 3)
    pending = not written.query()
    rep.flush()
    stats = _finish_source(rep, store)
    torch.cuda.synchronize()
    return dict(blocks=block_bytes([c.cpu() for c in caches]), pending=pending,
                submit_s=submit_s, stats=stats)
