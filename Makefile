# cloudlet: one entry point for people and CI.
#
#   make demo    the main job: a local cloudlet provisions and moves a real app
#   make test    everything CI runs: format, lint, the whole test suite
#
# Both install what they need on Debian (as root) first, then run
# `cloudlet doctor`, which stops them at once, with the reason and what to
# run, on a machine that lacks something.

CARGO        ?= cargo
GUEST_TARGET := x86_64-unknown-linux-gnu
GUEST_DIR    := target/guest/$(GUEST_TARGET)/release
GUEST_BINS   := cloudlet-agent kvstore translator
export CLOUDLET_AGENT := $(CURDIR)/$(GUEST_DIR)/cloudlet-agent

.PHONY: all deps doctor doctor-tests guest build test lint fmt demo bench clean openapi

all: build

## System packages (Debian). Skipped when everything is already there.
deps:
	@./scripts/install-deps.sh

## What this machine has and lacks, for the main job / for the tests
## (make demo runs the first itself, with its own CLOUDLET_HOME).
doctor:
	$(CARGO) run -q --release -p cloudlet-cli --bin cloudlet -- doctor

doctor-tests:
	$(CARGO) run -q -p cloudlet-cli --bin cloudlet -- doctor --tests

## Static binaries that run inside the guest (agent and example apps).
guest:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release \
	  --target $(GUEST_TARGET) --target-dir target/guest \
	  $(addprefix -p ,$(GUEST_BINS))
	strip $(addprefix $(GUEST_DIR)/,$(GUEST_BINS))

build: guest
	$(CARGO) build --release --bins

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) run -q -p check-layout -- --baseline tools/check-layout/baseline.txt

test: deps doctor-tests guest lint
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

demo: deps build
	./scripts/demo.sh

bench: deps build
	$(CARGO) run --release -p cloudlet-bench --bin restore-bench

## The OpenAPI document kept in docs/ (CI checks it matches the code).
openapi:
	$(CARGO) run -q -p cloudletd -- --openapi > docs/openapi.json
	UPDATE_OPENAPI=1 $(CARGO) test -q -p cloudlet-registry --lib openapi

clean:
	$(CARGO) clean
