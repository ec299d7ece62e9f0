# The two commands: `make run` serves a 1 GiB memory disk on port 10809;
# `make check` installs missing test dependencies (as root), builds
# everything and runs the whole test suite.

CARGO ?= cargo
ARGS ?= memory 1G

# Where `make install` puts things (the GNU variables; DESTDIR for staged
# installs). The server is compiled with these paths, so the installed
# binary finds its plugins and filters by short name and --dump-config
# reports them; NBDHOST_PLUGINDIR and NBDHOST_FILTERDIR override them at
# run time.
PREFIX ?= /usr/local
EXEC_PREFIX ?= $(PREFIX)
BINDIR ?= $(EXEC_PREFIX)/bin
SBINDIR ?= $(EXEC_PREFIX)/sbin
LIBDIR ?= $(EXEC_PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
DATAROOTDIR ?= $(PREFIX)/share
MANDIR ?= $(DATAROOTDIR)/man
SYSCONFDIR ?= $(PREFIX)/etc
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
PLUGINDIR = $(LIBDIR)/nbdhost/plugins
FILTERDIR = $(LIBDIR)/nbdhost/filters
# nbdhost.service's arguments (NBDHOST_ARGS), where Debian keeps a
# service's defaults.
DEFAULTS = $(DESTDIR)$(SYSCONFDIR)/default/nbdhost
export NBDHOST_PREFIX = $(PREFIX)
export NBDHOST_BINDIR = $(BINDIR)
export NBDHOST_SBINDIR = $(SBINDIR)
export NBDHOST_LIBDIR = $(LIBDIR)
export NBDHOST_MANDIR = $(MANDIR)
export NBDHOST_SYSCONFDIR = $(SYSCONFDIR)

# `make install PROFILE=debug` installs the debug build (the tests do).
PROFILE ?= release
OUT = target/$(PROFILE)
CARGO_PROFILE = $(if $(filter release,$(PROFILE)),--release,)
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
PLUGINS = $(notdir $(wildcard plugins/*))
# Only the crates that build a shared object: filters/ also holds library
# crates that filters share (luks-crypto). Named as Cargo names their
# libraries, without hyphens (blocksize-policy: libblocksizepolicyfilter.so).
FILTERS = $(subst -,,$(patsubst filters/%/Cargo.toml,%,$(shell grep -l '"cdylib"' filters/*/Cargo.toml)))
SUBST = sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@BINDIR@|$(BINDIR)|g' \
	-e 's|@LIBDIR@|$(LIBDIR)|g' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' \
	-e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' -e 's|@PLUGINDIR@|$(PLUGINDIR)|g' \
	-e 's|@FILTERDIR@|$(FILTERDIR)|g' -e 's|@VERSION@|$(VERSION)|g'

.PHONY: all build run check lint test bench fuzz asan install uninstall dist deb

all: build

build:
	$(CARGO) build $(CARGO_PROFILE) --workspace

