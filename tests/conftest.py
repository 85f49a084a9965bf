import os

import pytest
import torch

# The Triton interpreter runs Triton kernels on the CPU; it must be chosen
# before triton is first imported, so it is decided here, at collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep test processes polite on small machines; kernels still run in parallel.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def solo():
    """A communicator manager "a" with a one-member group "g" over Gloo."""
    import datetime

    import torch.distributed as dist

    from kevlarflow.comm.manager import CommManager

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    mgr = CommManager(store, "a", deadline_s=1.0)
    mgr.build("g", ["a"])
    yield mgr
    mgr.close()
