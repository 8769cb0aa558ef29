# syntax=docker/dockerfile:1
# Build: a virtualenv with segrelay and its dependencies (wheels only, no compilers needed).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY handlers ./handlers
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: . \
    && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# Run: the slim base, the virtualenv, a numeric non-root user; nothing else.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="segrelay" \
      org.opencontainers.image.description="Segment destination partner endpoint"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SEGRELAY_STORE=sqlite:////data/segrelay.db
COPY --from=build /opt/venv /opt/venv
RUN install -d -o 10001 -g 10001 -m 0750 /data
WORKDIR /data
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["segrelay", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
