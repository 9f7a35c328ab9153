#!/usr/bin/env bash
# Builds both images (Dockerfile, loadtest/Dockerfile) with no container registry and
# smoke-tests them with --network none:
#   * a private dockerd (its own data root, exec root and socket; no iptables, no bridge, no
#     IP forwarding: the host's firewall and sysctls stay as they were), stopped by pid at the end;
#   * a Debian bookworm base from debootstrap (Debian's mirror is reachable) and a stand-in for
#     python:3.11-slim on it (Debian's python3 3.11, with the host's locally added CA
#     certificates so pip trusts what the host trusts), passed as PYTHON_IMAGE;
#   * `docker run … demo` must become healthy by the image's own HEALTHCHECK, answer /readyz,
#     and serve a certificate byte for byte as the demo PKI has it; `locust --version` in the
#     load-test image.
# Needs root (dockerd) and docker.io + debootstrap (installed when missing and apt works).
# Skipped with one line when they cannot be had; any failure after that fails the script.
# DOCKER_SMOKE_WORK (default /var/tmp/smki-docker-smoke) keeps the base image between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "docker-smoke: $*"; }

if [ "$(id -u)" != 0 ]; then say "skipped: needs root to run its own dockerd"; exit 0; fi
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         docker.io debootstrap >/dev/null; }; then
    say "skipped: docker.io and debootstrap cannot be installed here"; exit 0
  fi
fi

WORK=${DOCKER_SMOKE_WORK:-/var/tmp/smki-docker-smoke}
mkdir -p "$WORK"
SOCK="$WORK/docker.sock"
export DOCKER_HOST="unix://$SOCK"
started=$(date +%s)

dockerd --iptables=false --ip6tables=false --ip-forward=false --bridge=none \
  --data-root "$WORK/data" --exec-root "$WORK/exec" -H "$DOCKER_HOST" \
  --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
DOCKERD=$!
cleanup() {
  docker rm -f smki-smoke >/dev/null 2>&1 || true
  kill "$DOCKERD" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$DOCKERD" 2>/dev/null || break; sleep 1; done
  kill -9 "$DOCKERD" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
if ! docker info >/dev/null 2>&1; then
  tail -20 "$WORK/dockerd.log"
  say "skipped: dockerd does not start on this machine (its log is above)"; exit 0
fi
say "dockerd up ($(docker version --format '{{.Server.Version}}'))"

if ! docker image inspect smki-ci/debian:bookworm >/dev/null 2>&1; then
  say "debootstrap bookworm (minbase)"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$WORK/rootfs" -c . | docker import - smki-ci/debian:bookworm >/dev/null
  rm -rf "$WORK/rootfs"
fi

build() {  # docker build, quiet unless it fails (the legacy builder's notice is noise)
  docker build -q --network host "$@" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
}

say "stand-in python:3.11-slim"
BASE="$WORK/python-standin"
rm -rf "$BASE" && mkdir -p "$BASE/ca"
cp /usr/local/share/ca-certificates/*.crt "$BASE/ca/" 2>/dev/null || true
cat >"$BASE/Dockerfile" <<'DOCKERFILE'
FROM smki-ci/debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      ca-certificates && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null && ln -sf /usr/bin/python3 /usr/local/bin/python
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
DOCKERFILE
build -t smki-ci/python:3.11 "$BASE"

say "building smki-repository and smki-loadtest"
build --build-arg PYTHON_IMAGE=smki-ci/python:3.11 -t smki-repository:ci .
build --build-arg PYTHON_IMAGE=smki-ci/python:3.11 -t smki-loadtest:ci -f loadtest/Dockerfile .

say "demo in a container with --network none"
docker rm -f smki-smoke >/dev/null 2>&1 || true
docker run -d --name smki-smoke --network none smki-repository:ci demo --devices 3 \
  --organisations 2 >/dev/null
status=starting
for _ in $(seq 1 120); do
  status=$(docker inspect --format '{{.State.Health.Status}}' smki-smoke)
  [ "$status" = healthy ] && break
  [ "$(docker inspect --format '{{.State.Running}}' smki-smoke)" = true ] || break
  sleep 2
done
if [ "$status" != healthy ]; then
  docker logs --tail 40 smki-smoke; say "FAILED: the demo did not become healthy ($status)"; exit 1
fi
docker exec smki-smoke curl -fsS http://127.0.0.1:8083/readyz >/dev/null
# a device certificate, byte for byte as the demo's PKI has it (its bundle and position come
# from the PKI's device index; the demo user dcc-boxed has DCC Boxed's published key)
docker exec smki-smoke python3 - <<'PY'
import csv, subprocess, sys
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
pki = "/var/lib/smki/pki"
row = next(csv.DictReader(open(f"{pki}/devices/index.csv")))
want = x509.load_pem_x509_certificates(open(f"{pki}/{row['path']}", "rb").read())[
    int(row["index"])].public_bytes(Encoding.DER)
got = subprocess.run(["curl", "-fsS", "-H", "X-API-Key: u3bg9gt38htd0j2",
                      f"http://127.0.0.1:8083/certificates/{row['serial']}"],
                     capture_output=True, check=True).stdout
sys.exit(0 if got == want else f"certificate {row['serial']}: {len(got)} bytes differ from the PKI's")
PY
# every listener binds every address in the container (so a published port reaches it)
docker exec smki-smoke python3 - <<'PY'
import sys
listening = {int(line.split()[1].split(":")[1], 16) for line in open("/proc/net/tcp").readlines()[1:]
             if line.split()[3] == "0A" and line.split()[1].startswith("00000000:")}
missing = {8083, 8443, 8444, 3890, 6360, 2222} - listening
sys.exit(f"not listening on 0.0.0.0: {sorted(missing)}" if missing else 0)
PY
docker run --rm --network none smki-loadtest:ci --version
say "passed in $(( $(date +%s) - started )) s"
