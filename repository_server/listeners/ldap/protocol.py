"""The typed model of the LDAP codec (RFC 4511): requests, search filters, controls,
result codes, the limits the decoder enforces, and `ProtocolError`. Plain frozen values with
no behaviour, so the directory and the server can match on them without knowing BER.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_PDU",
    "MAX_INT",
    "NOTICE_OF_DISCONNECTION_OID",
    "PAGED_RESULTS_OID",
    "STARTTLS_OID",
    "AbandonRequest",
    "AddRequest",
    "And",
    "ApproxMatch",
    "AttributeValueAssertion",
    "BindRequest",
    "CompareRequest",
    "Control",
    "DelRequest",
    "EqualityMatch",
    "ExtendedRequest",
    "ExtensibleMatch",
    "Filter",
    "GreaterOrEqual",
    "LessOrEqual",
    "ModDNRequest",
    "ModifyRequest",
    "Not",
    "Or",
    "Present",
    "ProtocolError",
    "Request",
    "ResultCode",
    "SearchRequest",
    "Substrings",
    "UnbindRequest",
]

MAX_INT = 2**31 - 1  # RFC 4511 maxInt
DEFAULT_MAX_PDU = 1 << 20
DEFAULT_MAX_DEPTH = 32
NOTICE_OF_DISCONNECTION_OID = "1.3.6.1.4.1.1466.20036"
STARTTLS_OID = "1.3.6.1.4.1.1466.20037"
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"


class ResultCode(IntEnum):
    SUCCESS = 0
    OPERATIONS_ERROR = 1
    PROTOCOL_ERROR = 2
    TIME_LIMIT_EXCEEDED = 3
    SIZE_LIMIT_EXCEEDED = 4
    COMPARE_FALSE = 5
    COMPARE_TRUE = 6
    AUTH_METHOD_NOT_SUPPORTED = 7
    STRONGER_AUTH_REQUIRED = 8
    ADMIN_LIMIT_EXCEEDED = 11
    UNAVAILABLE_CRITICAL_EXTENSION = 12
    CONFIDENTIALITY_REQUIRED = 13
    NO_SUCH_ATTRIBUTE = 16
    NO_SUCH_OBJECT = 32
    INVALID_DN_SYNTAX = 34
    UNDEFINED_ATTRIBUTE_TYPE = 17
    INAPPROPRIATE_MATCHING = 18
    INVALID_ATTRIBUTE_SYNTAX = 21
    INAPPROPRIATE_AUTHENTICATION = 48
    INVALID_CREDENTIALS = 49
    INSUFFICIENT_ACCESS_RIGHTS = 50
    BUSY = 51
    UNAVAILABLE = 52
    UNWILLING_TO_PERFORM = 53
    OTHER = 80


class ProtocolError(Exception):
    """Malformed, oversized or unsupported input.  ``message_id`` is the LDAPMessage id when
    it could be decoded (so a per-operation error response is possible), else None."""

    def __init__(self, message_id: int | None, reason: str) -> None:
        super().__init__(f"message {message_id}: {reason}" if message_id is not None else reason)
        self.message_id = message_id
        self.reason = reason



@dataclass(frozen=True, slots=True)
class Control:
    oid: str
    critical: bool = False
    value: bytes | None = None


@dataclass(frozen=True, slots=True)
class And:
    filters: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Or:
    filters: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Not:
    filter: Filter


@dataclass(frozen=True, slots=True)
class AttributeValueAssertion:
    """RFC 4511 AttributeValueAssertion; the subclasses say which comparison it is."""

    attribute: str
    value: bytes


class EqualityMatch(AttributeValueAssertion):
    __slots__ = ()


class GreaterOrEqual(AttributeValueAssertion):
    __slots__ = ()


class LessOrEqual(AttributeValueAssertion):
    __slots__ = ()


class ApproxMatch(AttributeValueAssertion):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Substrings:
    attribute: str
    initial: bytes | None
    any: tuple[bytes, ...]
    final: bytes | None


@dataclass(frozen=True, slots=True)
class Present:
    attribute: str


@dataclass(frozen=True, slots=True)
class ExtensibleMatch:
    matching_rule: str | None
    type: str | None
    value: bytes
    dn_attributes: bool = False


Filter = (And | Or | Not | EqualityMatch | Substrings | GreaterOrEqual | LessOrEqual | Present
          | ApproxMatch | ExtensibleMatch)


@dataclass(frozen=True, slots=True)
class BindRequest:
    message_id: int
    version: int
    name: str
    password: bytes | None = None  # simple bind (b"" = anonymous / unauthenticated)
    sasl_mechanism: str | None = None
    sasl_credentials: bytes | None = None
    controls: tuple[Control, ...] = ()

    @property
    def is_simple(self) -> bool:
        return self.password is not None

    @property
    def is_anonymous(self) -> bool:
        return self.password == b"" and self.name == ""


@dataclass(frozen=True, slots=True)
class UnbindRequest:
    message_id: int
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchRequest:
    message_id: int
    base: str
    scope: int  # 0 base, 1 one level, 2 subtree, 3 subordinate subtree (others: protocolError)
    deref: int
    size_limit: int
    time_limit: int
    types_only: bool
    filter: Filter
    attributes: tuple[str, ...]
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class AbandonRequest:
    message_id: int
    abandon_id: int
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class ExtendedRequest:
    message_id: int
    oid: str
    value: bytes | None = None
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class CompareRequest:
    message_id: int
    entry: str
    attribute: str
    value: bytes
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class _UpdateRequest:
    """An update operation, decoded only far enough to refuse it (e.g. unwillingToPerform)."""

    op: ClassVar[str] = ""
    response_tag: ClassVar[int] = 0  # APPLICATION number of the matching response
    message_id: int
    dn: str
    controls: tuple[Control, ...] = ()


@dataclass(frozen=True, slots=True)
class ModifyRequest(_UpdateRequest):
    op: ClassVar[str] = "modify"
    response_tag: ClassVar[int] = 7


@dataclass(frozen=True, slots=True)
class AddRequest(_UpdateRequest):
    op: ClassVar[str] = "add"
    response_tag: ClassVar[int] = 9


@dataclass(frozen=True, slots=True)
class DelRequest(_UpdateRequest):
    op: ClassVar[str] = "delete"
    response_tag: ClassVar[int] = 11


@dataclass(frozen=True, slots=True)
class ModDNRequest(_UpdateRequest):
    op: ClassVar[str] = "moddn"
    response_tag: ClassVar[int] = 13


Request = (BindRequest | UnbindRequest | SearchRequest | AbandonRequest | ExtendedRequest
           | CompareRequest | ModifyRequest | AddRequest | DelRequest | ModDNRequest)
