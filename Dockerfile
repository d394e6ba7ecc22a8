# One image for ps-server and ps-worker. The base is any image with Python 3.10+ and torch on
# PATH; the default is the public CUDA PyTorch runtime. Where no image can be pulled, build a
# local base with deploy/base-image.sh and pass it:
#   docker build --network host --build-arg BASE_IMAGE=ps-base:local -t ps:local .
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PS_HOST=0.0.0.0 \
    PS_PORT=5000 \
    PS_LOG_DIR=/data/logs

# The build context is pyproject.toml, README.md, proto/ and ps/ (see .dockerignore).
COPY . /opt/ps/
# torch comes with the base image; pip keeps it and adds the rest. One layer: install, check that
# everything imports and the offline dataset loads, add the non-root user and the data directory.
RUN python -m pip install --no-cache-dir /opt/ps \
    && python -c "import torch, grpc, ps.server.app, sklearn.datasets; sklearn.datasets.load_digits()" \
    && groupadd --gid 10001 ps \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin ps \
    && mkdir -p /data \
    && chown 10001:10001 /data
USER 10001:10001

EXPOSE 5000
# Servers answer the standard gRPC health check (no token needed); workers disable this check.
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-m", "ps.cli.probe"]
CMD ["ps-server"]
