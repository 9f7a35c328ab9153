"""ldap/fastpath.py `Shapes`: a learnt request shape matches the same request with another
EUI-64 of the same length, nothing else, and the memo stays bounded however many distinct
shapes clients send; the written EUI-64 is read as the general rule reads it (pure: no
server)."""

from __future__ import annotations

import random
from typing import Any

from repository_server.listeners.ldap.fastpath import _EUI_NORM, MAX_SHAPES, Shapes, _eui64

EUI = b"00-DB-12-34-56-78-90-A4"
OTHER = b"00-DB-12-34-56-78-90-B7"


def _request(value: bytes, tail: bytes = b"KA") -> bytes:
    """Bytes shaped like a search's after its message id: a prefix, the value, a suffix."""
    return b"\x63\x40\x04\x11ou=Devices,o=SMKI\x0a\x01\x02\x04" + bytes([len(value)]) + value \
        + b"\x04\x02" + tail


def test_a_learnt_shape_matches_another_eui_and_nothing_else() -> None:
    shapes = Shapes()
    query: Any = object()
    shapes.learn(_request(EUI), EUI, query)
    assert shapes.match(_request(OTHER)) == (query, OTHER)
    assert shapes.match(_request(EUI, b"DS")) is None  # another rest of the filter
    assert shapes.match(_request(EUI[:-1])) is None  # another length
    shapes.learn(_request(b"DS", b"DS"), b"DS", object())  # the value twice: not learnt
    assert shapes.count == 1


def test_the_memo_is_bounded_and_keeps_learning() -> None:
    shapes = Shapes()
    queries = []
    for i in range(5 * MAX_SHAPES):
        queries.append(object())
        shapes.learn(_request(EUI, b"%04d" % i), EUI, queries[-1])
        assert shapes.count <= MAX_SHAPES
    last = 5 * MAX_SHAPES - 1
    assert shapes.match(_request(OTHER, b"%04d" % last)) == (queries[last], OTHER)
    assert shapes.match(_request(OTHER, b"0000")) is None  # forgotten when the memo restarted


def test_the_written_eui64_parses_as_the_equality_rule_does() -> None:
    """fastpath._eui64 reads `00-DB-12-...` itself: for every damaged spelling it gives what
    smkiEui64's general normaliser gives (8 octets, or nothing)."""
    rng = random.Random(5)
    spellings = [EUI, EUI.lower(), EUI.replace(b"-", b":"), EUI.replace(b"-", b""), b" " + EUI,
                 EUI + b"\n", b"0" + EUI[1:-1]]
    for _ in range(20000):
        damaged = bytearray(EUI)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(len(damaged))] = rng.choice(b" -:0aGf\t\n\xff\x00")
        spellings.append(bytes(damaged))
    parsed = 0
    for value in spellings:
        general = _EUI_NORM(value)
        assert _eui64(value) == (general if isinstance(general, bytes) and len(general) == 8
                                 else None), value
        parsed += _eui64(value) is not None
    assert 1000 < parsed < len(spellings) - 1000  # both outcomes are tried often
