# smki-repository: the repository server with its embedded PostgreSQL (or database.url).
#
#   docker build -t smki-repository .
#   docker run --init -p 127.0.0.1:8083:8083 -v smki-data:/var/lib/smki smki-repository demo
#
# PYTHON_IMAGE: the official image by default; CI passes a stand-in built without a registry
# (.ci/docker-smoke.sh). Pin a digest in production (python:3.11-slim@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    SMKI_DATA_DIR=/var/lib/smki \
    SMKI_LISTENERS__HTTP=0.0.0.0:8083 SMKI_LISTENERS__HTTPS=0.0.0.0:8443 \
    SMKI_LISTENERS__LODGE=0.0.0.0:8444 SMKI_LISTENERS__LDAP=0.0.0.0:3890 \
    SMKI_LISTENERS__LDAPS=0.0.0.0:6360 SMKI_LISTENERS__SFTP=0.0.0.0:2222

# tini: PID 1 that reaps the embedded PostgreSQL's children and passes signals on
RUN apt-get update && apt-get install -y --no-install-recommends curl openssl tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/smki --uid 10001 smki \
    && install -d -o smki -g smki /pki /var/lib/smki/extracts
# /pki (a test PKI) and the extracts directory are owned by smki so that a named volume
# mounted there starts writable by it (docker-compose.yml shares both between containers)

WORKDIR /opt/smki-repository
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY repository_server ./repository_server
COPY conf ./conf
# gcc only while installing: it builds the LDAP short way's C loop (ldap/_hot.c), which the
# build then insists on; Python's headers from Debian when the base image has none
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
         || apt-get install -y --no-install-recommends python3-dev; } \
    && python3 -m venv /opt/venv && /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c 'import repository_server.listeners.ldap._hot' \
    && apt-get purge -y --auto-remove gcc libc6-dev python3-dev >/dev/null \
    && rm -rf /var/lib/apt/lists/* && smki-repository --version

USER smki
# The data directory (embedded PostgreSQL, replica, demo PKI, extracts): keep it in a volume.
VOLUME /var/lib/smki
EXPOSE 8083 8443 8444 3890 6360 2222
# follows the configured http (or https) listener: SMKI_LISTENERS__HTTP, or the config file
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-m", "repository_server.healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "smki-repository"]
# `serve` needs the TLS files and DCC client CA under /var/lib/smki/pki (mount them, or set
# SMKI_TLS__CERT / SMKI_LODGE__CLIENT_CA ...); `demo` generates a test PKI and lodges it.
CMD ["serve", "--config", "/opt/smki-repository/conf/repository.toml"]
