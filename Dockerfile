# syntax=docker/dockerfile:1

# --- build: the wheel, plus wheels of every dependency (no compiler reaches the final image)
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY pns_server ./pns_server
COPY client_sdk ./client_sdk
COPY migrations ./migrations
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --wheel-dir /wheels "$(ls /wheels/pns-*.whl)[server]"

# --- runtime
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PNS_HOST=0.0.0.0 \
    PNS_PORT=8080 \
    PNS_DATA_DIR=/data \
    PNS_LOG_FORMAT=json
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "$(ls /wheels/pns-*.whl)[server]" \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin pns \
 && mkdir -p /data && chown pns:pns /data
USER pns
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
