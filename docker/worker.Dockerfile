# A GPU worker: CUDA torch, diffusers, one warm Kandinsky 5 pipeline. Build from the repo root:
#   docker build -f docker/worker.Dockerfile -t k5serve-worker .
# A CPU-only build (the compose file's cpu profile, tiny models):
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# The torch wheel brings its own CUDA libraries; the CUDA runtime base matches them (cu128 -> CUDA 12.8) and
# needs an NVIDIA driver >= 570 on the node. `k5serve doctor` run in the image checks all of it on a GPU node.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# The versions the worker is tested with; pinned so that a rebuild does not drift to a new release.
ARG TRANSFORMERS_VERSION=5.24.0
ARG ACCELERATE_VERSION=1.15.0
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# gcc, libc6-dev and python3-dev: Triton (pinned by torch) builds its CUDA launcher with a C compiler against
# Python.h the first time Inductor runs a kernel, i.e. during the warm-up; without them the worker crash-loops
# with "Failed to find C compiler".
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 --user-group k5
# torch first and pinned, from the index of its CUDA build. No torchvision: the worker loads the published repos'
# Qwen2VLProcessor as its text tokenizer only (worker/loader.py).
RUN pip install torch==${TORCH_VERSION} --index-url ${TORCH_INDEX}
WORKDIR /src
# Dependencies from pyproject.toml alone (torch is already satisfied), so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir service worker && touch service/__init__.py worker/__init__.py \
 && pip install '.[worker]' transformers==${TRANSFORMERS_VERSION} accelerate==${ACCELERATE_VERSION} \
 && pip uninstall -y k5serve
COPY service ./service
COPY worker ./worker
RUN pip install --no-deps . && rm -rf /src

# Model downloads and the torch.compile / Triton / CUDA JIT caches live on volumes, so a restart neither
# re-downloads nor re-compiles, and the root filesystem can be mounted read-only. HOME points at /tmp for
# libraries that write under ~.
ENV HF_HOME=/models HF_HUB_DISABLE_TELEMETRY=1 TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TRITON_CACHE_DIR=/cache/triton CUDA_CACHE_PATH=/cache/nv XDG_CACHE_HOME=/cache/xdg HOME=/tmp \
    K5_LOG_FORMAT=json K5_HOST=0.0.0.0 K5_METRICS_PORT=9400 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    CC=gcc
RUN mkdir -p /models /cache && chown 10001:10001 /models /cache
VOLUME ["/models", "/cache"]
WORKDIR /tmp
USER 10001
EXPOSE 9400
# /healthz on the worker's own port; the start period covers a first model download and the warm-up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('K5_METRICS_PORT', '9400')}/healthz\", timeout=4)"]
ENTRYPOINT ["k5serve"]
CMD ["worker"]
