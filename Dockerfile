# One image for ps-server and ps-worker. The base is any image with Python 3.10+ and pip on PATH;
# the default is the official Python image, and torch is installed at the one tested version
# (TORCH_VERSION, the same pin as deploy/base-image.sh): PyPI's Linux wheel carries its CUDA
# libraries, so the image runs on GPUs (NVIDIA container toolkit) and on CPUs alike. Where no image
# can be pulled, build a local base holding that torch with deploy/base-image.sh and pass it:
#   deploy/base-image.sh --wheels DIR
#   docker build --network host --build-arg BASE_IMAGE=ps-base:local -t ps:local .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PS_HOST=0.0.0.0 \
    PS_PORT=5000 \
    PS_DATA_PORT=5001 \
    PS_LOG_DIR=/data/logs

# The build context is pyproject.toml, README.md, proto/ and ps/ (see .dockerignore).
COPY . /opt/ps/
# A base that already holds torch at TORCH_VERSION (a local build such as 2.13.0+cpu included)
# keeps it; any other torch is replaced by the pinned one. One layer: install, check that everything
# imports and the offline dataset loads, add the non-root user and the data directory.
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" /opt/ps \
    && python -c "import torch, grpc, ps.server.app, sklearn.datasets; sklearn.datasets.load_digits(); print('torch', torch.__version__)" \
    && groupadd --gid 10001 ps \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin ps \
    && mkdir -p /data \
    && chown 10001:10001 /data
USER 10001:10001

EXPOSE 5000 5001
# Servers answer the standard gRPC health check (no token needed); workers disable this check.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-m", "ps.cli.probe"]
CMD ["ps-server"]
