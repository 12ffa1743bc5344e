# dnsmirror's image: the package and iproute2 (the DaemonSet's init container adds the node-local
# address with `ip`). Build from the repository root:
#   docker build -t <your-registry>/dnsmirror:0.1.0 .
#   docker build --build-arg BASE_IMAGE=<your-mirror>/python:3.11-slim -t ... .
# A base image with Python 3.11+, pip and iproute2 works too; with pip's index settings in its
# environment (PIP_NO_INDEX, PIP_FIND_LINKS) the build needs no network (tests/test_image_e2e.py).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# a base that already has `ip` skips the package download
RUN command -v ip >/dev/null 2>&1 \
 || { apt-get update \
      && apt-get install -y --no-install-recommends iproute2 \
      && rm -rf /var/lib/apt/lists/*; }

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dnsmirror ./dnsmirror
RUN pip install --no-cache-dir . \
 && rm -rf /src
WORKDIR /

# Runs as root: the CA key (Secret, 0400) and the hostPath volumes are root-owned; the DaemonSet
# drops every capability except NET_BIND_SERVICE (NET_ADMIN for the init container).
ENV PYTHONUNBUFFERED=1
CMD ["dnsmirror", "serve", "--config", "/etc/dnsmirror/config/config.yaml"]
