# syntax=docker/dockerfile:1

# Both stages on one exact Python release and Debian suite. Pinning a digest as well
# (python:3.11.14-slim-bookworm@sha256:...) also freezes the OS packages: take it from
# `docker buildx imagetools inspect` on a machine that can reach the registry.

# --- build: only our own wheel (the dependencies come from the lock, as published wheels)
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY pns_server ./pns_server
COPY client_sdk ./client_sdk
COPY migrations ./migrations
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime
FROM python:3.11.14-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PNS_HOST=0.0.0.0 \
    PNS_PORT=8080 \
    PNS_DATA_DIR=/data \
    PNS_LOG_FORMAT=json
# Exactly the versions in requirements/server.lock, each checked against its hash, binary
# wheels only (no compiler in the image) except http-ece, which is published as a pure-Python
# source archive only; then our wheel without resolving anything again.
RUN --mount=type=bind,source=requirements/server.lock,target=/tmp/server.lock \
    --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --require-hashes --only-binary :all: --no-binary http-ece \
       -r /tmp/server.lock \
 && pip install --no-cache-dir --no-index --no-deps /wheels/pns_relay-*.whl \
 && pip check \
 && groupadd --system --gid 10001 pns \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --shell /usr/sbin/nologin pns \
 && mkdir -p /data && chown 10001:10001 /data
# Numeric, so an orchestrator can tell it is not root without reading /etc/passwd.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# No curl in a slim image: python's urllib is enough.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PNS_PORT', '8080'), timeout=4)"]
# Migrates at start unless PNS_MIGRATE_ON_START=false; `docker run IMAGE admin clients` also works.
ENTRYPOINT ["pns-server"]
CMD ["serve"]
STOPSIGNAL SIGTERM
