# One entry point for humans and CI. `make test` builds .venv from nothing and runs everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv tools test lint typecheck unit run bench bench-calls bench-ledger chaos soak chart clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff format --check sidecar tests examples bench
	$(BIN)/ruff check sidecar tests examples bench

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q

# What the suite drives for real beside Python, installed when missing (README, "Requirements"): Debian's nginx
# and Chromium (apt: needs root), playwright-core and Helm (npm: needs node). The image check
# (tests/test_image.py) installs buildah, podman and debootstrap itself.
tools:
	bash scripts/ensure-nginx.sh
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-playwright.sh
	bash scripts/ensure-helm.sh >/dev/null

test: tools lint typecheck unit

# Starts the fake provider and the sidecar on examples/config.yaml (no provider account needed).
run: venv
	$(BIN)/python -m sidecar.testing.devstack

# The relay under load against the floor and LiteLLM's own relay, then the sidecar on /v1/realtime, GPT-Live and
# translation interleaved at 1,000 sessions (about 17 minutes; see docs/performance.md).
bench: venv
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# WebRTC calls beside /v1/realtime at 500 and 1,000 (issue 17): opening CPU, CPU per event and KB per session, 3
# interleaved rounds (about 12 minutes; docs/performance.md "WebRTC calls beside /v1/realtime").
bench-calls: venv
	$(BIN)/python -m bench.run --calls-only $(BENCH_ARGS)

# The LiteLLM sink: events/s applied into LiteLLM's real schema (1 and 2 connections), and the lag from a session's
# final event to its SpendLogs row under `sidecar consume --sink litellm` (about 2 minutes; docs/performance.md).
bench-ledger: venv
	$(BIN)/python -m bench.ledger $(BENCH_ARGS)

# The fault matrix against real processes (redis-server, sidecar serve, sidecar consume, PostgreSQL, the fake
# provider, openai SDK clients), billing checked per session (about 5 minutes; docs/reliability.md). Not in `make test`.
chaos: venv
	$(BIN)/python -m bench.chaos.run $(CHAOS_ARGS)

# Churning sessions through a real sidecar for SOAK_S seconds: RSS, fds and asyncio tasks flat, billing exact
# (docs/reliability.md). Not in `make test`.
SOAK_S ?= 600
soak: venv
	$(BIN)/python -m bench.chaos.soak --duration-s $(SOAK_S) $(SOAK_ARGS)

# Builds the Dockerfile for real (debootstrap base, buildah, podman; no Docker engine) and passes one session
# through the image (docs/deploy.md, "Building the image"). Needs root; tests/test_image.py runs it too.
.PHONY: image
image: venv
	scripts/image-check.sh

chart: venv
	bash scripts/ensure-helm.sh >/dev/null && $(BIN)/pytest -q tests/test_chart.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
