"""Names as the repository shows them: the RFC 4514 rendering of an issuer or subject,
cached by its DER, with a fallback rendering of our own for attribute values that
`cryptography` refuses to render, and the decoding of the ASN.1 string types.
"""

from __future__ import annotations

import re

from cryptography import x509

from repository_server.pki.structure import name_attributes

__all__ = ["cached_name", "decode_string", "render_name"]


def decode_string(tag: int, content: bytes) -> str | None:
    if tag == 0x1E:
        return content.decode("utf-16-be", "replace")
    if tag == 0x1C:
        return content.decode("utf-32-be", "replace")
    if tag in (0x13, 0x16):
        return content.decode("ascii", "replace")
    if tag == 0x14:
        return content.decode("latin-1")
    if tag == 0x0C:
        return content.decode("utf-8", "replace")
    return None


_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
}


def _fallback_name(attrs: list[tuple[str, int, bytes]]) -> str:
    """An RFC 4514-like rendering that cannot fail (multi-valued RDNs are flattened)."""
    parts: list[str] = []
    for oid, tag, content in reversed(attrs):
        text = decode_string(tag, content)
        if text is None:
            value = "#" + content.hex()
        else:
            value = re.sub(r'([,+"\\<>;=])', r"\\\1", text)
            value = "".join(ch if ch.isprintable() else f"\\{ord(ch):02x}" for ch in value)
        parts.append(f"{_SHORT_NAMES.get(oid, oid)}={value}")
    return ",".join(parts)


_NAME_CACHE: dict[bytes, tuple[list[tuple[str, int, bytes]], str]] = {}
_NAME_CACHE_MAX = 4096


def cached_name(dn: bytes, cert: x509.Certificate, which: str) -> tuple[list[tuple[str, int, bytes]], str]:
    """Attributes and RFC 4514 rendering of a Name, cached by its DER: every device
    certificate of an issuer repeats the same issuer (and the same empty subject), and
    rendering through cryptography's Name objects cost ~15 us a certificate."""
    hit = _NAME_CACHE.get(dn)
    if hit is not None:
        return hit
    attrs = name_attributes(dn)
    rendered = render_name(cert.issuer if which == "issuer" else cert.subject, attrs)
    if len(_NAME_CACHE) < _NAME_CACHE_MAX:
        _NAME_CACHE[dn] = (attrs, rendered)
    return attrs, rendered


def render_name(name: x509.Name, attrs: list[tuple[str, int, bytes]]) -> str:
    try:
        return name.rfc4514_string()
    except Exception:  # odd attribute values: fall back to our own rendering
        return _fallback_name(attrs)

