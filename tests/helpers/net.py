"""Loopback ports for tests that start servers on fixed ports."""
import socket


def free_port() -> int:
    """A TCP port nothing listens on right now (another process may take it
    before the caller binds it, which the tests accept)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
