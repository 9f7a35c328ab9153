"""ldap/fastpath.py `Shapes`: a learnt request shape matches the same request with another
EUI-64 of the same length, nothing else, and the memo stays bounded however many distinct
shapes clients send (pure: no server)."""

from __future__ import annotations

from typing import Any

from repository_server.listeners.ldap.fastpath import MAX_SHAPES, Shapes

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
