# The gateway and webhook delivery: FastAPI + Redis + boto3, no torch. Build from the repo root:
#   docker build -f docker/gateway.Dockerfile -t k5serve-gateway .
# Runs `k5serve gateway` by default; `docker run ... k5serve-gateway webhooks` runs webhook delivery.

# -- build: a virtualenv with the dependencies, then the package -----------------------------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir service worker && touch service/__init__.py worker/__init__.py \
 && pip install . && pip uninstall -y k5serve
COPY service ./service
COPY worker ./worker
RUN pip install --no-deps .

# -- runtime: the virtualenv on a clean base, no build leftovers --------------------------------------------------
FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    K5_HOST=0.0.0.0 K5_PORT=8000 K5_LOG_FORMAT=json
RUN useradd --create-home --uid 10001 --user-group k5
COPY --from=build /opt/venv /opt/venv
WORKDIR /home/k5
USER 10001
EXPOSE 8000
# Probes the gateway; the webhooks process serves /healthz on K5_METRICS_PORT instead (compose overrides it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('K5_PORT', '8000')}/healthz\", timeout=2)"]
ENTRYPOINT ["k5serve"]
CMD ["gateway"]
