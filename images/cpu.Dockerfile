# syntax=docker/dockerfile:1
# CPU image for the ingest, pca-poc and report stages: python:3.11-slim, torch from PyTorch's CPU
# wheel index. Build from the repository root with scripts/images.sh (make images), or:
#   docker build -f images/cpu.Dockerfile --build-arg GIT_SHA=$(git rev-parse HEAD) .
# BASE_IMAGE is pinned by digest (python:3.11-slim multi-arch index); bump tag and digest together.
# Any Debian-like base with python3 (>= 3.11) and python3-venv works (make images-local builds on
# a Debian bookworm rootfs made with mmdebstrap).
ARG BASE_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# The exact dependency pins of pyproject.toml as a requirements file. A separate stage, so the
# dependency layer below is rebuilt only when the pins change, not on any pyproject edit.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="hsissl-cpu" \
      org.opencontainers.image.description="hsissl pipeline stages on the CPU (ingest, pca-poc, report)"
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

# Dependency layer: torch/torchvision from the CPU wheel index (no CUDA libraries), then the
# rest of the pins from PyPI (the installed torch satisfies its pin). TORCH_INDEX_URL empty =
# pip's configured index. PIP_CONFIG_FILE: unset here; local builds point it at the build
# machine's pip configuration, mounted for the RUN only (scripts/host_pip.py).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_CONFIG_FILE
COPY --from=requirements /tmp/requirements.txt /tmp/build/requirements.txt
RUN python3 -m venv "$VIRTUAL_ENV" \
 && grep -E '^(torch|torchvision)==' /tmp/build/requirements.txt > /tmp/build/torch.txt \
 && pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -r /tmp/build/torch.txt \
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
