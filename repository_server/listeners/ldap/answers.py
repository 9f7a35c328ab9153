"""What a search answers with, before and after encoding: the attributes it asked for
(`Selection`), how it ended (`Outcome`), and answers kept pre-encoded (`ResponseCache`).
No I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from repository_server.listeners.ldap import protocol
from repository_server.listeners.ldap.filters import Entry
from repository_server.listeners.ldap.matching import selected_keys
from repository_server.listeners.ldap.schema import SCHEMA, AttributeType

# an answer is cached only when it is this small (entries, bytes)
CACHEABLE_ENTRIES = 16
CACHEABLE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Selection:
    """Which attributes a search asked for (RFC 4511 §4.5.1.8)."""

    all_user: bool
    all_operational: bool
    named: frozenset[str]  # canonical lower-case keys

    @classmethod
    def parse(cls, attributes: tuple[str, ...]) -> Selection:
        if not attributes:
            return cls(True, False, frozenset())
        named: set[str] = set()
        for a in attributes:
            if a not in ("*", "+", "1.1"):  # a type covers its subtypes; a tagged one nothing
                named.update(selected_keys(a))
        return cls("*" in attributes, "+" in attributes, frozenset(named))

    def pick(self, entry: Entry, types_only: bool) -> list[tuple[str, list[bytes]]]:
        out = []
        for key, values in entry.attrs.items():
            attr = SELECTABLE.get(key)
            if attr is None:
                continue
            if key in self.named or (self.all_operational if attr.operational else self.all_user):
                out.append((attr.wire_name, [] if types_only else values))
        return out


# the schema's attribute types by canonical key (what an entry's attributes are keyed by)
SELECTABLE: dict[str, AttributeType] = {a.key: a for a in SCHEMA.attributes}


@dataclass(slots=True)
class Outcome:
    """How a search ended, and what it holds back for the final write."""

    code: int
    message: str = ""
    matched: str = ""
    controls: tuple[protocol.Control, ...] = ()
    sent: int = 0
    held: list[bytes] = field(default_factory=list)  # entry ops not written yet
    cache_until: float | None = None  # set while the answer may go into the response cache


class ResponseCache:
    """Pre-encoded answers to searches, keyed by the request's bytes after its message id, one
    map per access level (anonymous, or allowed to see device entries); LRU, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.maps: tuple[OrderedDict[bytes, tuple[tuple[bytes, ...], float]], ...] = (
            OrderedDict(), OrderedDict())
        self.hits = 0

    def clear(self) -> None:
        for m in self.maps:
            m.clear()
        self.bytes = 0

    @staticmethod
    def _size(key: bytes, ops: tuple[bytes, ...]) -> int:
        return len(key) + sum(len(o) for o in ops) + 200

    def put(self, private: bool, key: bytes, ops: tuple[bytes, ...], valid_until: float) -> None:
        size = self._size(key, ops)
        if size > self.max_bytes // 8:
            return
        target = self.maps[private]
        old = target.pop(key, None)
        if old is not None:
            self.bytes -= self._size(key, old[0])
        target[key] = (ops, valid_until)
        self.bytes += size
        while self.bytes > self.max_bytes:
            victim = max(self.maps, key=len)
            k, (o, _) = victim.popitem(last=False)
            self.bytes -= self._size(k, o)
