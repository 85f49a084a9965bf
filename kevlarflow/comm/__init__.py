"""Communicators that are built, aborted, shrunk and rebuilt apart from any
weights: the Python side of the native communicator manager (manager.py),
builds that anyone can call off (rendezvous.py), the NCCL backend's
connection (nccl.py), and a worker's groups (groups.py)."""
