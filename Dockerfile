# syntax=docker/dockerfile:1
# realtime-sidecar image: `sidecar serve` by default, `sidecar consume` for the billing consumer.
#   docker build -t realtime-sidecar:0.1.0 .
#   docker run -p 8787:8787 -v $PWD/examples/config.yaml:/etc/litellm/config.yaml:ro \
#     -e SIDECAR_LITELLM_CONFIG=/etc/litellm/config.yaml realtime-sidecar:0.1.0
# The image runs as an unprivileged user with a read-only root filesystem in mind: the only paths it
# writes are SIDECAR_SPOOL_DIR and /tmp (the Helm chart mounts an emptyDir on each).

# The base of both stages. Any Debian-like image works that has Python >= 3.11 as `python` with pip and
# venv, and groupadd/useradd: scripts/image-check.sh builds on a local debootstrap base this way
# (`--build-arg PYTHON_IMAGE=localhost/realtime-sidecar-base:bookworm-1`, docs/deploy.md).
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the project's wheel, installed with its dependencies into a virtualenv --------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install /wheels/*.whl \
 && /opt/venv/bin/sidecar --help >/dev/null

# --- runtime: the virtualenv on a clean slim image, no build tools, non-root ------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sidecar --no-create-home \
      --shell /usr/sbin/nologin sidecar \
 && mkdir -p /var/lib/sidecar/spool \
 && chown -R 10001:10001 /var/lib/sidecar
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8787 \
    SIDECAR_SPOOL_DIR=/var/lib/sidecar/spool
WORKDIR /var/lib/sidecar
USER 10001:10001
EXPOSE 8787
ENTRYPOINT ["sidecar"]
CMD ["serve"]
