"""Change events: what a write to the store changed, as typed values, and their one text
form (the payload of PostgreSQL's NOTIFY on `CHANNEL`).

Every write that changes what readers see sends its events inside its transaction (so
listeners on every process and node hear of them at commit, never before); the catalog
decodes them and calls its subscribers, keyed by the event's `kind`, with the event's `key`.
The lodging path also hands the events it caused to its own process's catalog at once (see
`LODGED`), which then delivers each once (`Echoes`).

Pure: no I/O. The text form is `kind:key`, as read by every process sharing the store, so
it must stay stable (a payload is at most 8,000 bytes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Self

CHANNEL = "smki_changes"


class EventError(ValueError):
    """A payload that is not an event (unknown kind, or a malformed key)."""


@dataclass(frozen=True, slots=True)
class CertificatesLodged:
    """New certificates took ids in (lo, hi] (a superset of the batch's, harmlessly)."""

    kind: ClassVar[str] = "certs"
    lo: int
    hi: int

    @property
    def key(self) -> str:
        return f"{self.lo}:{self.hi}"

    @classmethod
    def parse(cls, key: str) -> CertificatesLodged:
        lo, hi = key.split(":")
        return cls(int(lo), int(hi))


@dataclass(frozen=True, slots=True)
class SerialsShared:
    """These serials are now held by certificates of more than one issuer."""

    kind: ClassVar[str] = "serials"
    serials: tuple[str, ...]

    @property
    def key(self) -> str:
        return ",".join(self.serials)

    @classmethod
    def parse(cls, key: str) -> SerialsShared:
        serials = tuple(key.split(","))
        if not all(serials):
            raise ValueError("empty serial")
        return cls(serials)


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """A certificate's lodged status or manufacturing flag changed (eui64: its subject's)."""

    kind: ClassVar[str] = "status"
    serial: str
    eui64: bytes | None

    @property
    def key(self) -> str:
        return f"{self.serial}:{self.eui64.hex() if self.eui64 else ''}"

    @classmethod
    def parse(cls, key: str) -> StatusChanged:
        serial, eui = key.split(":")
        if not serial:
            raise ValueError("empty serial")
        return cls(serial, bytes.fromhex(eui) if eui else None)


@dataclass(frozen=True, slots=True)
class CrlLodged:
    """A new CRL/ARL version of this issuer (by its key identifier)."""

    kind: ClassVar[str] = "crl"
    issuer_key_id: bytes

    @property
    def key(self) -> str:
        return self.issuer_key_id.hex()

    @classmethod
    def parse(cls, key: str) -> CrlLodged:
        return cls(bytes.fromhex(key))


@dataclass(frozen=True, slots=True)
class _Named:
    """An event about one named object: its key is the name."""

    name: str

    @property
    def key(self) -> str:
        return self.name

    @classmethod
    def parse(cls, key: str) -> Self:
        if not key:
            raise ValueError("empty name")
        return cls(key)


@dataclass(frozen=True, slots=True)
class DocumentLodged(_Named):
    """A new version of the document with this name."""

    kind: ClassVar[str] = "doc"


@dataclass(frozen=True, slots=True)
class UserChanged(_Named):
    """A user was added or changed (keys, password, role, disabled...)."""

    kind: ClassVar[str] = "users"


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """A portal session (by its token's SHA-256) was signed out or expired."""

    kind: ClassVar[str] = "portal-session"
    token_sha256: bytes

    @property
    def key(self) -> str:
        return self.token_sha256.hex()

    @classmethod
    def parse(cls, key: str) -> SessionEnded:
        return cls(bytes.fromhex(key))


Event = (CertificatesLodged | SerialsShared | StatusChanged | CrlLodged | DocumentLodged
         | UserChanged | SessionEnded)
EventType = (type[CertificatesLodged] | type[SerialsShared] | type[StatusChanged]
             | type[CrlLodged] | type[DocumentLodged] | type[UserChanged] | type[SessionEnded])

TYPES: dict[str, EventType] = {t.kind: t for t in (
    CertificatesLodged, SerialsShared, StatusChanged, CrlLodged, DocumentLodged, UserChanged,
    SessionEnded)}

# What the lodging path writes: it hands these to its own process's catalog as soon as they
# are committed, so that process skips their NOTIFY when its own connections sent it.
LODGED: tuple[EventType, ...] = (CertificatesLodged, SerialsShared, StatusChanged, CrlLodged,
                                 DocumentLodged)


def encode(event: Event) -> str:
    """The NOTIFY payload of an event."""
    return f"{event.kind}:{event.key}"


def decode(payload: str) -> Event:
    """The event a NOTIFY payload names. Raises EventError for an unknown kind or a key
    that does not fit it."""
    kind, sep, key = payload.partition(":")
    event_type = TYPES.get(kind)
    if event_type is None or not sep:
        raise EventError(f"not a change event: {payload[:100]!r}")
    try:
        return event_type.parse(key)
    except ValueError as exc:
        raise EventError(f"malformed {kind} event {payload[:100]!r}: {exc}") from None


class Echoes:
    """This process's own lodged events come to its catalog twice: handed over at commit
    (`local`) and as their NOTIFY from one of its own connections (`echo`), in either
    order. Each says whether to deliver: the first of the two is, the second is not. An
    entry whose twin never comes (LISTEN was down; a write outside the lodging path) is
    dropped by `forget` (LISTEN re-established) or when too many are kept: at worst an
    event is delivered twice, or once when its NOTIFY arrives."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._local: Counter[str] = Counter()
        self._echoed: Counter[str] = Counter()

    def local(self, payload: str) -> bool:
        return self._first(payload, self._local, self._echoed)

    def echo(self, payload: str) -> bool:
        return self._first(payload, self._echoed, self._local)

    def forget(self) -> None:
        self._local.clear()
        self._echoed.clear()

    def _first(self, payload: str, mine: Counter[str], twins: Counter[str]) -> bool:
        if twins[payload] > 0:
            twins[payload] -= 1
            if not twins[payload]:
                del twins[payload]
            return False
        if len(mine) >= self.LIMIT:
            mine.clear()
        mine[payload] += 1
        return True
