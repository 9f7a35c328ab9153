# smki-repository: the repository server with its embedded PostgreSQL (or database.url).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SMKI_DATA_DIR=/var/lib/smki \
    SMKI_LISTENERS__HTTP=0.0.0.0:8083 SMKI_LISTENERS__HTTPS=0.0.0.0:8443 \
    SMKI_LISTENERS__LODGE=0.0.0.0:8444

RUN apt-get update && apt-get install -y --no-install-recommends curl openssl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/smki --uid 10001 smki \
    && install -d -o smki -g smki /pki /var/lib/smki/extracts
# /pki (a test PKI) and the extracts directory are owned by smki so that a named volume
# mounted there starts writable by it (docker-compose.yml shares both between containers)

WORKDIR /opt/smki-repository
COPY pyproject.toml README.md ./
COPY repository_server ./repository_server
COPY conf ./conf
RUN pip install . && smki-repository --version

USER smki
EXPOSE 8083 8443 8444 3890 6360
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8083/readyz || exit 1
ENTRYPOINT ["smki-repository"]
# `serve` needs the TLS files and DCC client CA under /var/lib/smki/pki (mount them, or set
# SMKI_TLS__CERT / SMKI_LODGE__CLIENT_CA ...); `demo` generates a test PKI and lodges it.
CMD ["serve", "--config", "/opt/smki-repository/conf/repository.toml"]
