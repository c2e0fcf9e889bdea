# syntax=docker/dockerfile:1
# zenmux-exporter: build a virtualenv in one stage, copy only it into a slim runtime.
#   docker build -t zenmux-exporter:0.1.0 --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#   docker run --read-only --tmpfs /tmp -v zenmux-state:/var/lib/zenmux-exporter \
#     -v $PWD/config.yaml:/etc/zenmux-exporter/config.yaml:ro -p 9466:9466 zenmux-exporter:0.1.0
# Pin further by digest (python:3.12.8-slim-bookworm@sha256:...) where your registry policy asks for it.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first (cached while only the code changes), then the package itself.
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# pip byte-compiles what it installs, so nothing needs writing at run time; then the installer goes.
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall --yes pip setuptools wheel \
    && rm -rf /opt/venv/bin/activate* /opt/venv/bin/Activate.ps1 /root/.cache

FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG SOURCE_URL=https://github.com/zenmux-exporter/zenmux-exporter
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="zenmux-exporter" \
      org.opencontainers.image.description="Prometheus exporter for ZenMux LLM generations: tokens, latency and cost by model and protocol." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.documentation="${SOURCE_URL}#deploy-on-kubernetes" \
      org.opencontainers.image.base.name="docker.io/library/${PYTHON_IMAGE}"
# The runtime needs no installer: drop the base image's pip, and any bytecode writes (the root fs is read-only).
RUN python -m pip uninstall --yes pip setuptools wheel \
    && rm -rf /root/.cache \
    && groupadd --system --gid 10001 zenmux \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin zenmux \
    && mkdir -p /var/lib/zenmux-exporter /etc/zenmux-exporter \
    && chown 10001:10001 /var/lib/zenmux-exporter
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# SQLite's state database, its WAL and temporary files live here; mount a volume (an emptyDir in Kubernetes).
VOLUME ["/var/lib/zenmux-exporter"]
WORKDIR /var/lib/zenmux-exporter
USER 10001:10001
# /metrics, /healthz, /readyz; the UDP id source (loopback by default).
EXPOSE 9466/tcp 9467/udp
# Kubernetes ignores this; it is for plain Docker (no curl in a slim image, so Python asks /healthz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9466/healthz', timeout=4).status != 200)"]
# SIGTERM starts the drain (shutdown.drain_seconds); give `docker stop -t` at least that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["zenmux-exporter"]
CMD ["run", "--config", "/etc/zenmux-exporter/config.yaml"]
