"""Refused TLS handshakes as bounded counts, not one row and one log line each.

An anonymous peer can open thousands of connections a second that fail their handshake (no
client certificate, an unknown CA, nothing sent at all). Each refusal is classified into one
of a few reasons (`REASONS`: a bounded label set for the Prometheus counter) and counted per
minute, listener, reason and peer address. At most `peers_per_minute` distinct peers are
kept per minute and listener; refusals from the rest are summed under peer `"other"`. The
server flushes the counts to the store (table `tls_refusals`) every few seconds and logs one
line per listener and minute. No I/O here.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

OTHER_PEER = "other"

# reason -> what it means (README, `report tls-refusals`)
REASONS = {
    "no_certificate": "no client certificate presented",
    "unknown_ca": "client certificate not issued by a trusted CA (or self-signed)",
    "expired": "client certificate expired or not yet valid",
    "bad_certificate": "client certificate otherwise invalid",
    "protocol": "TLS version, cipher or message refused",
    "timeout": "handshake not finished in tls.handshake_timeout_seconds",
    "closed": "the peer closed the connection during the handshake",
    "other": "anything else",
}

# OpenSSL X509_V_ERR_* codes (x509_vfy.h)
_UNKNOWN_CA = {2, 3, 18, 19, 20, 21, 27}  # no issuer, self-signed, untrusted, unable to verify
_EXPIRED = {9, 10}  # not yet valid, expired


def classify(exc: BaseException | None) -> tuple[str, str]:
    """(reason, detail) for why a handshake ended without a connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        reason = ("unknown_ca" if code in _UNKNOWN_CA else "expired" if code in _EXPIRED
                  else "bad_certificate")
        return reason, f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = exc.reason or str(exc)
        if text == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate", "no client certificate presented"
        return "protocol", f"TLS handshake failed: {text}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or (
            isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)):
        return "timeout", "TLS handshake timed out"
    if exc is None or isinstance(exc, ConnectionError | EOFError):
        return "closed", "connection closed during the TLS handshake"
    return "other", f"TLS handshake failed: {type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class RefusalRow:
    minute: int  # epoch seconds of the minute's start (UTC)
    listener: str
    reason: str
    peer: str  # an IP address, or OTHER_PEER
    count: int
    detail: str  # the last refusal's detail


class RefusalSummary:
    def __init__(self, peers_per_minute: int, clock: Callable[[], float] = time.time) -> None:
        self.peers_per_minute = peers_per_minute
        self.clock = clock
        self._counts: dict[tuple[int, str, str, str], list[int | str]] = {}
        self._peers: dict[tuple[int, str], set[str]] = {}
        self._minutes: dict[tuple[int, str], Counter[str]] = {}  # for the log lines

    def record(self, listener: str, reason: str, peer: str, detail: str) -> None:
        minute = int(self.clock()) // 60 * 60
        peers = self._peers.setdefault((minute, listener), set())
        if peer not in peers:
            if len(peers) >= self.peers_per_minute:
                peer = OTHER_PEER
            else:
                peers.add(peer)
        entry = self._counts.get((minute, listener, reason, peer))
        if entry is None:
            self._counts[(minute, listener, reason, peer)] = [1, detail]
        else:
            entry[0] = int(entry[0]) + 1
            entry[1] = detail
        self._minutes.setdefault((minute, listener), Counter())[reason] += 1

    def take(self) -> list[RefusalRow]:
        """The counts since the last take (to add to the store)."""
        rows = [RefusalRow(m, listener, reason, peer, int(entry[0]), str(entry[1]))
                for (m, listener, reason, peer), entry in self._counts.items()]
        self._counts = {}
        return rows

    def put_back(self, rows: list[RefusalRow]) -> None:
        """Rows a flush could not store: counted again at the next one."""
        for row in rows:
            entry = self._counts.setdefault((row.minute, row.listener, row.reason, row.peer),
                                            [0, row.detail])
            entry[0] = int(entry[0]) + row.count

    def log_lines(self, final: bool = False) -> list[str]:
        """One line per listener for each minute that has ended (every minute if `final`)."""
        current = int(self.clock()) // 60 * 60
        lines = []
        for (minute, listener), reasons in sorted(self._minutes.items()):
            if minute >= current and not final:
                continue
            peers = len(self._peers.pop((minute, listener), ()))
            what = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
            lines.append(f"{listener}: {sum(reasons.values())} TLS handshake(s) refused in the"
                         f" minute from {time.strftime('%H:%M', time.gmtime(minute))} UTC"
                         f" ({what}; from {peers} peer address(es)); see"
                         " `smki-repository report tls-refusals`")
            del self._minutes[(minute, listener)]
        return lines
