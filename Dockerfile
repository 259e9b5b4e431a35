# mrc-ingest: the ingestion service on python slim, run as a non-root user.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MRC_INGEST_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install .

RUN useradd --create-home --uid 10001 mrc \
    && mkdir -p /data \
    && chown mrc:mrc /data
USER mrc
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

CMD ["mrc-ingest", "serve", "--host", "0.0.0.0", "--port", "8000"]
