"""KV replication in a live deployment: workers copy their requests' KV to
their backup while they serve, and after a failure the borrowed worker
resumes them from those replicas, recomputing only the tokens past each
request's watermark. Outputs stay those of a failure-free run."""
import os
import re
import signal
import time

import pytest

from helpers.failover import ARGS, Streams, all_home, recomputed, timeline, workload
from helpers.models import tiny_model
from kevlarflow import LLM

# The tiny model decodes a token in milliseconds: transfers every 50 ms keep
# the replication lag at tens of tokens, as the default keeps it at a few on
# real models.
ARGS = dict(ARGS, replication_interval_s=0.05)


@pytest.fixture(scope="module")
def expected():
    prompts, params = workload()
    with LLM(tiny_model(), **{k: v for k, v in ARGS.items() if k != "hang_timeout_s"}) as llm:
        outs = llm.generate(prompts, params)
    # Without a failure the model runs each token once: the count that the
    # tests below compare with is exact.
    assert all(o.metrics.tokens_run == len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outs))
    return [o.token_ids for o in outs]


def _start(streams, prompts, params, min_tokens=4):
    seqs = streams.add(prompts, params)
    links = streams.engine.replication.links
    streams.until(lambda: all(len(s.output_token_ids) >= min_tokens or s.is_finished for s in seqs)
                  and all(link.ready for link in links.values()), "tokens")
    return seqs


def _moves_at_reroute(streams):
    """(computed, kept) of each request the failure moved, read as soon as
    the instance is rerouted (a later rejoin moves them again)."""
    streams.until(lambda: streams.engine.events.of("rerouted"), "the reroute")
    return dict(streams.engine.recovery.stats.moves)


@pytest.mark.parametrize("stage,kind", [(0, "kill"), (1, "kill"), (1, "hang")])
def test_a_failure_recomputes_at_most_a_block_per_request(expected, stage, kind):
    """With a transfer after every step, a request's KV is durable at the
    backup but for its last step or so: after the failure, no request runs
    more than a block of tokens again, counted from the tokens the workers
    ran (not from the replication's own records), and those records agree."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2,
             **dict(ARGS, replication_interval_s=0)) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = _start(streams, prompts, params)
        victims = engine.instances[0].running()
        assert victims and all(s.num_computed_tokens > ARGS["block_size"] for s in victims)
        engine.inject_fault(0, stage, kind)
        moves = _moves_at_reroute(streams)
        streams.finish()
        assert streams.tokens(seqs) == expected
        assert not any(s.num_preemptions for s in seqs)
        for seq in seqs:
            computed, kept = moves.get(seq.request_id, (0, 0))
            why = f"{seq.request_id}: ran {recomputed(seq)} again, moved {computed} kept {kept}\n"
            assert recomputed(seq) == computed - kept, why + timeline(engine)
            assert recomputed(seq) <= ARGS["block_size"], why + timeline(engine)
        moved = [s for s in victims if s.request_id in moves]  # some may end first
        assert moved and all(moves[s.request_id][1] > 0 for s in moved)


def test_a_full_replica_pool_keeps_some_requests_replicas(expected):
    """A replica pool of 8 blocks holds a few requests only. It never lends
    more than its blocks, none of them a live one; some requests have
    replicas, the others none. After the failure, those without replicas
    recompute all their KV, the others only their lag, and every request
    still finishes right."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, replica_memory=ARGS["kv_cache_memory"] // 32,
             **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = _start(streams, prompts, params)
        link = engine.replication.links["w0.1"]
        assert link.backup == "w1.1"
        mine = [s for s in seqs if engine.owner[s] is engine.instances[0] and not s.is_finished]
        streams.until(lambda: all(s in link.records or s.is_finished for s in mine),
                      "a step of each on the link")
        mine = [s for s in mine if not s.is_finished]
        held = [b for s, r in link.records.items() if not r.dropped for b in link.alloc.table(s)]
        assert len(held) == len(set(held)) <= len(link.ids) == engine.replication.replica_blocks[1]
        live = {b for s in engine.instances[1].sequences for b in engine.pools["w1.1"].table(s)}
        assert not live & set(link.ids), "replica blocks lent out as live ones"
        # Both kinds at the moment of the kill: a request with KV durable
        # at the backup, and one without replicas. (Which ones keep them, the
        # earliest that fit, is planning's to show: test_replication_planning.py,
        # without the races of a live run.)
        def running():  # and not about to finish while the failure is detected
            return [s for s in mine if s in link.records
                    and s.params.max_tokens - len(s.output_token_ids) > 8]
        streams.until(lambda: any(link.watermark(s) > 0 for s in running())
                      and any(link.records[s].dropped for s in running()), "both kinds")
        victim = engine.launcher.procs[(0, 1)]
        engine.inject_fault(0, 1, "kill")
        # Gone before the next step: a step planned while the process still
        # died could drop the replicas of a request that outgrew the pool.
        victim.wait(timeout=30)
        moves = _moves_at_reroute(streams)
        streams.finish()
        assert streams.tokens(seqs) == expected
        # What each ran again is what it lacked at the backup: all its KV
        # without replicas, its lag with them; both kinds were there.
        kept = [moves[s.request_id][1] for s in mine if s.request_id in moves]
        assert any(k > 0 for k in kept) and any(k == 0 for k in kept), kept
        for seq in seqs:
            computed, kept_ = moves.get(seq.request_id, (0, 0))
            assert recomputed(seq) == computed - kept_, seq.request_id
        assert all(s.finish_reason == "length" for s in seqs)


