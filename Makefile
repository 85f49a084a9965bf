# Two commands set everything up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.kevlarflow-installed
SOURCES := $(shell find csrc kevlarflow cmake -type f -not -name '*.pyc') CMakeLists.txt pyproject.toml

.PHONY: demo test install bench bench-cpp wheel clean

$(VENV)/.deps: constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch, pinned: an unpinned torch would pull a CUDA build.
	$(PIP) install -q -c constraints.txt torch==$(TORCH_VERSION)
	# Everything else at the versions of constraints.txt.
	$(PIP) install -q -c constraints.txt "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake \
		numpy "pytest>=8" "hypothesis>=6" psutil "triton>=3.0" "openai>=1.0" "httpx>=0.27"
	touch $@

# Built against the torch above, hence --no-build-isolation.
$(STAMP): $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation -c constraints.txt .
	touch $@

install: $(STAMP)

# The failover benchmark's preset: 2 instances x 2 stages of the small model
# (its checkpoint is written once, then cached), each instance on cores of its
# own, KevlarFlow against a restart, one worker killed mid-trace with a
# same-machine and a new-node (30 s) replacement, and fault-free rounds; the
# table on stdout, JSON and plots in demo-results/.
demo: $(STAMP)
	cd /tmp && $(abspath $(PY)) -m kevlarflow demo --out $(CURDIR)/demo-results

test: $(STAMP)
	# Run from outside the source tree so tests import the installed package.
	cd tests && $(abspath $(PY)) -m pytest -q -p no:cacheprovider .

bench: demo

# C++ microbenchmarks (Google Benchmark from Debian's libbenchmark-dev).
bench-cpp:
	@test -f /usr/include/benchmark/benchmark.h || \
		(apt-get update -qq && apt-get install -y -qq libbenchmark-dev)
	cmake -S . -B build/bench-cpp -DKEVLARFLOW_BUILD_EXTENSION=OFF \
		-DKEVLARFLOW_BUILD_CPP_BENCH=ON -DCMAKE_BUILD_TYPE=Release
	cmake --build build/bench-cpp -j2
	./build/bench-cpp/bench/cpp/kevlarflow_cpp_bench

wheel: $(VENV)/.deps
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist $(STAMP)
