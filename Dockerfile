# supportqa server image: the server's runtime dependencies only (no dev or test extras), run as
# a non-root user, data on a volume. scripts/docker_smoke.sh builds it and proves it works.
#
# CPU by default. For CUDA build with
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg TORCH_PIP_ARGS=
# (PyPI's torch==2.13.0 is the CUDA build) and run with --gpus all -e SUPPORTQA_DEVICE=cuda.
# Without Docker Hub, make a base image from Debian (debootstrap) and pass it as BASE_IMAGE.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# An extra wheel folder or URL (e.g. a local torch wheel); and pip-ca.pem, when the build
# context has one, is the CA bundle of a TLS-inspecting proxy. Both for this stage only.
ARG PIP_FIND_LINKS=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY pyproject.toml README.md pip-ca.pem* ./
COPY protos ./protos
COPY clients ./clients
COPY server ./server
COPY tools ./tools
# torch==2.13.0 first (the CPU wheel); then the server extra, installed (not editable) into
# /app/.venv. triton comes with openai-whisper and only serves CUDA word timings: ~1 GB unused.
# hadolint ignore=DL3013,SC2086
RUN if [ -f pip-ca.pem ]; then export PIP_CERT=/src/pip-ca.pem; fi; \
    export PIP_FIND_LINKS PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1; \
    python3 -m venv /app/.venv \
    && /app/.venv/bin/pip install -q torch==2.13.0 ${TORCH_PIP_ARGS} \
    && /app/.venv/bin/pip install -q '.[server]' \
    && (/app/.venv/bin/pip uninstall -q -y triton || true)

FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && mkdir -p /data && chown 10001:10001 /data
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/data \
    SUPPORTQA_HOST=0.0.0.0 \
    SUPPORTQA_PORT=50051 \
    SUPPORTQA_METRICS_PORT=9464 \
    SUPPORTQA_DATA_DIR=/data \
    SUPPORTQA_CACHE_DIR=/data/cache \
    SUPPORTQA_LOG_FORMAT=json
COPY --from=build /app/.venv /app/.venv
COPY knowledge/sample.jsonl /app/knowledge/sample.jsonl
WORKDIR /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 50051 9464

HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/app/.venv/bin/supportqa", "--target", "127.0.0.1:50051", "health"]

STOPSIGNAL SIGTERM
CMD ["/app/.venv/bin/supportqa-server", "serve", "--ingest", "/app/knowledge/sample.jsonl"]
