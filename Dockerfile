# syntax=docker/dockerfile:1
# The broker's container image: `monogoto-broker serve` as a numeric non-root user.
#
#   docker build -t monogoto-broker .
#   docker run -v ./config:/etc/broker:ro -e BROKER_CONFIG=/etc/broker/config.yaml -p 8080:8080 monogoto-broker
#
# PYTHON_IMAGE is any Debian-based image with Python 3.11+ and its venv module at python3: the
# official slim image by default; deploy/check-image passes a locally built Debian base instead.
# Both stages use the same base, so the virtualenv's interpreter link stays valid.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
# pip and uv trust the system CA store (so a build behind a TLS-inspecting proxy can mount its
# bundle over it); the final stage does not inherit these settings.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_PROJECT_ENVIRONMENT=/opt/broker \
    UV_PYTHON=python3 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet "uv==${UV_VERSION}"
WORKDIR /src
# Dependencies first, from the lock file only: this layer survives changes to the code.
COPY pyproject.toml uv.lock ./
# The lock file lists the Python client (a dev dependency, not installed here) by its pyproject.
COPY clients/python/pyproject.toml ./clients/python/
RUN /opt/uv/bin/uv sync --locked --no-dev --no-install-project --no-editable
COPY README.md ./
COPY service ./service
# The project itself as a regular (non-editable) install: /src is not in the final image.
RUN /opt/uv/bin/uv sync --locked --no-dev --no-editable \
    && /opt/broker/bin/monogoto-broker --help >/dev/null

FROM ${PYTHON_IMAGE}
# Nothing is written outside /tmp: bytecode is compiled at build time, the multi-worker metrics
# directory goes under TMPDIR, logs go to stderr. The root filesystem can be read-only.
ENV PATH=/opt/broker/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["monogoto-broker", "serve"]
# Last, so that the settings above stay cached; owned by root, so the broker cannot modify it.
COPY --from=build /opt/broker /opt/broker