def _watermarks(engine, instance, stage):
    """request id -> (tokens computed, tokens durable at the backup) of the
    requests of instance whose stage-`stage` worker is about to fail."""
    worker = engine.instances[instance].workers[stage]
    return {seq.request_id: (seq.num_computed_tokens, engine.replication.watermark(seq, worker))
            for seq in engine.instances[instance].running()}


def test_without_a_failure_each_token_s_kv_travels_once(expected):
    """A decode step writes one row of a block that earlier transfers already
    carried: only that row goes. Over a fault-free run the bytes sent are
    exactly the KV of the tokens computed, at every stage, and the backups
    receive all of them (the workers' heartbeats report both)."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine = llm.engine
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == expected
        assert not any(link.dropped for link in engine.replication.links.values())
        tokens = sum(o.metrics.tokens_run for o in outs)
        row_bytes = sum(engine.replication.block_bytes) // engine.replication.block_size
        streams = Streams(engine)
        streams.until(lambda: min(engine.status().replication_totals[k] for k in
                                  ("bytes_sent", "bytes_received")) >= tokens * row_bytes,
                      "the last transfers", timeout_s=30)
        totals = engine.status().replication_totals
        assert totals["bytes_sent"] == totals["bytes_received"] == tokens * row_bytes, \
            (totals, tokens * row_bytes)
        assert totals["pack_s"] > 0 and totals["unpack_s"] > 0
        assert totals["send_s"] >= totals["pack_s"]
        assert engine.status().stats["bytes_replicated"] == tokens * row_bytes


def test_without_a_replica_pool_a_failure_recomputes_all_kv(expected):
    """replica_memory=0 turns replication off: no link, no copy, and after
    the kill each moved request runs again every token it had computed."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, replica_memory=0, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = _start(streams, prompts, params)
        assert not engine.replication.enabled and not engine.replication.links
        engine.inject_fault(0, 1, "kill")
        moves = _moves_at_reroute(streams)
        streams.finish()
        assert streams.tokens(seqs) == expected
        assert moves and all(kept == 0 for _, kept in moves.values())
        for seq in seqs:
            computed, _ = moves.get(seq.request_id, (0, 0))
            assert recomputed(seq) == computed
        assert engine.status().stats["bytes_replicated"] == 0


def test_replication_survives_a_rejoin(expected):
    """After (0, 1) is replaced, the ring is formed again with the
    replacement in it, so a second failure, of (1, 1), resumes instance 1's
    requests from the replicas the replacement received."""
    prompts, params = workload()
    with LLM(tiny_model(), num_instances=2, pp_size=2, **ARGS) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = _start(streams, prompts, params)
        engine.inject_fault(0, 1, "kill")
        streams.finish()
        assert streams.tokens(seqs) == expected
        streams.until(lambda: engine.events.of("rejoined") and all_home(engine), "the rejoin")
        assert engine.replication.links["w1.1"].backup == "w0.1"
        seqs = _start(streams, prompts, params)
        before = _watermarks(engine, 1, 1)
        assert any(durable for _, durable in before.values()), "nothing replicated yet"
        engine.inject_fault(1, 1, "kill")
        moves = _moves_at_reroute(streams)
        streams.finish()
        assert streams.tokens(seqs) == expected
        for seq in seqs:
            if seq.request_id in before and seq.request_id in moves:
                _, durable = before[seq.request_id]
                computed, kept = moves[seq.request_id]
                assert kept >= durable and recomputed(seq) == computed - kept, seq.request_id


@pytest.mark.parametrize("instances,pp", [(2, 2), (3, 1)])
def test_requests_move_back_without_losing_their_kv(expected, instances, pp):
    """At the rejoin, requests still running move back to the replacement
    through the replication link, once all their KV is there: they keep
    every token of it, and run none again. With three instances too, where
    the borrowed worker's next in instance order is another worker."""
    prompts, params = workload()
    for p in params:
        # Still running when the replacement joins. (Past about 120 tokens a
        # near-tie of this random model flips with the batch around it, in the
        # in-process engine too: the linear layers are not batch-invariant.)
        p.max_tokens = 120
    prompts, params = prompts[:4], params[:4]
    # A transfer after every step: the lag is then a token or two.
    with LLM(tiny_model(), num_instances=instances, pp_size=pp,
             **dict(ARGS, replication_interval_s=0)) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = _start(streams, prompts, params)
        engine.inject_fault(0, pp - 1, "kill")
        moved_at_failure = _moves_at_reroute(streams)
        # Not stepping meanwhile, so that the requests are still running when
        # the replacement (started already) registers, loads and joins.
        time.sleep(3)
        streams.until(lambda: engine.events.of("rejoined"), "the rejoin")
        moved_back = {rid: move for rid, move in engine.recovery.stats.moves.items()
                      if moved_at_failure.get(rid) != move}
        assert moved_back, "no request left to move\n" + timeline(engine)
        for computed, kept in moved_back.values():
            assert kept == computed, ((computed, kept), timeline(engine))
        rejoined = engine.events.of("rejoined")[0]
        assert rejoined.detail.endswith("recompute 0"), timeline(engine)
        streams.finish()
        # What they ran again is the failure's recompute, nothing for the move.
        for seq in seqs:
            computed, kept = moved_at_failure.get(seq.request_id, (0, 0))
            assert recomputed(seq) == computed - kept, \
                f"{seq.request_id}: {recomputed(seq)} != {computed} - {kept}\n{timeline(engine)}"
        with LLM(tiny_model(), **{k: v for k, v in ARGS.items() if k != "hang_timeout_s"}) as ref:
            want = [o.token_ids for o in ref.generate(prompts, params)]
        assert streams.tokens(seqs) == want


