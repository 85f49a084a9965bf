"""What the tests share: checkpoints (models), workloads and stepping loops
of deployments (failover), batches of KV (kv_batches), and the worker
processes and scenarios of the communicator and replicator tests."""
