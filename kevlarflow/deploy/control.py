"""The control plane's two ends over pyzmq: the controller binds a ROUTER
socket, each worker connects a DEALER. Every connection is a CURVE one that
only holders of the deployment's join token complete (join.py). Both ends
decode every message against the schema of their direction; bad bytes are
logged and dropped, and the process carries on; a frame over
MAX_MESSAGE_BYTES ends its connection before it is read. No call blocks
without a timeout, and sending never blocks on a peer (a dead peer's
messages are dropped, not queued forever)."""
from __future__ import annotations

import logging
import os

import zmq

from kevlarflow.deploy import protocol
from kevlarflow.deploy.join import JoinGate, JoinKeys

log = logging.getLogger(__name__)


def _configure(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)                     # closing never waits on a dead peer
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.SNDTIMEO, 1000)                # a full queue to a hung peer: give up


def _frames(sock: zmq.Socket, expected: int) -> list[bytes] | None:
    """The next message's frames; None (logged) if it has not `expected`."""
    frames = sock.recv_multipart()
    if len(frames) != expected:
        log.warning("dropped a message of %d frames (expected %d)", len(frames), expected)
        return None
    return frames


def _decode(schema: dict, data: bytes, sender: str) -> dict | None:
    """The message, or None (logged) if it is not a valid one."""
    try:
        return protocol.decode(schema, data)
    except protocol.ProtocolError as error:
        log.warning("dropped a malformed message from %s: %s", sender, error)
        return None


class ControllerEndpoint:
    def __init__(self, keys: JoinKeys, host: str = "127.0.0.1", port: int = 0):
        self._ctx = zmq.Context()
        self.gate = JoinGate(self._ctx, keys)
        self.sock = self._ctx.socket(zmq.ROUTER)
        _configure(self.sock)
        keys.serve_as_controller(self.sock)
        try:
            if port:
                self.sock.bind(f"tcp://{host}:{port}")
                self.port = port
            else:
                self.port = self.sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as error:
            self.close()
            raise OSError(f"the control socket cannot listen on {host}:{port}: {error}") from error
        self.host = host

    def send(self, peer: bytes, type_: str, **fields) -> bool:
        """False if the message could not be queued (the peer is gone or stuck)."""
        data = protocol.encode(protocol.TO_WORKER, type_, **fields)
        try:
            self.sock.send_multipart([peer, data])
            return True
        except zmq.Again:
            log.warning("dropped %s for worker %r: its queue is full", type_, peer)
            return False

    def recv(self, timeout_ms: int, wake_fds=()) -> tuple[bytes, dict] | None:
        """The next valid message and its sender, or None after timeout_ms,
        or as soon as one of wake_fds is readable (a worker process exited)."""
        poller = None
        if wake_fds and timeout_ms:  # a wait that an exit must cut short
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            for fd in wake_fds:
                poller.register(fd, zmq.POLLIN)
        while True:
            ready = self.sock in dict(poller.poll(timeout_ms)) if poller \
                else self.sock.poll(timeout_ms)
            if not ready:
                return None
            timeout_ms, poller = 0, None  # only what is already there from now on
            frames = _frames(self.sock, 2)
            message = frames and _decode(protocol.TO_CONTROLLER, frames[1], repr(frames[0]))
            if message:
                return frames[0], message

    def close(self) -> None:
        self.sock.close()
        self.gate.stop()
        self._ctx.term()


class Waker:
    """Ends a WorkerEndpoint.recv early, from any thread (a pipe, which,
    unlike a zmq socket, may be written from several threads)."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        try:
            os.write(self._write, b"\0")
        except (BlockingIOError, OSError):  # full (a wake is pending anyway) or closed
            pass

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class WorkerEndpoint:
    def __init__(self, controller: str, keys: JoinKeys, waker: Waker | None = None,
                 monitor_events: int = 0, zmq_heartbeat: tuple[int, int] | None = None):
        """controller: HOST:PORT of the controller's control socket; keys:
        those of the join token this worker was given. A waker
        makes recv() return None as soon as it is woken. monitor_events: the
        connection events (zmq.EVENT_*) to report on self.monitor, watched
        from before the connection is made. zmq_heartbeat: (interval, timeout)
        in ms of transport pings; a peer that does not answer is disconnected."""
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        _configure(self.sock)
        keys.connect_as_worker(self.sock)
        if zmq_heartbeat is not None:
            self.sock.setsockopt(zmq.HEARTBEAT_IVL, zmq_heartbeat[0])
            self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, zmq_heartbeat[1])
        self.monitor = self.sock.get_monitor_socket(monitor_events) if monitor_events else None
        self.sock.connect(f"tcp://{controller}")
        self.waker = waker
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        if waker is not None:
            self._poller.register(waker.fileno(), zmq.POLLIN)

    def send(self, type_: str, **fields) -> None:
        data = protocol.encode(protocol.TO_CONTROLLER, type_, **fields)
        try:
            self.sock.send(data)
        except zmq.Again:
            log.warning("dropped %s: the controller is not taking messages", type_)

    def recv(self, timeout_ms: int) -> dict | None:
        while True:
            ready = dict(self._poller.poll(timeout_ms))
            if self.waker is not None and self.waker.fileno() in ready:
                self.waker.clear()
            if self.sock not in ready:
                return None
            timeout_ms = 0
            frames = _frames(self.sock, 1)
            message = frames and _decode(protocol.TO_WORKER, frames[0], "the controller")
            if message:
                return message

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close()
        self.sock.close()
        self._ctx.term()
