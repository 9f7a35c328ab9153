"""ldap/_hot.c, the LDAP short way's innermost loops in C, against the Python it stands in for:
the same answer for every input (property tests over real request encodings, mutated and random
bytes, and certificate records of every size of length field), and None, never a crash, for
anything it does not take. End to end, tests/test_ldap_fastpath.py asks servers with and without
it the same searches and wants the same bytes."""

from __future__ import annotations

import os
import random
import struct
import subprocess

import ldap3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldap3.operation.search import search_operation

from repository_server.config import Ldap
from repository_server.listeners.ldap import codec, responses
from repository_server.listeners.ldap.fastpath import HOT, SUCCESS_DONE, Shapes, _eui64
from repository_server.readmodel import records
from tests.conftest import cli_env, smki_cli
from tests.ldaptools import pdu

# CI builds it (setup.py, with the compiler .ci/run has): there it must be there, or the
# server's commonest search would silently take the Python road and these tests test nothing.
if HOT is None and not os.environ.get("CI"):
    pytest.skip("ldap/_hot.c was not built (no C compiler when installed)", allow_module_level=True)

MAX_PDU = 256 * 1024
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_extension_is_built_and_used_by_default() -> None:
    assert HOT is not None, "ldap/_hot.c was not built: is a C compiler installed?"
    assert Ldap().compiled  # used unless ldap.compiled = false
    version = subprocess.run([*smki_cli(), "--version"], capture_output=True, text=True,
                             timeout=60, env=cli_env())
    assert "(LDAP short way: compiled, ldap/_hot.c)" in version.stdout, version


# -- match: whole_message + message_id + Shapes.match ------------------------------------------

def _python_match(data: bytes, shapes: Shapes) -> tuple[int, object, bytes] | None:
    content = codec.whole_message(data, MAX_PDU)
    ids = codec.message_id(content) if content is not None else None
    if content is None or ids is None:
        return None
    shaped = shapes.match(content[ids[1]:])
    return None if shaped is None else (ids[0], shaped[0], shaped[1])


def _search(mid: int, eui: str, usage: str = "KA", attrs: tuple[str, ...] = ("userCertificate;binary",),
            base: str = "ou=Devices,o=SMKI") -> bytes:
    req = search_operation(base, f"(&(smkiEui64={eui})(smkiKeyUsage={usage}))", ldap3.SUBTREE,
                           ldap3.DEREF_NEVER, list(attrs), 0, 0, False, True, True)
    return pdu(mid, "searchRequest", req)


def _eui_text(rng: random.Random) -> str:
    return "-".join(f"{rng.randrange(256):02X}" for _ in range(8))


def _learnt() -> tuple[Shapes, list[bytes]]:
    """Shapes learnt from a few real encodings (ldap3's), and requests of them and not."""
    shapes = Shapes()
    rng = random.Random(7)
    requests = []
    for i, (usage, attrs, base) in enumerate([
            ("KA", ("userCertificate;binary",), "ou=Devices,o=SMKI"),
            ("DS", ("userCertificate;binary",), "ou=Devices,o=SMKI"),
            ("KA", ("userCertificate", "smkiSerial"), "ou=Devices,o=SMKI"),
            ("KA", ("*",), "ou=Organisations,o=SMKI")]):
        eui = _eui_text(rng)
        request = _search(2, eui, usage, attrs, base)
        content = codec.whole_message(request, MAX_PDU)
        assert content is not None
        ids = codec.message_id(content)
        assert ids is not None
        shapes.learn(content[ids[1]:], eui.encode(), f"query {i}")  # type: ignore[arg-type]
        for mid in (0, 1, 127, 128, 255, 256, 32767, 32768, 8_388_608, 2**31 - 1):
            requests.append(_search(mid, _eui_text(rng), usage, attrs, base))
        requests.append(_search(3, _eui_text(rng).lower(), usage, attrs, base))  # same shape
        requests.append(_search(3, _eui_text(rng), usage, attrs, base.lower()))  # not learnt
    assert shapes.count == 4
    return shapes, requests


