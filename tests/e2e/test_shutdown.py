"""No worker outlives its controller, and a server stops cleanly even in the
middle of a recovery: real processes, real signals.

- The controller is SIGKILLed: its locally spawned workers and workers
  started by hand (`kevlarflow worker --controller ...`, as on another host)
  all exit within 2 s.
- `kevlarflow serve` gets SIGTERM while a worker hang is being recovered
  from, with requests open past the grace: it stops within the grace
  period, the stream ends with an error event and [DONE], the other request
  gets a 503, there is no traceback, and no process is left behind.
- SIGTERM with a request open lets it finish, then reaps the workers; with
  a worker stopped (SIGSTOP, not yet declared hung) it still exits and
  reaps the stopped one too.
- A grace or an outage timeout that is not a number of seconds >= 0 is a
  usage error."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from helpers.models import tiny_model
from helpers.net import free_port

ENGINE_ARGS = ["--block-size", "4", "--kv-cache-memory", str(1 << 20),
               "--max-num-batched-tokens", "32"]
EXIT_WITHIN_S = 2.0

CONTROLLER = """
import sys, time
from kevlarflow import LLM
llm = LLM(sys.argv[1], num_instances=1, pp_size=2, spawn_workers=False, port=int(sys.argv[2]),
          join_token=sys.argv[3],
          start_timeout_s=120, block_size=4, kv_cache_memory=1 << 20)
