"""Background KV-cache replication: the controller's backup ring, links and
watermarks (controller.py, links.py), and a worker's sender and receivers
(worker.py) around the native replicator (csrc/replication/).

A link is a two-member communicator group named after its source worker."""

LINK_PREFIX = "repl."


def link_group(source: str) -> str:
    """The group of the link a worker sends its replicas on."""
    return LINK_PREFIX + source


def is_link(group: str) -> bool:
    return group.startswith(LINK_PREFIX)
