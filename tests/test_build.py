"""The package builds as a wheel against the installed torch (no isolated
build env: that would download a CUDA torch), and the CUDA decision follows
torch, not the presence of nvcc."""
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

import kevlarflow
from kevlarflow import _C

REPO = Path(__file__).resolve().parent.parent


def test_wheel_builds(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", "-w", str(tmp_path), str(REPO)], check=True, timeout=900)
    (wheel,) = tmp_path.glob("kevlarflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("kevlarflow/_C") and n.endswith(".so") for n in names), names
    assert "kevlarflow/ops.py" in names
    # The communicator manager: its own native module, and every package.
    assert any(n.startswith("kevlarflow/_comm") and n.endswith(".so") for n in names), names
    for package in ("comm", "deploy", "ft", "replication", "engine", "model", "server", "bench"):
        assert f"kevlarflow/{package}/__init__.py" in names, package
    assert "kevlarflow/comm/manager.py" in names and "kevlarflow/comm/nccl.py" in names


def test_cuda_kernels_built_only_with_a_cuda_torch():
    assert _C.built_with_cuda == bool(torch.version.cuda)
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "kevlarflow::paged_attention", "CUDA")
    assert has_cuda_kernel == bool(torch.version.cuda)


def test_installed_package_is_tested():
    # The tests must exercise the built extension, not a source tree without one.
    assert Path(_C.__file__).exists() and kevlarflow.__version__
