"""Fault tolerance: who failed (health.py), what every instance does about it
(recovery.py, a state machine per instance whose phases are in phases.py),
where it runs meanwhile and what its KV keeps (reroute.py), new processes
for failed slots (replacements.py), and the record of it all (events.py)."""
