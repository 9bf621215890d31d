# tuneserve serving image: GPU-capable (CUDA runtime + cuDNN), runs on CPU-only nodes too
# (the service then logs and exports provider=CPUExecutionProvider). No torch inside.
#
#   make image MODEL=digits:v1     # bakes that model-store version in (staged in build/models)
#   docker run -p 3000:3000 tuneserve:digits-v1
#   docker run -p 3000:3000 -v $PWD/artifacts/flowers/v2:/models/flowers:ro \
#       -e TUNESERVE_MODEL=/models/flowers tuneserve:digits-v1   # or serve a mounted artifact
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# The model-store tag to serve; build/models/ holds that version in the store's layout.
ARG MODEL_TAG=digits:latest
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    BENTOML_HOME=/opt/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    HF_HUB_OFFLINE=1 \
    TUNESERVE_MODEL=${MODEL_TAG}

# The base image tag fixes the Ubuntu release; per-package apt pins would break the build at
# every Ubuntu security update, so DL3008 is waived here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group tuneserve

WORKDIR /app
COPY requirements/serve.txt requirements/
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r requirements/serve.txt

COPY bentofile.yaml ./
COPY service/ service/
COPY tasks/ tasks/
COPY export/__init__.py export/card.py export/errors.py export/
COPY build/models/ /opt/bentoml/models/
# BentoML writes its multiprocess metrics here (an emptyDir where the root is read-only).
RUN mkdir -p /opt/bentoml/prometheus_multiproc_dir \
    && chown 10001:10001 /opt/bentoml/prometheus_multiproc_dir

USER 10001
EXPOSE 3000
# /readyz answers 200 once the model is loaded and warmed up.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:3000/readyz"]
CMD ["bentoml", "serve", "--host", "0.0.0.0", "--port", "3000"]
