"""Fault tolerance: routing, health, recovery."""
