# qmri-bids BIDS App image.
#
#   CUDA (default; torch from PyPI brings the CUDA runtime, as FastSurfer does):
#     docker build -t qmri-bids:cuda .
#   CPU (torch from a local wheel in build/wheels/, which .ci/container.sh fills with
#   `pip download --no-deps torch==2.13.0 -d build/wheels`):
#     docker build --build-arg TORCH_VARIANT=cpu -t qmri-bids:cpu .
#
# Needs BuildKit (DOCKER_BUILDKIT=1 on Docker 20.10; the default since 23.0). No `# syntax=`
# line on purpose: it would pull the frontend from Docker Hub; the built-in frontend of Docker
# >= 20.10 understands RUN --mount.
#
# Build-time only, never stored in a layer:
#   --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt  CA bundle for pip/npm (TLS proxies)
#   --build-arg PIP_INDEX=https://...   a PyPI mirror (default: pypi.org)
#   --build-arg NPM_REGISTRY=https://... an npm mirror (default: registry.npmjs.org)
#   --build-arg http_proxy=... (Docker's predefined proxy args; kept out of the history)
#
# Run (see workflows/README.md):
#   docker run --rm --read-only --tmpfs /tmp -u "$(id -u):$(id -g)" \
#     -v "$PWD/bids:/data:ro" -v "$PWD/out:/out" -v "$PWD/work:/work" \
#     qmri-bids:cpu /data /out participant -w /work --nprocs 2

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VARIANT=cuda

# ----------------------------------------------------------------------------------------------
# 1. builder: the qmri-bids wheel (pure Python; models/*.safetensors are package data)
# ----------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qmri_bids ./qmri_bids
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    python3 -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip wheel --no-cache-dir ${PIP_INDEX:+--index-url "$PIP_INDEX"} \
         --no-deps --wheel-dir /dist . \
    && ls -l /dist

# ----------------------------------------------------------------------------------------------
# 2. runtime-base: Python venv at /opt/venv, bids-validator (Debian's nodejs + npm)
# ----------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime-base
ARG PIP_INDEX=""
ARG NPM_REGISTRY=""
ARG BIDS_VALIDATOR_VERSION=1.15.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ARG DEBIAN_FRONTEND=noninteractive

# force-unsafe-io: no fsync per file while unpacking (~250 small node-* packages); a failed build
# is simply rerun, so crash safety of dpkg does not matter here.
# DL3008: the Debian packages are not pinned to exact versions: bookworm's archive only keeps the
# newest point release of each, so a pin breaks the build at the next security update. The base
# image (BASE_IMAGE) is what fixes the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends -o DPkg::Options::=--force-unsafe-io \
        nodejs npm ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# DL3016: bids-validator is pinned, through BIDS_VALIDATOR_VERSION, which hadolint cannot expand.
# hadolint ignore=DL3016
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then export NODE_EXTRA_CA_CERTS=/run/secrets/cacert; fi; \
    npm install -g --no-audit --no-fund --cache /tmp/npm-cache \
        ${NPM_REGISTRY:+--registry "$NPM_REGISTRY"} "bids-validator@${BIDS_VALIDATOR_VERSION}" \
    && rm -rf /tmp/npm-cache /root/.npm \
    && bids-validator --version

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

# ----------------------------------------------------------------------------------------------
# 3a. torch-cpu: torch from the local CPU wheel (not on PyPI), mounted, never copied into a layer
# ----------------------------------------------------------------------------------------------
FROM runtime-base AS torch-cpu
ARG TORCH_VERSION=2.13.0
# DL3013: torch is pinned through the wheel's file name; its own dependencies follow the wheel's
# metadata.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=cacert \
    --mount=type=bind,source=build/wheels,target=/tmp/wheels \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    pip install --no-cache-dir ${PIP_INDEX:+--index-url "$PIP_INDEX"} \
        /tmp/wheels/torch-"${TORCH_VERSION}"+cpu-*.whl \
    && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda; \
print('torch', torch.__version__)"

# ----------------------------------------------------------------------------------------------
# 3b. torch-cuda: torch from PyPI, which brings the CUDA runtime as nvidia-* wheels
# ----------------------------------------------------------------------------------------------
FROM runtime-base AS torch-cuda
ARG TORCH_VERSION=2.13.0
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# DL3013: torch is pinned, through TORCH_VERSION, which hadolint cannot expand.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    pip install --no-cache-dir ${PIP_INDEX:+--index-url "$PIP_INDEX"} "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ----------------------------------------------------------------------------------------------
# 4. final: torch first (above), then the qmri-bids wheel, whose torch>=2.1 is already met
# ----------------------------------------------------------------------------------------------
# DL3006: not an image but one of the two stages above (torch-cpu or torch-cuda), which has no tag.
# hadolint ignore=DL3006
FROM torch-${TORCH_VARIANT} AS final
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_VARIANT
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/qmri-bids/qmri-bids
ARG BUILD_DATE=""
LABEL org.opencontainers.image.title="qmri-bids" \
      org.opencontainers.image.description="BIDS App: CNN/N4 bias-field correction and CRB-trained qMRI mapping" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.qmri-bids.torch-variant="${TORCH_VARIANT}"

# DL3013: qmri-bids is installed from the wheel built above; its dependencies follow its metadata.
# hadolint ignore=DL3013
RUN --mount=type=secret,id=cacert \
    --mount=type=bind,from=builder,source=/dist,target=/tmp/dist \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    pip install --no-cache-dir ${PIP_INDEX:+--index-url "$PIP_INDEX"} /tmp/dist/qmri_bids-*.whl \
    && pip check \
    && ln -sf /opt/venv/bin/qmri-bids /usr/local/bin/qmri-bids \
    && if find /opt/venv ! -perm -o=r | grep -q .; then chmod -R go=u-w /opt/venv; fi

# Works as any uid (docker run -u, Apptainer) and with --read-only --tmpfs /tmp: everything that
# wants to write a dotfile or a cache is sent to /tmp; nothing under / needs to be writable.
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.matplotlib \
    NIPYPE_CONFIG_DIR=/tmp/.nipype \
    TORCH_HOME=/tmp/.cache/torch \
    NIPYPE_NO_ET=1 \
    OMP_NUM_THREADS=1 \
    QMRI_BIDS_CONTAINER=docker \
    QMRI_BIDS_IMAGE="qmri-bids:${VERSION}-${TORCH_VARIANT}"

RUN python -c "import qmri_bids" \
    && qmri-bids --version \
    && bids-validator --version

WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/qmri-bids"]
CMD ["--help"]