SHAPES, REQUESTS = _learnt()


def test_match_answers_as_python_on_real_requests() -> None:
    assert HOT is not None
    matched = 0
    for request in REQUESTS:
        got = HOT.match(request, MAX_PDU, SHAPES.by_length)
        assert got == _python_match(request, SHAPES), request.hex()
        matched += got is not None
    assert matched == 44  # every learnt shape and message id length; another base's spelling not


@FAST
@given(st.sampled_from(REQUESTS), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                           max_size=4),
       st.integers(-3, 3), st.binary(max_size=3))
def test_match_answers_as_python_on_mutated_requests(request: bytes, flips: list[tuple[int, int]],
                                                     cut: int, more: bytes) -> None:
    assert HOT is not None
    data = bytearray(request)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    mutated = bytes(data[:len(data) + cut] if cut < 0 else data) + (more if cut > 0 else b"")
    assert HOT.match(mutated, MAX_PDU, SHAPES.by_length) == _python_match(mutated, SHAPES)


@FAST
@given(st.binary(max_size=120))
def test_match_answers_as_python_on_random_bytes(data: bytes) -> None:
    assert HOT is not None
    for candidate in (data, b"\x30" + data, b"\x30" + bytes([len(data)]) + data,
                      b"\x30\x84\x00\x00\x00" + bytes([len(data)]) + data):
        assert HOT.match(candidate, MAX_PDU, SHAPES.by_length) == _python_match(candidate, SHAPES)


def test_match_keeps_the_size_limit_and_refuses_odd_arguments() -> None:
    assert HOT is not None
    request = REQUESTS[0]
    assert HOT.match(request, len(request), SHAPES.by_length) is not None
    assert HOT.match(request, len(request) - 1, SHAPES.by_length) is None
    assert HOT.match(request, MAX_PDU, {}) is None
    assert HOT.match(request, MAX_PDU, {len(request) - 5: "not a list"}) is None
    with pytest.raises(TypeError):
        HOT.match(bytearray(request), MAX_PDU, SHAPES.by_length)


@FAST
@given(st.binary(min_size=23, max_size=23) | st.builds(
    lambda octets, sep, lower: sep.join(f"{o:02x}" if lower else f"{o:02X}" for o in octets).encode(),
    st.binary(min_size=8, max_size=8), st.sampled_from(["-", ":", " ", "--"]), st.booleans()))
def test_dashed_eui64_agrees_with_the_general_normaliser(value: bytes) -> None:
    assert HOT is not None
    got = HOT.dashed_eui64(value)
    # it takes exactly the dashed form (anything else goes to `_eui64`) and reads it as that does
    dashed = len(value) == 23 and value[2::3] == b"-------" and all(
        chr(c) in "0123456789abcdefABCDEF" for i, c in enumerate(value) if i % 3 != 2)
    assert (got is not None) == dashed
    if got is not None:
        assert got == _eui64(value)


# -- frames: FastSearch._answer_raw + responses.frames -----------------------------------------

HEAD = records.CERT_HEAD
NAME = responses.attribute_name("userCertificate;binary")


def _record(rng: random.Random, kind: str, usage: str, der_size: int, serial_size: int) -> bytes:
    return records.pack_cert(
        serial="".join(rng.choice("0123456789ABCDEF") for _ in range(serial_size)),
        issuer_key_id=rng.randbytes(20), der=rng.randbytes(der_size), sha256=rng.randbytes(32),
        lodged_us=1_700_000_000_000_000, kind=kind, eui64=rng.randbytes(8),
        role=rng.choice([None, 1, 2, 3]), usage=usage, status=rng.choice("VRE"),
        manufacturing_flag=rng.random() < 0.5, not_before_us=rng.randrange(2**40),
        not_after_us=rng.randrange(-2**50, 2**62), subject_key_id=rng.randbytes(20),
        subject_name="CN=x", issuer_name="CN=y")


