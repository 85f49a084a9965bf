"""Distributed pieces of KevlarFlow: the communicator manager (comm)."""
