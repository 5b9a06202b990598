# syntax=docker/dockerfile:1
# CUDA image for the training stages (pretrain, finetune, baseline): CUDA 13.0 + cuDNN runtime on
# Ubuntu 24.04 (Python 3.12), matching the cu130 build PyPI serves for torch==2.14.1, which brings
# its own CUDA libraries. Build from the repository root with scripts/images.sh (make images), or:
#   docker build -f images/train.Dockerfile --build-arg GIT_SHA=$(git rev-parse HEAD) .
# Both images are pinned by digest (multi-arch indexes); bump tag and digest together.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04@sha256:14d94b039cb94bbd5da559f303b46bc4b0d5d6c24ab1a9d7b186e566ed3400dc
ARG REQUIREMENTS_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# The exact dependency pins of pyproject.toml as a requirements file. A separate stage, so the
# dependency layer below is rebuilt only when the pins change, not on any pyproject edit.
FROM ${REQUIREMENTS_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="hsissl-train" \
      org.opencontainers.image.description="hsissl pipeline stages on NVIDIA GPUs (pretrain, finetune, baseline)"
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The non-root user every stage runs as (uid/gid 10001, matching the chart's securityContext).
# It owns the working directory /app (runs/ of relative run_dirs) and /gcs, /minio, /s3, where
# the KFP v2 launcher stages artifacts and which a non-root user could not create at the root.
RUN groupadd --gid 10001 hsissl \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/hsissl --shell /usr/sbin/nologin hsissl \
 && install -d -o 10001 -g 10001 /app /gcs /minio /s3

# Ubuntu's Python. Versions come from the archive of the digest-pinned base: the Ubuntu archive
# keeps only the newest patch of a package, so exact apt pins would break later rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Dependency layer: the exact pins from PyPI (torch==2.14.1 brings its CUDA 13 libraries).
# PIP_CONFIG_FILE: unset here; local builds point it at the build machine's pip configuration,
# mounted for the RUN only (scripts/host_pip.py).
ARG PIP_CONFIG_FILE
COPY --from=requirements /tmp/requirements.txt /tmp/build/requirements.txt
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir -r /tmp/build/requirements.txt setuptools==84.2.1 \
 && rm -rf /tmp/build

# Code layer: the packages (hsissl, components, pipelines), without touching the dependencies.
WORKDIR /app
COPY README.md pyproject.toml /app/
COPY src/ /app/src/
COPY components/ /app/components/
COPY pipelines/ /app/pipelines/
COPY configs/ /app/configs/
RUN pip install --no-cache-dir --no-deps --no-build-isolation /app \
 && rm -rf /app/src /app/components /app/pipelines /app/build /app/*.egg-info

# Declared last: a changed ARG invalidates every RUN after it, so the SHA must not come before
# the dependency layer.
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.revision=$GIT_SHA
# Stages may write only to /tmp and the KFP launcher's folders (a read-only root otherwise):
# matplotlib keeps its font cache and config under /tmp, not in HOME.
ENV HSISSL_GIT_SHA=$GIT_SHA \
    HOME=/home/hsissl \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
ENTRYPOINT ["hsissl"]
CMD ["--help"]