run: build
	./$(OUT)/nbdhost -f $(ARGS)

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
	# PREBUILT: the tests take the instrumented build above as it is and
	# run no `cargo build` of their own (which would use plain flags).
	# libstdc++ preloaded: librbd's C++ exceptions reach ASan's __cxa_throw
	# interceptor, which finds no real one when libstdc++ only arrives
	# later by dlopen. NBDHOST_TEST_ASAN tells tests what cannot be judged
	# under the sanitizer (tests/rbd.rs says which, and why).
	LD_PRELOAD=$(shell $(CC) -print-file-name=libstdc++.so.6) \
	NBDHOST_TEST_ASAN=1 \
	NBDHOST_TEST_PREBUILT=1 \
	NBDHOST_TEST_BINDIR=$(ASAN_DIR)/$(ASAN_TARGET)/debug \
	NBDHOST_TEST_CFLAGS=-fsanitize=address \
	ASAN_OPTIONS=log_path=$(ASAN_REPORTS)/report:quarantine_size_mb=32 \
	LSAN_OPTIONS=suppressions=$(CURDIR)/tests/asan.supp:print_suppressions=0 \
		$(CARGO) test -p nbdhost-tests
	# The server's own unit tests too: the thread context's guard is
	# proven there (a panic below a filter's open).
	RUSTFLAGS="-Zsanitizer=address -Clink-arg=-Wl,--export-dynamic" \
	ASAN_OPTIONS=log_path=$(ASAN_REPORTS)/unit \
		$(CARGO) +nightly test -p nbdhost --lib --target $(ASAN_TARGET) --target-dir $(ASAN_DIR)
	@if [ -n "$$(ls $(ASAN_REPORTS))" ]; then cat $(ASAN_REPORTS)/*; exit 1; fi
	@echo "asan: the end-to-end suite and the server's unit tests ran clean"

install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(PLUGINDIR) $(DESTDIR)$(FILTERDIR) \
		$(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR) \
		$(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man3 $(DESTDIR)$(MANDIR)/man5 \
		$(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSCONFDIR)/default
	install -m 0755 $(OUT)/nbdhost $(DESTDIR)$(BINDIR)/nbdhost
	install -m 0755 $(OUT)/nbdhost-keys $(DESTDIR)$(BINDIR)/nbdhost-keys
	for p in $(PLUGINS); do \
		install -m 0644 $(OUT)/lib$${p}plugin.so $(DESTDIR)$(PLUGINDIR)/ || exit 1; done
	for f in $(FILTERS); do \
		install -m 0644 $(OUT)/lib$${f}filter.so $(DESTDIR)$(FILTERDIR)/ || exit 1; done
	install -m 0644 plugin-api/include/nbdhost-plugin.h plugin-api/include/nbdhost-filter.h \
		$(DESTDIR)$(INCLUDEDIR)/
	$(SUBST) nbdhost.pc.in >$(DESTDIR)$(PKGCONFIGDIR)/nbdhost.pc
	install -m 0644 man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 man/*.3 $(DESTDIR)$(MANDIR)/man3/
	install -m 0644 man/*.5 $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 systemd/nbdhost.socket $(DESTDIR)$(SYSTEMDUNITDIR)/
	$(SUBST) systemd/nbdhost.service.in >$(DESTDIR)$(SYSTEMDUNITDIR)/nbdhost.service
	# The service's arguments: a configuration file, so one already there
	# (the administrator's) is kept.
	@if [ -e $(DEFAULTS) ]; then echo "install: $(DEFAULTS) is there already: kept"; \
	else $(SUBST) systemd/nbdhost.default.in >$(DEFAULTS) && chmod 0644 $(DEFAULTS); fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/nbdhost $(DESTDIR)$(BINDIR)/nbdhost-keys
	rm -rf $(DESTDIR)$(LIBDIR)/nbdhost
	rm -f $(DESTDIR)$(INCLUDEDIR)/nbdhost-plugin.h $(DESTDIR)$(INCLUDEDIR)/nbdhost-filter.h
	rm -f $(DESTDIR)$(PKGCONFIGDIR)/nbdhost.pc
	for m in man/*.1; do rm -f $(DESTDIR)$(MANDIR)/man1/$$(basename $$m); done
	for m in man/*.3; do rm -f $(DESTDIR)$(MANDIR)/man3/$$(basename $$m); done
	for m in man/*.5; do rm -f $(DESTDIR)$(MANDIR)/man5/$$(basename $$m); done
	rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/nbdhost.socket $(DESTDIR)$(SYSTEMDUNITDIR)/nbdhost.service
	# The service's arguments go only as installed; edited, they stay.
	@if [ -e $(DEFAULTS) ] && ! $(SUBST) systemd/nbdhost.default.in | cmp -s - $(DEFAULTS); then \
		echo "uninstall: $(DEFAULTS) was changed: kept"; else rm -f $(DEFAULTS); fi

# A source tarball of HEAD with every crate vendored, which builds with
# `cargo build --offline --locked` where no registry can be reached.
DISTNAME = nbdhost-$(VERSION)
dist:
	rm -rf target/dist && mkdir -p target/dist
	git archive --format=tar --prefix=$(DISTNAME)/ HEAD | tar -x -C target/dist
	cd target/dist/$(DISTNAME) && $(CARGO) vendor --locked --quiet vendor && mkdir -p .cargo && \
		printf '[source.crates-io]\nreplace-with = "vendored"\n\n[source.vendored]\ndirectory = "vendor"\n' \
		>.cargo/config.toml
	tar -C target/dist -cJf target/dist/$(DISTNAME).tar.xz $(DISTNAME)
	@echo "dist: target/dist/$(DISTNAME).tar.xz"

# The Debian packages, built from the dist tree: target/dist/*.deb.
deb: dist
	cd target/dist/$(DISTNAME) && dpkg-buildpackage -us -uc -b
	lintian --fail-on error target/dist/nbdhost_$(VERSION)_*.changes
