"""Deterministic identifiers of a test PKI: serials, device and organisation EUI-64s (a
seed-keyed bijection, so distinct indexes never collide) and RFC 5280 key identifiers.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["device_eui64", "key_identifier", "organisation_eui64", "seed_digest", "serial_number"]

_DEVICE_EUI_PREFIX = bytes.fromhex("00DB12")  # + 40 bits
_ORG_EUI_PREFIX = bytes.fromhex("90B3D51F30")  # + 24 bits


def seed_digest(seed: int, *parts: object) -> bytes:
    h = hashlib.blake2b(str(seed).encode(), digest_size=32)
    for part in parts:
        h.update(b"\x1f" + str(part).encode())
    return h.digest()


def serial_number(seed: int, *parts: object) -> int:
    """A 16-octet positive serial: top bit clear, first octet non-zero (so DER keeps 16)."""
    d = bytearray(seed_digest(seed, "serial", *parts)[:16])
    d[0] &= 0x7F
    if d[0] == 0:
        d[0] = 0x01
    return int.from_bytes(d, "big")


def _permute(i: int, bits: int, seed: int, tag: str) -> int:
    """A seed-keyed bijection on [0, 2**bits): distinct inputs give distinct outputs."""
    if not 0 <= i < 1 << bits:
        raise ValueError(f"index {i} out of range for {bits}-bit identifiers")
    mask = (1 << bits) - 1
    k = seed_digest(seed, "permute", tag)
    a = int.from_bytes(k[0:8], "big") | 1  # odd multipliers are bijections mod 2**bits
    b = int.from_bytes(k[8:16], "big")
    c = int.from_bytes(k[16:24], "big") | 1
    x = (i * a + b) & mask
    x ^= x >> (bits // 2)  # xorshift right is a bijection
    x = (x * c) & mask
    x ^= x >> (bits // 3 + 1)
    return x


def device_eui64(seed: int, index: int) -> bytes:
    """EUI-64 of device ``index``: ``00-DB-12-xx-xx-xx-xx-xx``, distinct per index."""
    return _DEVICE_EUI_PREFIX + _permute(index, 40, seed, "device").to_bytes(5, "big")


def organisation_eui64(seed: int, entity: int) -> bytes:
    """EUI-64 of organisation entity ``entity``: ``90-B3-D5-1F-30-xx-xx-xx``, distinct."""
    return _ORG_EUI_PREFIX + _permute(entity, 24, seed, "organisation").to_bytes(3, "big")


def key_identifier(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """RFC 5280 §4.2.1.2 method 2: ``0100`` then the low 60 bits of SHA-1 of the key bits.

    This is how the real ZAZ1 / RTDS key identifiers were made (checked against realdata).
    """
    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    h = hashlib.sha1(point).digest()[-8:]
    return bytes([0x40 | (h[0] & 0x0F)]) + h[1:]
