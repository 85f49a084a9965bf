"""A deployment across processes: workers that each own one pipeline stage
(worker.py), a controller that schedules, routes and keeps one record per
worker (controller.py, membership.py, workers.py, instance.py, router.py),
and the control plane between them (protocol.py, control.py, heartbeat.py).
What happens when workers fail is in kevlarflow.ft; the communicators are
in kevlarflow.comm, replication in kevlarflow.replication."""