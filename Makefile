# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash

.PHONY: run test lint services bench fmt fuzz
.PHONY: run test lint services bench fmt cluster-test bench-cluster

run: ## Start services, migrate, run one ingress and one worker
	@bash deploy/local/run.sh

services: ## Make sure PostgreSQL and RabbitMQ answer (starting or installing them)
	@bash deploy/local/ensure-services.sh
	@bash deploy/local/test-prereqs.sh

lint:
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

test: lint ## fmt check, clippy, and the whole test suite against real services
	@bash deploy/local/ensure-services.sh  # PostgreSQL and RabbitMQ, found, started or installed as for make run; left running
	@bash deploy/local/test-prereqs.sh  # Chromium, promtool, python3-venv, the fuzz test's `st`: installed as root on Debian, else named
	@if cargo nextest --version >/dev/null 2>&1; then \
	  CI=true cargo nextest run --workspace --no-fail-fast; \
	else \
	  CI=true cargo test --workspace --no-fail-fast; \
	fi

fmt:
	cargo fmt --all

bench: ## Conveyor vs Dramatiq vs the bare broker, written to benches/RESULTS.md (< 15 min)
	@bash benches/run.sh
fuzz: ## make test's schemathesis pass alone, deeper: FUZZ_EXAMPLES=100 per operation (no 5xx allowed)
	@bash deploy/local/fuzz.sh
bench-cluster: ## Throughput with 1, 2 and 4 workers on one RabbitMQ node vs a private 3-node cluster, into benches/RESULTS.md (root, ~8 min)
	@bash benches/cluster.sh
cluster-test: ## The failover proof: a private 3-node RabbitMQ cluster and PostgreSQL, node and database restarts mid-load, broker stop_app and memory alarm (root, ~6 min with an incremental build)
	@bash deploy/cluster/run-proof.sh
