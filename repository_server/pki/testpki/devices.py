"""Device certificates, the bulk of a test PKI, made in a process pool from a TBS template
per usage (see below); keys are generated in the workers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import multiprocessing
from collections.abc import Generator
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from repository_server.pki.der import encode_length
from repository_server.pki.ids import format_eui64, serial_to_hex
from repository_server.pki.testpki.builders import SHA256, USAGE_KU, device_builder, load_ec_key, new_key
from repository_server.pki.testpki.identifiers import device_eui64, key_identifier, serial_number

__all__ = ["DeviceMeta", "device_chunks", "run_device_chunks"]

_MAX_CHUNK = 1000  # devices per work item (2,000 certificates)

# --- device certificates (process pool) --------------------------------------------------------
#
# Device certificates are the bulk, so they are not run through CertificateBuilder one by one
# (~120 us each). Instead each worker builds one certificate per usage with CertificateBuilder
# from dummy values, splits its TBSCertificate DER at the four fields that vary (serial, public
# key point, SKI, hwSerialNum: all fixed length, so no DER length changes), and fills the gaps
# for every device; only the ECDSA signature is computed per certificate. The initializer
# checks the template against CertificateBuilder for a second set of values, so the output is
# byte-for-byte what CertificateBuilder would have written.

_ECDSA_SHA256 = ec.ECDSA(SHA256)
_SIG_ALG_DER = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256, no parameters



def _point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _split_template(tbs: bytes, fields: list[bytes]) -> list[bytes]:
    """Cut ``tbs`` around each of ``fields`` (in order, each occurring exactly once)."""
    parts: list[bytes] = []
    pos = 0
    for field in fields:
        if tbs.count(field) != 1:
            raise RuntimeError("device certificate template: field not unique in TBS")
        at = tbs.index(field, pos)
        parts.append(tbs[pos:at])
        pos = at + len(field)
    parts.append(tbs[pos:])
    return parts


def _fill(parts: list[bytes], values: tuple[bytes, ...]) -> bytes:
    out = bytearray(parts[0])
    for value, part in zip(values, parts[1:], strict=True):
        out += value
        out += part
    return bytes(out)


def _pem_from_der(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    body = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"\n-----END CERTIFICATE-----\n"


@dataclass
class _DeviceIssuer:
    key: ec.EllipticCurvePrivateKey
    seed: int
    templates: dict[str, list[bytes]]  # usage -> TBS pieces around serial, point, SKI, EUI


_DEVICE_ISSUER: _DeviceIssuer | None = None

DeviceMeta = tuple[str, str, str, str]  # serial hex, subject key id hex, EUI-64, usage


def _device_values(
    serial: int, public_key: ec.EllipticCurvePublicKey, eui: bytes
) -> tuple[bytes, bytes, bytes, bytes]:
    point = _point(public_key)
    return serial.to_bytes(16, "big"), point, key_identifier(public_key), eui


def _init_device_worker(
    issuer_key_pem: bytes, issuer_cert_der: bytes, seed: int, not_before_ts: float
) -> None:
    """Pool initializer: load the Issuing DCA key once and build the TBS templates."""
    global _DEVICE_ISSUER
    key = load_ec_key(issuer_key_pem)
    subject = x509.load_der_x509_certificate(issuer_cert_der).subject
    not_before = dt.datetime.fromtimestamp(not_before_ts, dt.UTC)
    key_id = key_identifier(key.public_key())
    templates: dict[str, list[bytes]] = {}
    samples = [
        (0x5A3C_9669_0FF0_C33C_A55A_1E2D_3C4B_5A69, bytes.fromhex("A55AC33C96690FF0")),
        (0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321, bytes.fromhex("00DB12F00DCAFE42")),
    ]
    for usage in USAGE_KU:
        keys = [new_key().public_key() for _ in samples]
        tbs = [
            device_builder(subject, not_before, usage, serial, pub, eui, key_id)
            .sign(key, SHA256)
            .tbs_certificate_bytes
            for (serial, eui), pub in zip(samples, keys, strict=True)
        ]
        parts = _split_template(tbs[0], list(_device_values(samples[0][0], keys[0], samples[0][1])))
        if _fill(parts, _device_values(samples[1][0], keys[1], samples[1][1])) != tbs[1]:
            raise RuntimeError("device certificate template does not reproduce the builder")
        templates[usage] = parts
    _DEVICE_ISSUER = _DeviceIssuer(key=key, seed=seed, templates=templates)


def _device_chunk(bounds: tuple[int, int]) -> tuple[list[bytes], list[DeviceMeta]]:
    """Make the DS and KA certificates of devices ``start..stop-1`` (PEM, in that order)."""
    st = _DEVICE_ISSUER
    if st is None:
        raise RuntimeError("device worker not initialised")
    pems: list[bytes] = []
    meta: list[DeviceMeta] = []
    sign = st.key.sign
    start, stop = bounds
    for i in range(start, stop):
        eui = device_eui64(st.seed, i)
        eui_text = format_eui64(eui)
        for usage in ("DS", "KA"):
            serial = serial_number(st.seed, "device", i, usage)
            values = _device_values(serial, new_key().public_key(), eui)
            tbs = _fill(st.templates[usage], values)
            sig = sign(tbs, _ECDSA_SHA256)
            body = tbs + _SIG_ALG_DER + b"\x03" + encode_length(len(sig) + 1) + b"\x00" + sig
            pems.append(_pem_from_der(b"\x30" + encode_length(len(body)) + body))
            meta.append((serial_to_hex(serial), values[2].hex().upper(), eui_text, usage))
    return pems, meta


def device_chunks(devices: int, workers: int) -> list[tuple[int, int]]:
    # several chunks per worker so progress moves and the pool stays balanced
    size = max(1, min(_MAX_CHUNK, -(-devices // max(1, workers * 4))))
    return [(lo, min(lo + size, devices)) for lo in range(0, devices, size)]


def run_device_chunks(
    chunks: list[tuple[int, int]], workers: int, initargs: tuple[bytes, bytes, int, float]
) -> Generator[tuple[list[bytes], list[DeviceMeta]], None, None]:
    if workers <= 1 or len(chunks) <= 1:
        _init_device_worker(*initargs)
        for c in chunks:
            yield _device_chunk(c)
        return
    # spawn: safe whatever threads the caller runs (fork would copy their locks)
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(chunks)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_device_worker,
        initargs=initargs,
    )
    try:
        yield from pool.map(_device_chunk, chunks)
    finally:  # on an error or interrupt, drop the queued chunks instead of finishing them
        pool.shutdown(wait=True, cancel_futures=True)