def _python_frames(mid: int, found: list[bytes], kind: int, accepts: dict[bytes, bool] | None,
                   tail: bytes) -> tuple[bytes, int] | None:
    """What FastSearch._answer_raw and then responses.frames make of the same records."""
    ops = []
    for value in found:
        if value[records.KIND_AT] != kind:
            return None
        if accepts is not None:
            verdict = accepts.get(value[records.TRAITS])
            if verdict is None:
                return None
            if not verdict:
                continue
        head = HEAD.unpack_from(value)
        serial, der = records.cert_serial_der(value, head)
        ops.append(responses.single_value_op(b"smkiSerial=" + serial + tail, NAME, der))
    return responses.frames(mid, [*ops, SUCCESS_DONE]), len(ops)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(0, 12), st.integers(0, 2**32 - 1),
       st.sampled_from([0, 1, 2]), st.integers(0, 200))
def test_frames_answer_as_python(mid: int, count: int, seed: int, judged: int, tail_size: int
                                 ) -> None:
    assert HOT is not None
    rng = random.Random(seed)
    device = records.KINDS.index("device")
    # DER sizes on each side of every length form (short, 0x81, 0x82, 0x83) of each element
    sizes = [0, 1, 100, 120, 127, 128, 200, 255, 256, 480, 65_400, 65_536, 70_000]
    kinds = ["device"] * 9 + ["organisation"] if rng.random() < 0.3 else ["device"]
    # (more than 8: the C keeps its working list on the heap, not the stack)
    found = [_record(rng, rng.choice(kinds), rng.choice(["KA", "DS"]), rng.choice(sizes),
                     rng.choice([1, 16, 40, 255]))
             for _ in range(count)]
    accepts: dict[bytes, bool] | None = None
    if judged:
        accepts = {v[records.TRAITS]: rng.random() < 0.6 for v in found
                   if judged == 2 or rng.random() < 0.8}
    tail = (",smkiEui64=" + "x" * tail_size + ",ou=Devices,o=SMKI").encode()
    got = HOT.frames(mid, found, device, accepts, NAME, b"smkiSerial=", tail, SUCCESS_DONE)
    assert got == _python_frames(mid, found, device, accepts, tail)


def test_frames_refuse_damaged_records_and_odd_arguments() -> None:
    assert HOT is not None
    rng = random.Random(3)
    device = records.KINDS.index("device")
    good = _record(rng, "device", "KA", 300, 16)
    tail = b",ou=Devices,o=SMKI"
    assert HOT.frames(5, [good], device, None, NAME, b"smkiSerial=", tail, SUCCESS_DONE) is not None
    refused = 0
    for cut in range(len(good)):  # every truncation: as Python, None where Python raises
        found = [good, good[:cut]]
        try:
            want = _python_frames(5, found, device, None, tail)
        except (records.RecordError, struct.error, IndexError):
            want = None
        got = HOT.frames(5, found, device, None, NAME, b"smkiSerial=", tail, SUCCESS_DONE)
        assert got == want, cut
        refused += got is None
    assert refused > 300  # (a record cut inside its DER still has its lengths right)
    longer = bytearray(good)
    longer[records.HEAD_LAYOUT[5]:records.HEAD_LAYOUT[5] + 4] = (2**32 - 1).to_bytes(4, "big")
    assert HOT.frames(5, [bytes(longer)], device, None, NAME, b"s=", tail, SUCCESS_DONE) is None
    assert HOT.frames(2**31, [good], device, None, NAME, b"s=", tail, SUCCESS_DONE) is None
    assert HOT.frames(-1, [good], device, None, NAME, b"s=", tail, SUCCESS_DONE) is None
    assert HOT.frames(5, [bytearray(good)], device, None, NAME, b"s=", tail, SUCCESS_DONE) is None
    with pytest.raises(TypeError):
        HOT.frames(5, (good,), device, None, NAME, b"s=", tail, SUCCESS_DONE)
    with pytest.raises(TypeError):
        HOT.frames(5, [good], device, [], NAME, b"s=", tail, SUCCESS_DONE)
    with pytest.raises(ValueError):
        HOT.layout(0, 0, 0, 10, 1, 8)  # the DER length's 4 octets would run past the head

