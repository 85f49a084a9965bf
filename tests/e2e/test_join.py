"""Who may join a deployment, and what hostile control traffic does to it:
real controllers, real worker processes, real sockets.

- A worker without the join token, or with another one, is refused in the
  handshake: it exits with an error that says so, the controller logs its
  address, and nothing is ever routed to it.
- Random, truncated, type-confused and oversized frames, from a peer that
  holds the token, leave both the controller and a worker serving; each
  bad frame is logged once; an oversized one ends its connection unread.
- The control socket and the rendezvous store listen on the configured host
  only, and the store's keys sit under a prefix of the deployment's own."""
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import msgpack
import psutil
import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings, strategies as st

zmq = pytest.importorskip("zmq")  # a dependency of the package; absent on bare GPU images

from helpers.models import tiny_model  # noqa: E402
from helpers.net import free_port  # noqa: E402
from kevlarflow import LLM, SamplingParams  # noqa: E402
from kevlarflow.deploy import protocol  # noqa: E402
from kevlarflow.deploy.control import ControllerEndpoint  # noqa: E402
from kevlarflow.deploy.join import TOKEN_ENV, JoinKeys  # noqa: E402
from kevlarflow.model.make_model import make_model  # noqa: E402

TOKEN = "the-deployment-join-token"
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _worker(address: str, token: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    return subprocess.Popen([sys.executable, "-m", "kevlarflow", "worker", "--controller", address],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _start_controller(model: str, port: int) -> tuple[dict, threading.Thread]:
    """A controller that waits for one worker started by hand, constructed on
    a thread: started["llm"] once a worker joined, or started["error"]."""
    started: dict = {}

    def controller():
        try:
            started["llm"] = LLM(model, num_instances=1, pp_size=1, spawn_workers=False,
                                 port=port, join_token=TOKEN, block_size=4, start_timeout_s=120)
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            started["error"] = error

    thread = threading.Thread(target=controller)
    thread.start()
    return started, thread


def _joined(started: dict, thread: threading.Thread, worker: subprocess.Popen) -> LLM:
    """The controller, once `worker` joined it."""
    thread.join(timeout=120)
    assert "error" not in started, started.get("error")
    assert "llm" in started, "the worker never joined"
    return started["llm"]


def _serves_then_stops(llm: LLM, worker: subprocess.Popen) -> None:
    with llm:
        assert llm.generate(["hello"], GREEDY)[0].finish_reason == "length"
    assert worker.wait(timeout=30) == 0  # told to shut down with the deployment


def _reap(thread: threading.Thread) -> None:
    thread.join(timeout=1)
    for p in psutil.Process().children(recursive=True):
        p.kill()


def test_workers_without_the_token_are_refused_and_one_with_it_serves(caplog):
    caplog.set_level(logging.WARNING, logger="kevlarflow")
    port = free_port()
    address = f"127.0.0.1:{port}"
    started, thread = _start_controller(tiny_model(), port)
    try:
        for token in (None, "another-deployments-token"):
            proc = _worker(address, token)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 1, out
            assert "the controller refused this worker" in out and "join token" in out, out
        refusals = [r.getMessage() for r in caplog.records if "refused a worker" in r.getMessage()]
        assert refusals == ["refused a worker at 127.0.0.1: the join token is missing or wrong"]
        assert "llm" not in started and thread.is_alive()  # nobody joined
        good = _worker(address, TOKEN)
        llm = _joined(started, thread, good)
        (record,) = list(llm.engine.workers)
        assert record.pid == good.pid  # the only worker it ever registered
        _serves_then_stops(llm, good)
    finally:
        _reap(thread)


def test_a_worker_that_loaded_another_checkpoint_is_refused(tmp_path, caplog):
    """The checkpoint at the deployment's path is replaced, on this "host",
    by another one of the same shapes after the controller read it: a worker
    that loads it is refused with what differs, and exits with an error; one
    that loads the controller's joins."""
    caplog.set_level(logging.WARNING, logger="kevlarflow")
    model, other = tmp_path / "model", tmp_path / "other"
    shutil.copytree(tiny_model(), model)
    make_model(other, preset="tiny", flavour="llama", seed=1)
    port = free_port()
    started, thread = _start_controller(str(model), port)
    try:
        _wait_listening(port)
        original = tmp_path / "original.safetensors"
        shutil.copy(model / "model.safetensors", original)
        shutil.copy(other / "model.safetensors", model / "model.safetensors")
        proc = _worker(f"127.0.0.1:{port}", TOKEN)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1, out
        assert "another checkpoint" in out and "weight files differ" in out, out
        assert any("w0.0" in r.getMessage() and "another checkpoint" in r.getMessage()
                   for r in caplog.records)
        assert "llm" not in started and thread.is_alive()
        shutil.copy(original, model / "model.safetensors")
        good = _worker(f"127.0.0.1:{port}", TOKEN)
        _serves_then_stops(_joined(started, thread, good), good)
    finally:
        _reap(thread)


def _wait_listening(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, "the controller never listened"
        time.sleep(0.05)


# Hostile frames ----------------------------------------------------------------------------

def _field_values():
    any_int = st.integers(-2**63, 2**64 - 1)  # what msgpack can carry
    return st.one_of(st.none(), st.booleans(), any_int, st.floats(),
                     st.text(max_size=20), st.binary(max_size=20),
                     st.lists(st.integers(-5, 5), max_size=5),
                     st.dictionaries(st.text(max_size=5), any_int, max_size=3))


def _bad_frames(schema: dict, n: int):
    """n frames a confused or hostile peer sends: random bytes, messages of
    a known type with fields of the wrong types, missing or extra, and such
    messages cut short. None is a valid message: each has a field "x",
    which no message takes."""
    fields = st.dictionaries(st.sampled_from(["step", "group", "generation", "tokens", "seqs",
                                              "pid", "worker", "token_ids"]),
                             _field_values(), max_size=5)
    confused = st.builds(
        lambda kind, f, x: msgpack.packb({"type": kind, **f, "x": x}, use_bin_type=True),
        st.sampled_from(sorted(schema) + ["nope"]), fields, _field_values())
    truncated = confused.flatmap(lambda data: st.integers(1, len(data) - 1).map(
        lambda k: data[:k]))
    return st.lists(st.one_of(st.binary(max_size=200), confused, truncated),
                    min_size=n, max_size=n)


FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
PER_EXAMPLE = 55  # x 20 examples: 1100 frames at each end


@pytest.fixture(scope="module")
def deployment():
    with LLM(tiny_model(), num_instances=1, pp_size=1, block_size=4, join_token=TOKEN) as llm:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        JoinKeys(TOKEN).connect_as_worker(sock)  # a peer that holds the token
        sock.connect(f"tcp://{llm.engine.address}")
        yield llm, sock
        sock.close()
        ctx.term()


def _dropped(caplog) -> int:
    return sum("dropped" in r.getMessage() for r in caplog.records)


@FUZZ
@given(frames=_bad_frames(protocol.TO_CONTROLLER, PER_EXAMPLE))
def test_the_controller_drops_every_bad_frame_once_and_keeps_serving(deployment, caplog, frames):
    llm, sock = deployment
    caplog.set_level(logging.WARNING, logger="kevlarflow")
    before = _dropped(caplog)
    for data in frames:
        sock.send(data)
    deadline = time.monotonic() + 30
    while _dropped(caplog) - before < len(frames) and time.monotonic() < deadline:
        llm.engine.step(timeout_s=0.05)
    llm.engine.step(timeout_s=0.1)  # and nothing more comes
    assert _dropped(caplog) - before == len(frames)
    assert llm.generate(["hello"], GREEDY)[0].finish_reason == "length"


def test_an_oversized_frame_ends_its_connection_unread(deployment, caplog):
    llm, sock = deployment
    caplog.set_level(logging.WARNING, logger="kevlarflow")
    before = _dropped(caplog)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.send(b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1))
    assert monitor.poll(10_000), "the controller kept a connection that sent an oversized frame"
    sock.disable_monitor()
    monitor.close()
    for _ in range(5):
        llm.engine.step(timeout_s=0.05)
    assert _dropped(caplog) == before  # never decoded
    assert llm.generate(["hello"], GREEDY)[0].finish_reason == "length"


def _expect(endpoint, kind: str, proc, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the worker exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"no {kind!r} from the worker"
        got = endpoint.recv(100)
        if got is not None and got[1]["type"] == kind:
            return got


@pytest.fixture(scope="module")
def lone_worker():
    """A real worker process behind a control socket the test drives, with a
    one-stage pipeline of its own built."""
    endpoint = ControllerEndpoint(JoinKeys(TOKEN))
    proc = subprocess.Popen([sys.executable, "-m", "kevlarflow", "worker", "--controller",
                             f"127.0.0.1:{endpoint.port}", "--parent-pid", str(os.getpid())],
                            env=dict(os.environ, **{TOKEN_ENV: TOKEN}))
    try:
        peer, _ = _expect(endpoint, "register", proc)
        endpoint.send(peer, "assign", worker="w0.0", instance=0, stage=0, num_stages=1,
                      model=tiny_model(), dtype=None, block_size=4, num_blocks=8,
                      max_model_len=64, store_port=1, store_prefix="p", deadline_s=5.0,
                      attention_backend="native", threads=1, heartbeat_s=0.1, replica_blocks=0,
                      replication_transfer_bytes=1 << 20, replication_interval_s=0.0, device="cpu",
                      max_num_seqs=8, enforce_eager=False)
        _expect(endpoint, "ready", proc)
        endpoint.send(peer, "build_group", group="pipe0", members=["w0.0"], generation=0,
                      backend="gloo")
        _expect(endpoint, "group_ready", proc)
        yield endpoint, peer, proc
        endpoint.send(peer, "shutdown")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        endpoint.close()


SAMPLE = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, index=0, logprobs=None)


@FUZZ
@given(frames=_bad_frames(protocol.TO_WORKER, PER_EXAMPLE))
def test_a_worker_survives_bad_frames_from_its_controller(lone_worker, frames):
    """After each flood the worker still runs a step and answers it."""
    endpoint, peer, proc = lone_worker
    for data in frames:
        endpoint.sock.send_multipart([peer, data])
    endpoint.send(peer, "step", step=7, group="pipe0", generation=0, seqs=[[2, 0, [0]]],
                  token_ids=[1, 2], sample=[SAMPLE], replicate=None, priority=False)
    _, result = _expect(endpoint, "result", proc)
    assert result["step"] == 7 and len(result["tokens"]) == 1


# Ports and the store -----------------------------------------------------------------------

def test_the_control_socket_and_the_store_listen_on_the_configured_host_only():
    with LLM(tiny_model(), num_instances=2, pp_size=1, block_size=4) as llm:
        engine = llm.engine
        listening = {c.laddr for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        ports = {engine.endpoint.port, engine.hosted_store.port}
        assert {(ip, port) for ip, port in listening if port in ports} == \
            {("127.0.0.1", port) for port in ports}
        # The communicators' keys live under the deployment's own prefix: a
        # client that only knows the port finds none of them.
        prefix = engine.hosted_store.prefix
        assert len(prefix.rsplit("/", 1)[1]) == 32
        raw = dist.TCPStore("127.0.0.1", engine.hosted_store.port, is_master=False)
        engine.store.set("probe", "1")
        # A set is not answered: a get on the same connection makes sure the
        # store has it before another connection looks.
        assert engine.store.get("probe") == b"1"
        assert raw.check([f"{prefix}/probe"]) and not raw.check(["probe"])
        with LLM(tiny_model(), num_instances=1, pp_size=1, block_size=4) as other:
            assert other.engine.hosted_store.prefix != prefix
