"""The rendezvous store a controller hosts (torch.distributed's TCPStore).

Its listening socket is bound here, to the configured host only (TCPStore on
its own listens on every interface), and every key lives under a prefix of
this deployment's own: random, and told to workers only over the
authenticated control plane, so that a process that reaches the port cannot
guess a key of the deployment's communicators."""
from __future__ import annotations

import secrets
import socket
from datetime import timedelta

import torch.distributed as dist


class HostedStore:
    def __init__(self, host: str, port: int, timeout_s: float):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host or "0.0.0.0", port))
        except OSError as error:
            self._listener.close()
            raise OSError(f"the rendezvous store cannot listen on {host}:{port}: "
                          f"{error.strerror or error}") from error
        self._listener.listen(512)
        self.port = self._listener.getsockname()[1]
        self._server = dist.TCPStore(host, self.port, is_master=True, wait_for_workers=False,
                                     timeout=timedelta(seconds=timeout_s),
                                     master_listen_fd=self._listener.fileno())
        self._listener.detach()  # the store owns (and closes) the socket now
        self.prefix = f"kevlarflow/{secrets.token_hex(16)}"
        self.store = dist.PrefixStore(self.prefix, self._server)

    def close(self) -> None:
        self.store = self._server = None  # the last reference: the store stops


def client(host: str, port: int, prefix: str, timeout_s: float) -> dist.Store:
    """A worker's view of the deployment's store: its keys only."""
    return dist.PrefixStore(prefix, dist.TCPStore(host, port, is_master=False,
                                                  timeout=timedelta(seconds=timeout_s)))
