# syntax=docker/dockerfile:1
# tokenrm: the token-level reward model server (HTTP 8000, gRPC 50051).
#
#   docker build -t tokenrm .                          # CPU torch; the demo models ship inside
#   docker run --rm -p 8000:8000 -p 50051:50051 tokenrm
#   docker run --rm -p 8000:8000 -v "$PWD/ckpt:/models/rm:ro" -e TOKENRM_MODEL=/models/rm tokenrm
#
# With TOKENRM_MODEL unset the server serves demo-token-rm, which ships inside the package
# (tokenrm.demo), so a new container answers as soon as the model is loaded. Your own
# checkpoint: mount the Hugging Face directory (config.json, model.safetensors, tokenizer files)
# read-only at /models/rm and set TOKENRM_MODEL=/models/rm.
#
# Behind a private index or a proxy, give pip its settings as a build secret: the pip steps read
# it at /etc/pip.conf, and it is in no layer of the image (files it names must exist in the build):
#   docker build --secret id=pip.conf,src="$HOME/.config/pip/pip.conf" -t tokenrm .
# `make test-container` builds this file with buildah on a Debian base of its own; see README.md.
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
# multi-GB CUDA build. TORCH_INDEX empty: pip's own index and settings (e.g. the pip.conf secret).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The same two steps as `make install`: torch first, then the project with its extra. pip's
# cache is a cache mount, kept between builds and never in a layer; only /opt/venv leaves
# this stage.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && if [ -n "${TORCH_INDEX}" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi
# The build context is what .dockerignore lets through: pyproject.toml, README.md and every
# folder that pyproject.toml maps into the tokenrm namespace (demo/ carries the demo models).
COPY . /src/
# Then what serving never runs goes: the test suites that wheels carry (torch's C++ test
# programs among them), about 250 MB.
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=cache,target=/root/.cache/pip \
    pip install "/src[server]" \
    && find /opt/venv -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3*/site-packages/torch/test \
        /opt/venv/lib/python3*/site-packages/torch/bin/test_* \
        /opt/venv/lib/python3*/site-packages/torch/bin/*Test \
        /opt/venv/lib/python3*/site-packages/torch/bin/protoc*

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
RUN groupadd --system --gid 10001 tokenrm \
    && useradd --system --uid 10001 --gid tokenrm --create-home --home-dir /home/tokenrm \
        --shell /usr/sbin/nologin tokenrm
COPY --from=builder /opt/venv /opt/venv

# Settings are TOKENRM_* variables (server/settings.py). Outside a container the server binds
# 127.0.0.1; in here it must listen on every interface for published ports to reach it.
# TOKENRM_MODEL=/models/rm: set at `docker run`/compose time to serve a mounted checkpoint.
# DL3064 flags any name containing "TOKEN": TOKENRM_ is the project's prefix, and the value is no
# secret (API keys, TOKENRM_API_KEYS, are given at run time, never baked in).
# hadolint ignore=DL3064
ENV TOKENRM_HOST=0.0.0.0

# Numeric, so that runtimes that check for non-root (e.g. runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /home/tokenrm
# 8000: HTTP (TOKENRM_HTTP_PORT); 50051: gRPC (TOKENRM_GRPC_PORT).
EXPOSE 8000 50051

# Ready = model loaded and queue accepting. Slim images have no curl, hence Python. Sends the
# first of TOKENRM_API_KEYS when keys are configured (/readyz then needs one). The start period
# covers loading a large checkpoint; it delays nothing else: the first passing check marks the
# container healthy, and a model that fails to load makes `tokenrm serve` exit.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; k = os.environ.get('TOKENRM_API_KEYS', '').split(',')[0].strip(); p = os.environ.get('TOKENRM_HTTP_PORT', '8000'); u.urlopen(u.Request('http://127.0.0.1:' + p + '/readyz', headers={'Authorization': 'Bearer ' + k} if k else {}), timeout=4)"]

CMD ["tokenrm", "serve"]
