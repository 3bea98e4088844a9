# `make test` works on a machine with only Python: it builds .venv from scratch (torch first, the
# CPU build, then everything else pinned to it), installs OpenMPI when mpirun is missing and we
# are root, then runs ruff, mypy and pytest. A second run reuses the venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
EXTRAS := dev,triton,deepspeed,demo
MPI_ENV := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test lint typecheck pytest demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@if ! command -v mpirun >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing OpenMPI from Debian"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null; \
	  else echo "mpirun missing and not root: mpirun tests will be skipped"; fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@if command -v mpicc >/dev/null 2>&1; then $(PY) -m pip install -q -c constraints.txt -e ".[mpi]"; fi
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check $(wildcard distnorm tests benchmarks launch)

typecheck: $(STAMP)
	$(PY) -m mypy

# Two pytest workers (pytest-xdist): most tests are single-threaded Python (tracing, compiling,
# process start-up), so two workers use both cores; 717 s -> 487 s of pytest on a 2-core machine.
# loadfile: a file's tests share one worker, so a file's cached multi-process run is spawned once.
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	$(MPI_ENV) TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test: lint typecheck pytest

# The tiny GPT, TP=2 x DP=2 under torchrun on the CPU (about a minute on 2 cores); its first and
# last lines name its run directory (runs/tiny_gpt/<run id>/: metrics.json, loss.png).
demo: $(STAMP)
	$(PY) -m torch.distributed.run --nproc-per-node 4 --master-port $$($(PY) -c "from distnorm.testing import free_port; print(free_port())") launch/train.py --config configs/tiny_gpt.toml --tp 2

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
