# supportqa server image. CPU by default; for CUDA build with
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg TORCH_PIP_ARGS=
# (PyPI's torch==2.13.0 is the CUDA build) and run with --gpus all -e SUPPORTQA_DEVICE=cuda.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SUPPORTQA_HOST=0.0.0.0 \
    SUPPORTQA_PORT=50051 \
    SUPPORTQA_DATA_DIR=/data \
    SUPPORTQA_CACHE_DIR=/data/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY protos ./protos
COPY clients ./clients
COPY server ./server
COPY tools ./tools
COPY scripts ./scripts
COPY knowledge ./knowledge
# The same set-up as the README's: `make setup` (system packages, torch==2.13.0 first, extras).
RUN make setup TORCH_PIP_ARGS="${TORCH_PIP_ARGS}" \
    && rm -rf /root/.cache/pip /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 supportqa \
    && mkdir -p /data && chown supportqa:supportqa /data
USER 10001
VOLUME ["/data"]
EXPOSE 50051

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/app/.venv/bin/supportqa", "--target", "127.0.0.1:50051", "health"]

CMD ["/app/.venv/bin/supportqa-server", "serve", "--ingest", "/app/knowledge/sample.jsonl"]
