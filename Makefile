# The two commands: `make run` serves a 1 GiB memory disk on port 10809;
# `make check` installs missing test dependencies (as root), builds
# everything and runs the whole test suite.

CARGO ?= cargo
ARGS ?= memory 1G

.PHONY: all build run check lint test bench fuzz

all: build

build:
	$(CARGO) build --release --workspace

run: build
	./target/release/nbdhost -f $(ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test:
	$(CARGO) build --workspace
	$(CARGO) test --workspace

check:
	./scripts/install-deps
	$(MAKE) lint
	$(MAKE) test

bench: build
	./bench/run

# Nightly only: every fuzz target for 10 million runs or 30 minutes
# (FUZZ_RUNS, FUZZ_SECONDS); see RELIABILITY.md.
fuzz:
	./fuzz/run
