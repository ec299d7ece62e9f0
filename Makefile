# The two commands: `make run` serves a 1 GiB memory disk on port 10809;
# `make check` installs missing test dependencies (as root), builds
# everything and runs the whole test suite.

CARGO ?= cargo
ARGS ?= memory 1G

.PHONY: all build run check lint test bench fuzz asan

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

# Nightly only: the end-to-end suite against the server, plugins and
# filters built with AddressSanitizer, and C test plugins compiled with it.
# Every report lands in $(ASAN_REPORTS); any report fails the run.
ASAN_TARGET := $(shell rustc -vV | sed -n 's/^host: //p')
ASAN_DIR := $(CURDIR)/target/asan
ASAN_REPORTS := $(ASAN_DIR)/reports
asan:
	RUSTFLAGS="-Zsanitizer=address -Clink-arg=-Wl,--export-dynamic" \
		$(CARGO) +nightly build --workspace --target $(ASAN_TARGET) --target-dir $(ASAN_DIR)
	rm -rf $(ASAN_REPORTS) && mkdir -p $(ASAN_REPORTS)
	NBDHOST_TEST_BINDIR=$(ASAN_DIR)/$(ASAN_TARGET)/debug \
	NBDHOST_TEST_CFLAGS=-fsanitize=address \
	ASAN_OPTIONS=log_path=$(ASAN_REPORTS)/report:quarantine_size_mb=32 \
		$(CARGO) test -p nbdhost-tests
	@if [ -n "$$(ls $(ASAN_REPORTS))" ]; then cat $(ASAN_REPORTS)/*; exit 1; fi
	@echo "asan: the end-to-end suite ran clean"
