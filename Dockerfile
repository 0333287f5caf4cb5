# embedsvc container image.
#
#   GPU (default):  docker build -t embedsvc:gpu .
#   CPU only:       docker build --build-arg VARIANT=cpu -t embedsvc:cpu .
#   With `embedsvc embed` and Ray (a KubeRay image, deploy/ray/rayjob.yaml):
#                   docker build --build-arg VARIANT=cpu --build-arg LOCK=bulk -t embedsvc:bulk .
# Packages come from the locks in requirements/ (exact versions, sha256 checked); torch
# from the variant's wheel index at the version requirements/torch.txt pins.
#   Models baked in at build time (needs the Hub or HF_ENDPOINT at build time):
#                   docker build --build-arg PULL_MODELS=bge-small-en-v1.5 -t embedsvc:bge .
#
# Run (models from a mounted Hugging Face cache, filled by `embedsvc pull`):
#   docker run --gpus all -p 8080:8080 -v hf-cache:/data/hf embedsvc:gpu --models bge-small-en-v1.5

ARG VARIANT=gpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    EMBEDSVC_LOCK=gpu

FROM python:3.12-slim AS base-cpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    EMBEDSVC_LOCK=cpu

# hadolint ignore=DL3006
FROM base-${VARIANT}
# Another lock than the variant's: bulk (embedsvc embed and Ray; the server needs neither).
ARG LOCK=""
ENV VIRTUAL_ENV=/opt/embedsvc \
    PATH=/opt/embedsvc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md models.yaml models.lock.json ./
COPY requirements ./requirements
# The torch build for this variant first (CUDA or CPU wheel index, with the CUDA runtime
# packages it brings), then the lock with every hash checked, then embedsvc alone.
RUN python3 -m venv /opt/embedsvc \
    && pip install --index-url "$TORCH_INDEX_URL" -r requirements/torch.txt \
    && pip install --require-hashes --no-deps -r "requirements/${LOCK:-$EMBEDSVC_LOCK}.lock"
COPY embedsvc ./embedsvc
# embedsvc/models.yaml and its lock are links to the top-level files; ship copies.
RUN rm -f embedsvc/models.yaml embedsvc/models.lock.json \
    && cp models.yaml models.lock.json embedsvc/ \
    && pip install --no-deps --no-build-isolation . && pip check && rm -rf /src

# jemalloc keeps resident memory flat under the many tensor shapes continuous batching
# makes, at full speed (glibc's malloc fragments; see docs/benchmarks.md, "Memory").
RUN ln -s "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" /usr/local/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin embedsvc \
    && mkdir -p /data/hf && chown embedsvc /data/hf
ENV HF_HOME=/data/hf \
    EMBEDSVC_HOST=0.0.0.0 \
    EMBEDSVC_PORT=8080

ARG PULL_MODELS=""
# As root: the pull records each file's sha256 in the image's models lock (beside the
# packaged models.yaml), which the service checks at every start.
RUN if [ -n "$PULL_MODELS" ]; then \
        embedsvc pull --models "$PULL_MODELS" && chown -R embedsvc /data/hf; fi
USER 10001
# Serving never downloads: models come from the image, the mounted cache, or local_dir.
ENV HF_HUB_OFFLINE=1
VOLUME ["/data/hf"]
WORKDIR /home/embedsvc
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('EMBEDSVC_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["embedsvc", "serve"]
