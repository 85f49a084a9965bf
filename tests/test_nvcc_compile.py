"""Compile every CUDA source under csrc/ with nvcc, for each GPU architecture we ship.

CI has no GPU and builds the extension against a CPU torch, so nothing else ever
compiles the .cu files there; without this test a CUDA syntax or type error would
only surface on a GPU machine. Warnings are errors (front end and host compiler).
The .cu files are torch-free by design, so they compile with nothing but the CUDA
toolkit and csrc/kernels on the include path. Skipped only when nvcc is missing.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted(REPO.glob("csrc/**/*.cu"))
ARCHS = ["sm_80", "sm_90"]


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.exists() else None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "source", CUDA_SOURCES, ids=[str(p.relative_to(REPO)) for p in CUDA_SOURCES]
)
def test_cuda_source_compiles(source: Path, arch: str, tmp_path: Path) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin")
    compute = arch.replace("sm_", "compute_")
    cmd = [
        nvcc,
        "-std=c++17",
        "-O2",
        f"-gencode=arch={compute},code={arch}",
        "-I", str(REPO / "csrc" / "kernels"),
        "-Werror", "all-warnings",
        "-Xcompiler=-Wall,-Wextra",
        "-c", str(source),
        "-o", str(tmp_path / f"{source.stem}.{arch}.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"nvcc failed for {source.relative_to(REPO)} ({arch}):\n"
        f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
    )
