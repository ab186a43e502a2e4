# Two entry points (see README): `make demo` and `make test`. Each installs everything it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := dcmtk dicom3tools redis-server orthanc orthanc-dicomweb postgresql nodejs npm libpixelmed-java default-jdk-headless chromium chromium-driver
STAMP := $(VENV)/.installed

.PHONY: setup system-packages demo serve test lint typecheck bench demo-model clean

# Debian packages: the real DICOM peers, validators, Redis and PostgreSQL used by the node's tests and demo;
# Node.js and npm run OHIF's own SR code on the node's reports, PixelMed (with a JDK: its validator runs in Java's
# source-file mode) checks them against TID 1500; the headless browser the console's tests drive. A package counts
# as present when a command of its name is on the PATH too (npm comes with Node.js from other sources, whose nodejs
# conflicts with Debian's npm).
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: system-packages $(STAMP)

# The node's main job on embedded defaults: receive a real study, run the built-in demo model, show the results.
demo: setup
	$(BIN)/dicom-node demo

serve: setup
	$(BIN)/dicom-node serve

lint: $(STAMP)
	$(BIN)/ruff check dicom_node inference sr_writer tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/pytest -q

bench: setup
	for b in bench/bench_*.py; do m=$$(basename $$b .py); echo "== $$m"; $(BIN)/python -m bench.$$m || exit 1; done

demo-model: setup
	$(BIN)/python -m inference.demo.train

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
