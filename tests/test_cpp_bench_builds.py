"""The C++ microbenchmarks (bench/cpp) configure, build and run: a short run of
one pack and one attention benchmark, through the median/min-max report."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
BENCHMARK_HEADER_DIRS = ("/usr/include", "/usr/local/include")


def _have_google_benchmark() -> bool:
    return any(Path(d, "benchmark", "benchmark.h").exists() for d in BENCHMARK_HEADER_DIRS)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.skipif(not _have_google_benchmark(),
                    reason="needs Google Benchmark (apt-get install libbenchmark-dev)")
def test_cpp_bench_builds_and_runs(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DKEVLARFLOW_BUILD_EXTENSION=OFF", "-DKEVLARFLOW_BUILD_CPP_BENCH=ON"],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["cmake", "--build", str(build), "-j", str(min(4, os.cpu_count() or 1))],
                   check=True, capture_output=True, timeout=180)
    # Google Benchmark 1.7 takes min_time as bare seconds (1.8 added "0.01s").
    run = subprocess.run([str(build / "bench" / "cpp" / "kevlarflow_cpp_bench"),
                          "--benchmark_filter=pack_blocks/blocks:16|attention_decode/bf16/ctx:1024",
                          "--benchmark_min_time=0.01", "--benchmark_repetitions=2"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KEVLARFLOW_BENCH_THREADS": "2"})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith(("pack", "attention"))]
    assert [r.split()[0] for r in rows] == ["attention_decode/bf16/ctx:1024",
                                            "pack_blocks/blocks:16"], run.stdout
    assert all("x (" in r for r in rows), run.stdout  # a speed ratio with its spread
