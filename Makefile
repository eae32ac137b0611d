# The two commands: `make demo` and `make test`. Everything else is a convenience.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo demo-delegation test lint bench fuzz ci build clean tools

## Start a server and a node agent in a temp dir, register the current user, fetch and
## print an SVID, show a rotation, stop cleanly.
demo: build
	./scripts/demo.sh

## The delegation flow: alice -> orchestrator -> scheduler, and a tool server that allows
## calendar:read and refuses crm:read and payments:execute (examples/delegation/).
demo-delegation: build
	$(CARGO) build -q -p agentd-examples --bins
	./examples/delegation/run.sh

## Every test: unit tests beside the code, end-to-end tests with real processes.
test: tools build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## Formatting and clippy, warnings as errors (settings in [workspace.lints]).
lint: tools
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Benchmarks (release build); figures are recorded in docs/PERFORMANCE.md.
bench: tools
	$(CARGO) bench -p agentd --bench agentd_bench

## Coverage-guided fuzzing of the parsers (nightly + cargo-fuzz), FUZZ_SECONDS each (default
## 600). `make test` runs the same targets briefly on stable (tests/tests/fuzz_smoke.rs).
fuzz:
	./fuzz/run.sh

ci: lint test

build:
	$(CARGO) build -p agentd --bin agentd --bin agentd-node

## What the tests need besides Rust: openssl (for `openssl verify`), rustfmt and clippy.
tools:
	@./scripts/install-tools.sh

clean:
	$(CARGO) clean
