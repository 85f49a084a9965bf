"""Garbage and wrong-schema bytes on the control sockets are rejected and
logged, and both ends keep working: a real worker process against a control
socket of the test's own, and a real deployment against a raw socket."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import pytest

zmq = pytest.importorskip("zmq")  # a dependency of the package; absent on bare GPU images

from kevlarflow import LLM, SamplingParams  # noqa: E402
from kevlarflow.deploy.control import ControllerEndpoint
from kevlarflow.deploy.join import TOKEN_ENV, JoinKeys
from helpers.models import tiny_model
from helpers.net import free_port

TOKEN = "a-join-token-of-the-tests"
KEYS = JoinKeys(TOKEN)


def _worker(endpoint, parent_pid) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kevlarflow", "worker", "--controller",
                             f"127.0.0.1:{endpoint.port}", "--parent-pid", str(parent_pid)],
                            env=dict(os.environ, **{TOKEN_ENV: TOKEN}))

GARBAGE = [b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3]),
           msgpack.packb({"type": "assign"}), msgpack.packb({"type": "rm -rf /", "x": 1}),
           msgpack.packb({"type": "step", "step": "1", "group": 0, "seqs": None,
                          "token_ids": None, "sample": None}),
           b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR."]  # a pickle


def _expect(endpoint, kind, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = endpoint.recv(100)
        if got is not None and got[1]["type"] == kind:
            return got
    raise AssertionError(f"no {kind!r} message within {timeout_s} s")


@pytest.fixture
def lone_worker():
    """A real worker process connected to a control socket the test drives."""
    endpoint = ControllerEndpoint(KEYS)
    proc = _worker(endpoint, os.getpid())
    try:
        yield endpoint, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        endpoint.close()


def test_worker_rejects_garbage_and_keeps_serving(lone_worker):
    endpoint, proc = lone_worker
    peer, hello = _expect(endpoint, "register")
    assert hello["pid"] == proc.pid
    for data in GARBAGE:
        endpoint.sock.send_multipart([peer, data])
    endpoint.sock.send_multipart([peer, b"two", b"frames"])
    # Still alive and listening: a valid assignment is carried out.
    endpoint.send(peer, "assign", worker="w0.0", instance=0, stage=0, num_stages=1,
                  model=tiny_model(), dtype=None, block_size=4, num_blocks=8, max_model_len=64,
                  store_port=1, store_prefix="p", deadline_s=5.0, attention_backend="native", threads=1,
                  heartbeat_s=0.1, replica_blocks=0, replication_transfer_bytes=1 << 20,
                  replication_interval_s=0.0, device="cpu",
                  max_num_seqs=8, enforce_eager=False)
    _expect(endpoint, "ready")
    endpoint.send(peer, "build_group", group="pipe0", members=["w0.0"], generation=0,
                  backend="gloo")
    _expect(endpoint, "group_ready")
    sample = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, index=0, logprobs=None)
    # Well-formed steps it cannot execute: an error reply each, nothing written.
    for seqs, ids in [([[2, 0, [9]]], [1, 2]),        # block id out of the pool
                      ([[9, 0, [0]]], [1] * 9),       # more tokens than its blocks hold
                      ([[2, 0, [0]]], [1]),           # token ids missing
                      ([[2, 0, [0]]], [1, 10**6])]:   # token id past the vocabulary
        endpoint.send(peer, "step", step=1, group="pipe0", generation=0, seqs=seqs, token_ids=ids,
                      sample=[sample], replicate=None, priority=False)
        _, reply = _expect(endpoint, "error")
        assert reply["kind"] == "bad_step" and reply["step"] == 1
    endpoint.send(peer, "step", step=2, group="nope", generation=0, seqs=[[2, 0, [0]]], token_ids=[1, 2],
                  sample=[sample], replicate=None, priority=False)
    assert _expect(endpoint, "error")[1]["kind"] == "bad_step"
    # And a good one is answered with a token.
    endpoint.send(peer, "step", step=3, group="pipe0", generation=0, seqs=[[2, 0, [0]]], token_ids=[1, 2],
                  sample=[sample], replicate=None, priority=False)
    _, result = _expect(endpoint, "result")
    assert result["step"] == 3 and len(result["tokens"]) == 1
    endpoint.send(peer, "shutdown")
    assert proc.wait(timeout=30) == 0


def test_worker_exits_when_its_controller_process_is_gone():
    endpoint = ControllerEndpoint(KEYS)
    # A parent pid that is not ours: the worker sees "its controller" gone at once.
    proc = _worker(endpoint, 1)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        endpoint.close()


def test_a_wait_for_messages_wakes_when_a_worker_process_exits():
    """The controller does not poll for exits: a process's pidfd in the wait
    ends it the moment the process is gone."""
    from kevlarflow.deploy.launcher import LocalLauncher

    endpoint = ControllerEndpoint(KEYS)
    launcher = LocalLauncher(f"127.0.0.1:{endpoint.port}", TOKEN)
    try:
        proc = launcher.spawn(0, 0)
        fds = launcher.exit_fds()  # taken while it runs
        if not fds:
            pytest.skip("no pidfd on this system: exits are polled")
        threading.Timer(0.5, proc.kill).start()
        start = time.monotonic()
        while endpoint.recv(30_000, fds) is not None:
            pass  # messages it sent before dying
        assert time.monotonic() - start < 10, "the wait did not end when the process exited"
        assert launcher.exited() == {(0, 0): -9} and launcher.exit_fds() == []
    finally:
        launcher.stop(set(), grace_s=0)
        endpoint.close()


@pytest.mark.parametrize("case", ["stopped", "not told"])
def test_stopping_kills_at_once_a_worker_that_cannot_exit_in_the_grace(case):
    """Workers told to shut down get the grace to exit; a worker stopped by
    SIGSTOP cannot exit however long it is given, and one never told (a
    replacement still starting, not yet registered) would wait for a
    controller that is going away: stop() kills those at once."""
    from kevlarflow.deploy.launcher import LocalLauncher

    endpoint = ControllerEndpoint(KEYS)
    launcher = LocalLauncher(f"127.0.0.1:{endpoint.port}", TOKEN)
    proc = launcher.spawn(0, 0)
    try:
        if case == "stopped":
            os.kill(proc.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while not launcher.stopped((0, 0)):
                assert time.monotonic() < deadline, "the worker never showed as stopped"
                time.sleep(0.01)
        start = time.monotonic()
        launcher.stop({(0, 0)} if case == "stopped" else set(), grace_s=120)
        assert time.monotonic() - start < 60, "stop() waited out the grace"
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        endpoint.close()


def test_a_shutdown_lets_registered_workers_exit_and_kills_a_starting_replacement():
    """The workers that registered are told to shut down and exit by
    themselves (status 0); a replacement still starting is killed."""
    with LLM(tiny_model(), num_instances=2, pp_size=1, block_size=4,
             kv_cache_memory=1 << 20) as llm:
        engine = llm.engine
        home = dict(engine.launcher.procs)
        engine.inject_fault(0, 0, "kill")
        deadline = time.monotonic() + 30
        while not engine.events.of("replacement_started"):
            assert time.monotonic() < deadline, "no replacement started"
            engine.step(timeout_s=0.05)
        replacement = engine.launcher.procs[(0, 0)]
        assert replacement is not home[(0, 0)] and not engine.workers["w0.0"].peer
    assert home[(0, 0)].returncode == -signal.SIGKILL  # the fault
    assert home[(1, 0)].returncode == 0
    assert replacement.returncode == -signal.SIGKILL


def test_a_busy_port_is_a_clear_error_and_leaves_nothing_open():
    """A control or store port some other process holds: an error naming
    it, and whatever the controller had opened already (the store, the
    join gate's thread) is closed again."""
    from kevlarflow.deploy.controller import Controller, DeploymentConfig

    model = tiny_model()
    threads = set(threading.enumerate())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        store_port = free_port()
        for held in ({"store_port": port},
                     {"port": port, "store_port": store_port}):
            config = DeploymentConfig(host="127.0.0.1", num_instances=1, pp_size=1, **held)
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
                Controller(model, config)
    # The store that did start (on store_port) has stopped listening.
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", store_port))
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - threads:
        assert time.monotonic() < deadline, f"left running: {set(threading.enumerate()) - threads}"
        time.sleep(0.05)


def test_deployment_rejects_garbage_and_keeps_serving(caplog):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    caplog.set_level("INFO", logger="kevlarflow")
    with LLM(tiny_model(), num_instances=1, pp_size=1, block_size=4, join_token=TOKEN) as llm:
        before = llm.generate(["hello there"], greedy)[0].token_ids
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        KEYS.connect_as_worker(sock)  # a peer that has the token, and sends garbage
        sock.connect(f"tcp://{llm.engine.address}")
        for data in GARBAGE:
            sock.send(data)
        sock.send_multipart([b"two", b"frames"])
        # Valid messages from a peer that never registered are dropped too.
        sock.send(msgpack.packb({"type": "result", "step": 0, "tokens": [1], "logprobs": [None]}))
        def dropped():
            return [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        deadline = time.monotonic() + 30
        while len(dropped()) < len(GARBAGE) + 2 and time.monotonic() < deadline:
            llm.engine.step(timeout_s=0.1)
        # Each one dropped, and said so once: garbage, two frames, unregistered.
        assert len(dropped()) == len(GARBAGE) + 2, dropped()
        assert sum("frames (expected 2)" in m for m in dropped()) == 1
        assert sum("no worker (any more)" in m for m in dropped()) == 1
        assert llm.generate(["hello there"], greedy)[0].token_ids == before
        sock.close()
        ctx.term()
