"""Who may join a deployment's control plane.

Every control connection uses libzmq's CURVE mechanism: it is encrypted, and
the controller's ZAP handler (JoinGate) lets a peer in only if it holds the
worker key pair derived from the deployment's join token. A worker so proves
it knows the token without the token crossing the wire, and a peer that does
not is refused in the handshake, before any byte of it reaches the control
protocol; the refusal is logged with its address, and the worker is told.

The controller's key pair comes from a fixed, public seed: a worker does not
check who its controller is (whoever starts it points it there), but each
connection is encrypted with short-term keys of its own."""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass, field

import zmq
from zmq.utils import z85

log = logging.getLogger("kevlarflow.controller")

TOKEN_ENV = "KEVLARFLOW_JOIN_TOKEN"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks a context's ZAP handler
REFUSED = b"the join token is missing or wrong"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _key_pair(seed: bytes) -> tuple[bytes, bytes]:
    """(public, secret) CURVE keys, Z85-encoded, from 32 bytes of seed."""
    secret = z85.encode(seed)
    return zmq.curve_public(secret), secret


_CONTROLLER_PUBLIC, _CONTROLLER_SECRET = _key_pair(
    hashlib.sha256(b"kevlarflow control plane: controller key").digest())


@dataclass(frozen=True)
class JoinKeys:
    """The keys a join token gives. The token itself is never sent."""
    token: str = field(repr=False)

    def __post_init__(self):
        if not isinstance(self.token, str):
            raise TypeError(f"a join token is a str, got {type(self.token).__name__}")
        public, secret = _key_pair(hmac.digest(self.token.encode(), b"kevlarflow worker key",
                                               "sha256"))
        object.__setattr__(self, "worker_public", public)
        object.__setattr__(self, "_worker_secret", secret)

    def connect_as_worker(self, sock: zmq.Socket) -> None:
        """Before connect(): this socket proves the token to the controller."""
        sock.curve_serverkey = _CONTROLLER_PUBLIC
        sock.curve_publickey = self.worker_public
        sock.curve_secretkey = self._worker_secret

    @staticmethod
    def serve_as_controller(sock: zmq.Socket) -> None:
        """Before bind(): this socket takes CURVE peers only (JoinGate decides which)."""
        sock.curve_server = True
        sock.curve_secretkey = _CONTROLLER_SECRET


class JoinGate(threading.Thread):
    """The ZAP handler of one zmq context: lets in the peers whose public
    key is the token's worker key; logs each refused address once."""

    def __init__(self, ctx: zmq.Context, keys: JoinKeys):
        super().__init__(name="kevlarflow-join-gate", daemon=True)
        self._keys = keys
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)  # before any CURVE socket of ctx takes a peer
        self._stopping = threading.Event()
        self.refused: dict[str, int] = {}  # address -> handshakes refused
        self.start()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._sock.poll(100):
                    self._answer(self._sock.recv_multipart())
        finally:
            self._sock.close()

    def _answer(self, request: list[bytes]) -> None:
        if len(request) < 6:  # not libzmq's: cannot happen, answer anyway
            self._sock.send_multipart([b"1.0", request[1] if len(request) > 1 else b"",
                                       b"400", b"bad ZAP request", b"", b""])
            return
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        ok = mechanism == b"CURVE" and len(credentials) == 1 and hmac.compare_digest(
            z85.encode(credentials[0]), self._keys.worker_public)
        if ok:
            self._sock.send_multipart([version, request_id, b"200", b"OK", b"worker", b""])
            return
        peer = address.decode(errors="replace")
        self.refused[peer] = self.refused.get(peer, 0) + 1
        if self.refused[peer] == 1:
            log.warning("refused a worker at %s: %s", peer, REFUSED.decode())
        self._sock.send_multipart([version, request_id, b"400", REFUSED, b"", b""])

    def stop(self) -> None:
        self._stopping.set()
        self.join(1.0)