def test_two_instances_that_borrowed_one_worker_both_move_back_keeping_their_kv():
    """Three instances of one stage; w0.0 and w2.0 are killed at once, so
    instances 0 and 2 both borrow w1.0, which has one backup. Their
    replacements load together: one moves back through w1.0's replicas while
    the other serves on, then the other does, and neither runs a token again
    for its move."""
    prompts, params = workload()
    for p in params:
        p.max_tokens = 120  # still running when the replacements join (see above)
    prompts, params = prompts[:6], params[:6]
    with LLM(tiny_model(), num_instances=3, pp_size=1,
             **dict(ARGS, replication_interval_s=0)) as llm:
        engine = llm.engine
        streams = Streams(engine)
        seqs = _start(streams, prompts, params)
        assert all(engine.instances[i].running() for i in (0, 2)), timeline(engine)
        engine.inject_fault(0, 0, "kill")
        engine.inject_fault(2, 0, "kill")
        streams.until(lambda: all(engine.instances[i].workers == ["w1.0"] for i in (0, 2))
                      and all(i.serving for i in engine.instances), "both on w1.0")
        time.sleep(3)  # both replacements register while nothing steps
        streams.until(lambda: len(engine.events.of("rejoined")) == 2, "both rejoins")
        rejoins = engine.events.of("rejoined")
        assert {e.instance for e in rejoins} == {0, 2}, timeline(engine)
        # Each moved requests that had KV, and kept all of it.
        for e in rejoins:
            move = re.fullmatch(r"(\d+) requests keep (\d+) tokens of KV, recompute 0", e.detail)
            assert move and int(move[1]) > 0 and int(move[2]) > 0, timeline(engine)
        streams.finish()
        with LLM(tiny_model(), **{k: v for k, v in ARGS.items() if k != "hang_timeout_s"}) as ref:
            want = [o.token_ids for o in ref.generate(prompts, params)]
        assert streams.tokens(seqs) == want


def _serve(streams, prompts, params, instance: int) -> float:
    """Seconds until the requests that go to instance finish."""
    start = time.monotonic()
    seqs = streams.add(prompts, params)
    mine = [s for s in seqs if streams.engine.owner[s].index == instance]
    assert mine
    streams.until(lambda: all(s.is_finished for s in mine), f"instance {instance}'s requests",
                  timeout_s=120)
    return time.monotonic() - start


def test_a_hung_backup_does_not_stall_its_source():
    """The backup of (0, 0) stops (SIGSTOP) without being declared hung (long
    hang timeout). Instance 0 serves as fast as it did before, its
    replicator blocked in a send at most, and its steps keep handing blocks
    to copy; once the backup continues, every one of them arrives."""
    prompts, params = workload(30)
    with LLM(tiny_model(), num_instances=2, pp_size=1,
             **dict(ARGS, hang_timeout_s=120.0, comm_deadline_s=120.0)) as llm:
        engine = llm.engine
        streams = Streams(engine)
        _start(streams, prompts[:2], params[:2], min_tokens=1)
        streams.finish()
        link = engine.replication.links["w0.0"]
        backup = engine.workers[link.backup].pid
        unhung_s = _serve(streams, prompts, params, 0)
        streams.until(lambda: link.rows_acked == link.rows_sent, "the copies")
        os.kill(backup, signal.SIGSTOP)
        try:
            sent = link.rows_sent
            hung_s = _serve(streams, prompts, params, 0)
            assert link.rows_sent > sent, "no copy asked for during the hang"
            acked = link.rows_acked
        finally:
            os.kill(backup, signal.SIGCONT)
        # Half its speed or worse would be a stall: instance 0 is alone on
        # the cores now, so it is usually faster than before.
        assert hung_s < 2 * unhung_s, (hung_s, unhung_s)
        streams.until(lambda: link.rows_acked == link.rows_sent, "the copies held back")
        assert link.rows_acked > acked
        streams.finish()
        assert not engine.events.of("detected")
        assert all(o.finish_reason == "length" for o in streams.outputs.values())
