"""Where a deployment's workers run and how their groups connect: each slot's
device, the backend chosen for each group from its members' placement, a
communicator manager whose groups use different backends, and the clear
errors of asking for GPUs where there are none."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from kevlarflow.comm.backend_choice import Placement, choose_backend
from kevlarflow.comm.manager import CommManager
from kevlarflow.deploy.config import DeploymentConfig
from kevlarflow.deploy.devices import sharing_note, slot_devices

no_cuda = pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")


def test_cuda_slots_go_round_robin_over_the_visible_gpus():
    assert slot_devices("cuda", 4, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert slot_devices("cuda", 8, 1) == ["cuda:0"] * 8
    assert slot_devices("cuda", 2, 4) == ["cuda:0", "cuda:1"]
    assert slot_devices("cpu", 3, 0) == ["cpu"] * 3


def test_a_device_per_slot_is_taken_as_given_and_checked():
    assert slot_devices("cuda", 2, 2, ("cuda:1", "cuda:0")) == ["cuda:1", "cuda:0"]
    with pytest.raises(ValueError, match="names 1 device.* for 2 workers"):
        slot_devices("cuda", 2, 2, ("cuda:0",))
    with pytest.raises(ValueError, match="'cpu' or 'cuda:K', got 'cuda'"):
        slot_devices("cuda", 1, 2, ("cuda",))
    with pytest.raises(ValueError, match="'cpu' or 'cuda:K', got 'gpu0'"):
        slot_devices("cuda", 1, 2, ("gpu0",))
    with pytest.raises(ValueError, match="names cuda:2, but 2 GPU"):
        slot_devices("cuda", 2, 2, ("cuda:0", "cuda:2"))
    with pytest.raises(ValueError, match="no GPU is visible"):
        slot_devices("cuda", 2, 0)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        slot_devices("cuda:0", 2, 1)


def test_workers_sharing_a_gpu_are_said_in_the_log():
    assert sharing_note(["cuda:0", "cuda:1"]) is None
    assert sharing_note(["cpu", "cpu"]) is None
    note = sharing_note(["cuda:0"] * 4)
    assert "4 workers share 1 GPU" in note and "host memory" in note


def _at(device, host="h0", nccl=True):
    return Placement(host, device, nccl)


def test_nccl_only_between_members_with_gpus_of_their_own():
    own = [_at("cuda:0"), _at("cuda:1")]
    assert choose_backend(own)[0] == "nccl"
    # The same index on two hosts is two GPUs.
    assert choose_backend([_at("cuda:0", "h0"), _at("cuda:0", "h1")])[0] == "nccl"
    for members, why in (([_at("cuda:0"), _at("cuda:0")], "share a GPU"),
                         ([_at("cuda:0"), _at("cpu")], "CPU"),
                         ([_at("cuda:0"), _at("cuda:1", nccl=False)], "NCCL is unavailable")):
        backend, reason = choose_backend(members)
        assert backend == "gloo" and why in reason
    assert choose_backend(own, "gloo") == ("gloo", "the deployment asks for gloo")
    with pytest.raises(ValueError, match="transport must be one of"):
        choose_backend(own, "nccl")


def test_a_group_uses_the_backend_it_was_built_with():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    manager = CommManager(store, "a", deadline_s=10.0)
    try:
        manager.build("pipe", ["a"], backend="gloo")
        assert manager.backend_of("pipe") == "gloo" and manager.backend == "gloo"
        x = torch.ones(4)
        manager.allreduce("pipe", x)
        assert x.tolist() == [1.0] * 4
        with pytest.raises(ValueError, match="unknown communicator backend 'mpi'"):
            manager.start_build("other", ["a"], 0, backend="mpi")
        if torch.version.cuda is None:
            with pytest.raises(RuntimeError, match=r"backend='nccl'\): .*(NCCL|CUDA)"):
                manager.start_build("other", ["a"], 0, backend="nccl")
        assert manager.backend_of("other") == "gloo"  # nothing was begun
    finally:
        manager.close()


@no_cuda
def test_a_deployment_on_cuda_without_a_cuda_torch_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA build of torch"):
        DeploymentConfig(num_instances=2, device="cuda").validate()
    # Its workers' machines have the GPUs: the controller does not check here.
    remote = DeploymentConfig(num_instances=2, pp_size=2, device="cuda", spawn_workers=False)
    remote.validate()
    assert remote.slot_devices() == ["cuda"] * 4


def test_deployment_device_options_are_checked():
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        DeploymentConfig(device="cuda:0").validate()
    with pytest.raises(ValueError, match="devices names GPUs: set device='cuda'"):
        DeploymentConfig(devices=("cuda:0",)).validate()
    with pytest.raises(ValueError, match="transport must be one of"):
        DeploymentConfig(transport="nccl").validate()
    config = DeploymentConfig(num_instances=2, pp_size=2)
    config.validate()
    assert config.slot_devices() == ["cpu"] * 4


@no_cuda
def test_a_worker_asked_for_a_gpu_without_one_says_why():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "kevlarflow", "worker", "--controller",
                           "127.0.0.1:9", "--device", "cuda:0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--device: device='cuda:0' needs a CUDA build of torch" in proc.stderr
