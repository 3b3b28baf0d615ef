# A GPU worker: CUDA torch, diffusers, one warm Kandinsky 5 pipeline. Build from the repo root:
#   docker build -f docker/worker.Dockerfile -t k5serve-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.9.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 --user-group k5
# CUDA torch first; torchvision lets transformers build the real Qwen2VLProcessor of the published checkpoints.
RUN pip install torch==${TORCH_VERSION} torchvision --index-url ${TORCH_INDEX}
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
RUN pip install '.[worker]'

# Model downloads and the torch.compile cache live on volumes, so restarts neither re-download nor re-compile.
ENV HF_HOME=/models TORCHINDUCTOR_CACHE_DIR=/cache/inductor TRITON_CACHE_DIR=/cache/triton K5_LOG_FORMAT=json
RUN mkdir -p /models /cache && chown 10001:10001 /models /cache
VOLUME ["/models", "/cache"]
USER 10001
ENTRYPOINT ["k5serve"]
CMD ["worker"]