print("serving", flush=True)
time.sleep(600)
"""


def _serve(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kevlarflow", "serve", tiny_model(),
                             "--port", str(port), *ENGINE_ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_healthy(proc, url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server never became healthy")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _exit_times(pids: list[int], since: float, limit_s: float) -> dict[int, float | None]:
    """Seconds from `since` until each process was gone (None: still there at limit_s)."""
    out = {pid: None for pid in pids}
    while time.monotonic() - since < limit_s and None in out.values():
        for pid in pids:
            if out[pid] is None and _gone(pid):
                out[pid] = time.monotonic() - since
        time.sleep(0.02)
    return out


def test_every_worker_exits_within_2_s_of_its_controller_being_killed():
    port = free_port()
    serve = _serve(port, "--instances", "2", "--pp", "1")
    ctl_port = free_port()
    token = "a-token-for-the-hand-started-workers"
    controller = subprocess.Popen([sys.executable, "-c", CONTROLLER, tiny_model(), str(ctl_port),
                                   token], stdout=subprocess.PIPE, text=True)
    by_hand = [subprocess.Popen([sys.executable, "-m", "kevlarflow", "worker", "--controller",
                                 f"127.0.0.1:{ctl_port}"],
                                env=dict(os.environ, KEVLARFLOW_JOIN_TOKEN=token))
               for _ in range(2)]
    try:
        _wait_healthy(serve, f"http://127.0.0.1:{port}")
        assert controller.stdout.readline().strip() == "serving"
        spawned = [p.pid for p in psutil.Process(serve.pid).children()]
        assert len(spawned) == 2
        workers = spawned + [p.pid for p in by_hand]
        for proc in (serve, controller):
            os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        for proc in (serve, controller):
            proc.wait()
        times = _exit_times(workers, killed, 10.0)
        late = {pid: t for pid, t in times.items() if t is None or t > EXIT_WITHIN_S}
        assert not late, f"workers still running {EXIT_WITHIN_S} s after their controller: {times}"
        assert all(p.wait(timeout=5) == 0 for p in by_hand)
    finally:
        for proc in [serve, controller, *by_hand]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sigterm_in_the_middle_of_a_recovery_stops_cleanly():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = _serve(port, "--instances", "2", "--pp", "2", "--enable-fault-injection",
                   "--shutdown-grace", "1")
    streamed = {}

    def stream():
        # Longer than the grace: it is still open when the grace ends.
        body = {"prompt": [20, 21, 22], "max_tokens": 5000, "stream": True, "ignore_eos": True,
                "temperature": 0}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                streamed["data"] = [line[len("data: "):] for line in r.iter_lines()
                                    if line.startswith("data: ")]
        except httpx.HTTPError as error:
            streamed["error"] = repr(error)

    answered = {}

    def complete():  # the same, not streamed
        body = {"prompt": [23, 24], "max_tokens": 5000, "ignore_eos": True, "temperature": 0}
        try:
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            answered["status"], answered["body"] = r.status_code, r.json()
        except httpx.HTTPError as error:
            answered["error"] = repr(error)

    try:
        _wait_healthy(serve, url)
        client, other = threading.Thread(target=stream), threading.Thread(target=complete)
        client.start()
        other.start()
        time.sleep(0.5)
        assert httpx.post(url + "/v1/fault", json={"instance": 0, "stage": 1,
                                                   "kind": "hang"}).status_code == 200
        time.sleep(1.2)  # detected (1 s), rerouted, replacement starting: recovery under way
        assert httpx.post(url + "/v1/fault", json={"instance": 1, "stage": 0,
                                                   "kind": "kill"}).status_code == 200
        workers = [p.pid for p in psutil.Process(serve.pid).children(recursive=True)]
        start, _ = _sigterm(serve)
        took = time.monotonic() - start
        client.join(timeout=30)
        assert took < 15, f"stopping took {took:.1f} s"
        assert not client.is_alive() and streamed, "the streaming client was left hanging"
        # Its stream ended as a stream does, not cut off: an error, then [DONE].
        assert "data" in streamed, streamed
        assert streamed["data"][-1] == "[DONE]", streamed["data"][-3:]
        error = json.loads(streamed["data"][-2])["error"]
        assert "shutting down" in error["message"] and error["code"] == "engine_dead", error
        other.join(timeout=30)
        assert answered.get("status") == 503, answered
        assert "shutting down" in answered["body"]["error"]["message"], answered
        _all_gone(workers, start)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def _workers_of(serve) -> dict[str, int]:
    """'w<instance>.<stage>' -> pid of each worker process of the server."""
    out = {}
    for p in psutil.Process(serve.pid).children(recursive=True):
        args = p.cmdline()
        if "--instance" in args and "--stage" in args:
            out[f"w{args[args.index('--instance') + 1]}.{args[args.index('--stage') + 1]}"] = p.pid
    return out


def test_sigterm_lets_an_open_request_finish_then_reaps_the_workers():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = _serve(port, "--instances", "2", "--log-level", "info")
    got, first = {}, threading.Event()

    def stream():
        body = {"prompt": [20, 21, 22], "max_tokens": 300, "stream": True, "ignore_eos": True,
                "temperature": 0, "return_token_ids": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            got["status"], got["data"] = r.status_code, []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got["data"].append(line[len("data: "):])
                    first.set()

    try:
        _wait_healthy(serve, url)
        workers = list(_workers_of(serve).values())
        assert len(workers) == 2
        client = threading.Thread(target=stream)
        client.start()
        assert first.wait(60), "no token streamed"
        start, output = _sigterm(serve)
        client.join(timeout=30)
        # It was still open when the signal came, and it got every token.
        assert "Waiting for connections to close" in output, output
        assert got["status"] == 200 and got["data"][-1] == "[DONE]", got
        chunks = [json.loads(d) for d in got["data"][:-1]]
        assert not any("error" in c for c in chunks), chunks[-1]
        assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 300
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        _all_gone(workers, start)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_sigterm_with_a_stopped_worker_still_exits_and_reaps_it():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A long hang timeout: the stopped worker is not declared hung meanwhile.
    serve = _serve(port, "--instances", "2", "--pp", "2", "--hang-timeout", "60")
    workers = {}
    try:
        _wait_healthy(serve, url)
        workers = _workers_of(serve)
        assert sorted(workers) == ["w0.0", "w0.1", "w1.0", "w1.1"]
        os.kill(workers["w0.1"], signal.SIGSTOP)
        start, _ = _sigterm(serve)
        assert time.monotonic() - start < 15, "stopping waited on the stopped worker"
        _all_gone(workers.values(), start)
    finally:
        for pid in _alive(workers.values()):
            os.kill(pid, signal.SIGKILL)
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def _sigterm(serve) -> tuple[float, str]:
    """SIGTERM the server: (when, what it printed) once it stopped cleanly.
    uvicorn raises the signal again once its graceful shutdown is done."""
    start = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    code = serve.wait(timeout=30)
    output = serve.stdout.read()
    assert code in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    return start, output


def _all_gone(pids, since: float) -> None:
    times = _exit_times(list(pids), since, 10.0)
    assert None not in times.values(), f"processes left behind: {times}"


def _alive(pids) -> list[int]:
    return [pid for pid in pids if not _gone(pid)]


@pytest.mark.parametrize("option,message", [
    (["--shutdown-grace", "-1"], "--shutdown-grace must be a number of seconds >= 0, got -1.0"),
    (["--shutdown-grace", "nan"], "--shutdown-grace must be a number of seconds >= 0, got nan"),
    (["--instances", "2", "--outage-timeout", "-1"], "outage_timeout_s must be a finite number")])
def test_serve_refuses_bad_times_with_a_usage_error(option, message):
    proc = subprocess.run([sys.executable, "-m", "kevlarflow", "serve", tiny_model(), *option],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr


@pytest.mark.parametrize("option", [[], ["--instances", "2"]], ids=["in-process", "deployment"])
def test_serve_says_in_one_line_why_it_cannot_start(option, tmp_path):
    """A folder that is not a checkpoint: the reason and status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "kevlarflow", "serve", str(tmp_path), *option],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {tmp_path} is not a model folder: config.json is missing" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
