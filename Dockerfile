# tokenrm: the token-level reward model server (HTTP 8000, gRPC 50051).
#
#   docker build -t tokenrm .                          # CPU torch, demo model built into the image
#   docker build -t tokenrm --build-arg BUILD_DEMO=0 .  # no demo model: mount your own checkpoint
#   docker run --rm -p 8000:8000 -p 50051:50051 tokenrm
#   docker run --rm -p 8000:8000 -v "$PWD/ckpt:/models/rm:ro" -e TOKENRM_MODEL=/models/rm tokenrm
#
# Your own checkpoint: mount the Hugging Face directory (config.json, model.safetensors, tokenizer
# files) read-only at /models/rm and set TOKENRM_MODEL=/models/rm. With TOKENRM_MODEL unset the
# server serves the demo model from TOKENRM_CACHE_DIR (/opt/tokenrm/cache): built into the image
# when BUILD_DEMO=1, otherwise trained there on first start (3-4 minutes on 2 CPU cores; mount a
# volume at /opt/tokenrm/cache to keep it).
#
# CUDA: the CUDA wheels of torch bring their own CUDA libraries, so the slim base is enough:
#   docker build -t tokenrm:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all -e TOKENRM_DEVICE=cuda -p 8000:8000 tokenrm:cuda
# (pick the CUDA tag, here cu128, that torch ${TORCH_VERSION} is published for). A CUDA base image
# can be used too, e.g. --build-arg BASE_IMAGE=nvidia/cuda:<tag>-runtime-ubuntu24.04; when the base
# has no python3, the `base` stage installs the distribution's python3 and python3-venv.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
# A no-op on python:* images. Other bases (e.g. nvidia/cuda) get their distribution's Python.
# DL3008 (pin apt versions) is ignored: the packages come from whichever distribution BASE_IMAGE
# is built on, so no one version string fits every base; the base's tag is what pins them.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------------------------------------
FROM base AS builder
# Keep TORCH_VERSION in step with the Makefile. The CPU index: a bare `torch` from PyPI is the
# multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The same two steps as `make install`: torch first, then the project with its extra.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cli/ cli/
COPY client/ client/
COPY core/ core/
COPY proto/ proto/
COPY server/ server/
COPY training/ training/
RUN pip install --no-cache-dir "/src[server]"

# ---------------------------------------------------------------------------------------------
FROM builder AS demo
# BUILD_DEMO=1: train the demo model now, into the directory the server reads at run time.
# BUILD_DEMO=0: leave it empty; the server builds the demo there on first start if no model is set.
ARG BUILD_DEMO=1
RUN mkdir -p /opt/tokenrm/cache \
    && if [ "${BUILD_DEMO}" = "1" ]; then tokenrm demo --cache-dir /opt/tokenrm/cache; fi

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
RUN groupadd --system --gid 10001 tokenrm \
    && useradd --system --uid 10001 --gid tokenrm --create-home --home-dir /home/tokenrm \
        --shell /usr/sbin/nologin tokenrm
COPY --from=builder /opt/venv /opt/venv
# Owned by the runtime user: the demo cache takes a file lock, and may have to build the model.
COPY --from=demo --chown=tokenrm:tokenrm /opt/tokenrm/cache /opt/tokenrm/cache

# Settings are TOKENRM_* variables (server/settings.py). Outside a container the server binds
# 127.0.0.1; in here it must listen on every interface for published ports to reach it.
# TOKENRM_MODEL=/models/rm: set at `docker run`/compose time to serve a mounted checkpoint.
# DL3064 flags any name containing "TOKEN": TOKENRM_ is the project's prefix, and neither value
# is a secret (API keys, TOKENRM_API_KEYS, are given at run time, never baked in).
# hadolint ignore=DL3064
ENV TOKENRM_HOST=0.0.0.0 \
    TOKENRM_CACHE_DIR=/opt/tokenrm/cache

# Numeric, so that runtimes that check for non-root (e.g. runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /home/tokenrm
# 8000: HTTP (TOKENRM_HTTP_PORT); 50051: gRPC (TOKENRM_GRPC_PORT).
EXPOSE 8000 50051

# Ready = model loaded and queue accepting. Slim images have no curl, hence Python. Sends the
# first of TOKENRM_API_KEYS when keys are configured (/readyz then needs one). The long start
# period covers a first start that trains the demo model (BUILD_DEMO=0, no TOKENRM_MODEL); it
# delays nothing else: the first passing check marks the container healthy, and a model that
# fails to load makes `tokenrm serve` exit.
HEALTHCHECK --interval=10s --timeout=5s --start-period=1800s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; k = os.environ.get('TOKENRM_API_KEYS', '').split(',')[0].strip(); p = os.environ.get('TOKENRM_HTTP_PORT', '8000'); u.urlopen(u.Request('http://127.0.0.1:' + p + '/readyz', headers={'Authorization': 'Bearer ' + k} if k else {}), timeout=4)"]

CMD ["tokenrm", "serve"]
