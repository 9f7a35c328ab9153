"""The one error the PKI parsers raise: input that is not a parseable certificate or CRL.

Callers (lodging, the portal, the lodging client) catch `ParseError` alone; a malformed
TLV found by the shared reader (`pki.der.TlvError`) becomes one at the public functions'
boundary, with the "DER: " prefix every structural message carries.
"""

from __future__ import annotations

from repository_server.pki.der import TlvError

__all__ = ["ParseError", "der_error", "one_line"]


class ParseError(ValueError):
    """The input is not a parseable certificate or CRL (or PEM/DER container of one)."""


def one_line(text: object) -> str:
    """`text` on one line of at most 300 characters (for messages and findings)."""
    return " ".join(str(text).split())[:300]


def der_error(exc: TlvError) -> ParseError:
    """The `ParseError` for a malformed TLV."""
    return ParseError(f"DER: {exc}")
