"""Lodging rules: what the DCC may write and how each write is validated.

Certificates: parse every item (in a process pool for big batches) → resolve and verify the
issuer against a certificate already in the repository (or earlier in the same batch) →
self-signed roots only when lodged explicitly as trust anchors → store the whole batch in one
transaction (all or nothing; identical bytes are a no-op; a different certificate with the
same issuer and serial is a conflict). CRLs/ARLs, in Boulder's order: size cap → parse →
issuer present → signature → CRL number present and strictly greater → thisUpdate not in the
future → conditional write. Every outcome, refusals included, is audited; acknowledged means
committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from repository_server import events
from repository_server.doctypes import is_document_name, safe_type
from repository_server.jsontime import json_time, json_time_or_none
from repository_server.lodging.batch import (
    CertOptions,
    Issuer,
    Parsed,
    decide,
    issuer_candidates,
    parse_items,
    resolve_issuer,
    resolve_within_batch,
)
from repository_server.pki.certificates import parse_certificate
from repository_server.pki.crls import parse_crl
from repository_server.pki.errors import ParseError
from repository_server.pki.ids import format_key_id
from repository_server.pki.model import CrlInfo
from repository_server.pki.pem import load_pem_or_der_certificates, load_pem_or_der_crl
from repository_server.pki.signatures import verify_crl_signature
from repository_server.store.models import ConflictError, IssuerRow, NewCertificate
from repository_server.store.protocols import CertificateWrites, LodgingStore

log = logging.getLogger(__name__)

_SYNC_SECONDS = 30.0  # a lodging waits this long at most for its node's replica
_CHUNK = 2000  # certificates per worker task
_IN_PROCESS_MAX = 256  # smaller batches are parsed in-process (no IPC round trip)


class LodgeError(Exception):
    """A refusal: HTTP status, a one-line reason, optional per-item results."""

    def __init__(self, status: int, reason: str, results: list[dict[str, Any]] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.results = results or []
        self.audited = False


@dataclass
class Actor:
    """Who is writing: the client identity, the officer they act for, where from."""

    name: str
    on_behalf_of: str | None = None
    peer: str | None = None

    def audit(self, action: str, outcome: str, obj: str | None = None,
              detail: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"actor": self.name, "on_behalf_of": self.on_behalf_of, "peer": self.peer,
                "action": action, "outcome": outcome, "object": obj, "detail": detail or {}}


@dataclass
class BatchResult:
    results: list[dict[str, Any]] = field(default_factory=list)
    stored: int = 0
    identical: int = 0


class IssuerRegistry:
    """Every CA certificate in the repository by subject DN, refreshed on demand."""

    def __init__(self, store: CertificateWrites) -> None:
        self.store = store
        self.by_dn: dict[bytes, list[Issuer]] = {}
        self._loaded = False

    @staticmethod
    def _issuer(row: IssuerRow) -> Issuer:
        # parsed for its public key only (our parser: cryptography refuses some real CAs)
        return Issuer(row.id, row.subject_dn, row.subject_key_id,
                      parse_certificate(row.der).public_key_der,
                      row.kind in ("root", "ca"), row.kind == "root")

    async def refresh(self) -> None:
        by_dn: dict[bytes, list[Issuer]] = {}
        for row in await self.store.issuers():
            by_dn.setdefault(row.subject_dn, []).append(self._issuer(row))
        self.by_dn = by_dn
        self._loaded = True

    async def ensure(self) -> None:
        if not self._loaded:
            await self.refresh()

    async def non_ca_candidates(self, subject_dn: bytes, key_id: bytes | None) -> list[Issuer]:
        rows = await self.store.issuers(key_id=key_id, subject_dn=subject_dn, cas_only=False)
        return [self._issuer(r) for r in rows]


def _exit_with(owner: int) -> None:
    """Worker initializer: leave when the process that owns the pool is gone. Pool workers
    hold both ends of their task queue, so a server killed with SIGKILL would otherwise
    leave them (and the forkserver, which waits on them) running for ever."""

    def watch() -> None:
        while True:
            time.sleep(1)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # pragma: no cover - pid reused by another user
                os._exit(0)

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # forkserver: never fork the event loop's process (asyncpg, threads) into workers
    ctx = multiprocessing.get_context("forkserver")
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                  initializer=_exit_with,
                                                  initargs=(os.getpid(),))


class LodgingService:
    def __init__(self, store: LodgingStore, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 max_batch: int = 50_000, max_crl_bytes: int = 16 * 1024 * 1024,
                 clock_skew: timedelta = timedelta(minutes=5), parse_workers: int = 0,
                 on_change: Callable[[events.Event], None] | None = None,
                 after_commit: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.clock = clock
        self.max_batch = max_batch
        self.max_crl_bytes = max_crl_bytes
        self.clock_skew = clock_skew
        self.issuers = IssuerRegistry(store)
        self._workers = parse_workers or os.cpu_count() or 1
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        # Hears at once of what this process's lodgings changed (the catalog: it then skips
        # their NOTIFY when that comes back).
        self.on_change = on_change or (lambda _event: None)
        self._after_commit = after_commit

    def changed(self, changes: Sequence[events.Event]) -> None:
        """This process's lodging committed these changes: its own caches hear of them now."""
        for event in changes:
            self.on_change(event)

    async def committed(self, seq: int) -> None:
        """Before a lodging is acknowledged: this node's read replica has it (read-your-
        writes). It is already durable in the store, so a replica that cannot catch up now
        (it will, from the change log) does not turn the acknowledgement into an error."""
        if not seq or self._after_commit is None:
            return
        try:
            await asyncio.wait_for(self._after_commit(seq), _SYNC_SECONDS)
        except Exception as exc:  # e.g. the feed's connection broke: once more
            log.info("change %d: catching up the read replica again after %s: %s", seq,
                     type(exc).__name__, exc)
        else:
            return
        try:
            await asyncio.wait_for(self._after_commit(seq), _SYNC_SECONDS)
        except Exception as exc:
            log.warning("change %d is stored but not yet in this node's read replica: %s: %s",
                        seq, type(exc).__name__, exc)

    def close(self) -> None:
        if self._executor is not None:
            # wait: an idle pool stops at once; not waiting left its management thread
            # writing to closed pipes at interpreter exit ("OSError: Bad file descriptor"
            # printed after `import`)
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def _refuse(self, actor: Actor, action: str, status: int, reason: str,
                      obj: str | None = None, results: list[dict[str, Any]] | None = None,
                      outcome: str = "refused") -> LodgeError:
        detail: dict[str, Any] = {"status": status, "reason": reason}
        if results:
            detail["refused_items"] = [r for r in results if r.get("outcome") == "refused"][:20]
        try:
            await self.store.audit(**actor.audit(action, outcome, obj, detail))
        except Exception:  # the refusal stands even if the audit write fails; say so loudly
            log.exception("could not audit refusal of %s by %s", action, actor.name)
        err = LodgeError(status, reason, results)
        err.audited = True
        return err

    # -- certificates ---------------------------------------------------------------------
    def executor(self) -> concurrent.futures.ProcessPoolExecutor:
        """The worker processes that parse and verify (started on first use)."""
        if self._executor is None:
            self._executor = _pool(self._workers)
        return self._executor

    async def _parse(self, ders: Sequence[bytes]) -> list[Parsed]:
        await self.issuers.ensure()
        issuers = self.issuers.by_dn
        if len(ders) <= _IN_PROCESS_MAX or self._workers < 2:
            return parse_items(0, ders, issuers)
        executor = self.executor()
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(executor, parse_items, start, ders[start:start + _CHUNK],
                                 issuers)
            for start in range(0, len(ders), _CHUNK)
        ]
        out: list[Parsed] = []
        for chunk in await asyncio.gather(*futures):
            out.extend(chunk)
        return out

    async def _resolve_missing(self, parsed: list[Parsed], opts: CertOptions) -> list[Parsed]:
        """Second round for items whose issuer was unknown to the workers: issuers from the
        same batch (`batch.resolve_within_batch`), then non-CA issuers found in the store."""
        if not any(p.issuer_missing and p.info is not None for p in parsed):
            return parsed
        await self.issuers.refresh()  # another process may have lodged the CA meanwhile
        by_index, pending = resolve_within_batch(parsed, self.issuers.by_dn, opts)
        for p in pending:  # last resort: a non-CA issuer (real data has these)
            by_index[p.index] = await self._resolve_non_ca(p)
        return [by_index[i] for i in sorted(by_index)]

    async def _resolve_non_ca(self, p: Parsed) -> Parsed:
        assert p.info is not None
        cands = await self.issuers.non_ca_candidates(p.info.issuer_dn, p.info.issuer_key_id)
        issuer, err, missing = resolve_issuer(p.info, {p.info.issuer_dn: cands})
        return Parsed(p.index, p.info, err, issuer, missing)

    async def validate(self, ders: Sequence[bytes], opts: CertOptions,
                       defer_missing: bool = False) -> tuple[list[dict[str, Any]],
                                                             list[NewCertificate], list[int]]:
        """Parse and check every certificate. Returns (per-item results, store records for
        the acceptable ones, indexes deferred because their issuer is not known yet — only
        with `defer_missing`, for bulk import where the CA may come later)."""
        parsed = await self._resolve_missing(await self._parse(ders), opts)
        results: list[dict[str, Any]] = []
        records: list[NewCertificate] = []
        deferred: list[int] = []
        for p in parsed:
            item: dict[str, Any] = {"index": p.index}
            if p.info is not None:
                item["serial"] = p.info.serial
            d = decide(p, opts, defer_missing)
            if d.defer:
                deferred.append(p.index)
                continue
            if d.reason is not None or p.info is None:
                item.update(outcome="refused", reason=d.reason or "not a certificate")
                results.append(item)
                continue
            item["record"] = len(records)
            records.append(NewCertificate.of(
                len(records), p.info, status=opts.status,
                manufacturing_flag=opts.manufacturing_flag, issuer_verified=d.verified,
                trust_anchor=d.anchor, extra_findings=d.extra))
            item["outcome"] = "pending"
            item["findings"] = [f.code for f in p.info.findings] + [e["code"] for e in d.extra]
            results.append(item)
        return results, records, deferred

    async def store_records(self, records: list[NewCertificate], results: list[dict[str, Any]],
                            actor: Actor, action: str, obj: str,
                            detail: dict[str, Any]) -> BatchResult:
        """Write validated records in one transaction and fill in the per-item outcomes.
        Raises LodgeError(409) and stores nothing on a conflict."""
        pending = [r for r in results if r["outcome"] == "pending"]
        if not records:
            return BatchResult(results, 0, 0)
        try:
            stored, identical, changes, seq = await self.store.insert_certificates(
                records, lodged_by=actor.name, audit=actor.audit(action, "ok", obj, {
                    "count": len(records), "first_serial": pending[0]["serial"],
                    "last_serial": pending[-1]["serial"], **detail}))
        except ConflictError as exc:
            for i in exc.items:
                pending[i].update(outcome="conflict", reason=str(exc))
            for r in pending:
                if r["outcome"] == "pending":
                    r.update(outcome="not stored", reason="batch refused: conflict")
            raise await self._refuse(actor, action, 409, f"{len(exc.items)} conflicting"
                                     f" certificate(s): {exc}; nothing was stored", obj=obj,
                                     results=results, outcome="conflict") from None
        self.changed(changes)
        await self.committed(seq)
        for i in stored:
            pending[i]["outcome"] = "stored"
        for i in identical:
            pending[i]["outcome"] = "identical"
        for r in results:
            r.pop("record", None)
        if any(records[i].kind in ("root", "ca") for i in stored):
            await self.issuers.refresh()
        return BatchResult(results, len(stored), len(identical))

    async def lodge_certificates(self, body: bytes, actor: Actor, opts: CertOptions,
                                 action: str = "lodge.certificates") -> BatchResult:
        """One lodging request: all or nothing."""
        digest = hashlib.sha256(body).hexdigest()
        try:
            ders = load_pem_or_der_certificates(body)
        except ParseError as exc:
            raise await self._refuse(actor, action, 400, f"body: {exc}") from None
        if not ders:
            raise await self._refuse(actor, action, 400, "body holds no certificate")
        if len(ders) > self.max_batch:
            raise await self._refuse(actor, action, 413,
                                     f"batch of {len(ders)} certificates exceeds the limit of"
                                     f" {self.max_batch}")
        results, records, _ = await self.validate(ders, opts)
        refused = sum(1 for r in results if r["outcome"] == "refused")
        if refused:
            for item in results:
                item.pop("record", None)
                if item["outcome"] == "pending":
                    item["outcome"] = "not stored"
                    item["reason"] = "batch refused: another item was refused"
            raise await self._refuse(
                actor, action, 422,
                f"{refused} of {len(ders)} certificates refused; nothing was stored",
                obj=f"batch sha256:{digest}", results=results)
        return await self.store_records(
            records, results, actor, action, f"batch sha256:{digest}",
            {"status": opts.status, "manufacturing_flag": opts.manufacturing_flag,
             "trust_anchor": opts.trust_anchor})

    async def set_status(self, serial: str, issuer_key_id: bytes | None, status: str | None,
                         manufacturing_flag: bool | None, actor: Actor) -> dict[str, Any]:
        action = "lodge.status"
        if status is not None and status not in ("P", "I", "N"):
            raise await self._refuse(actor, action, 400,
                                     f"status must be P, I or N (got {status!r})", serial)
        if status is None and manufacturing_flag is None:
            raise await self._refuse(actor, action, 400,
                                     "give status and/or manufacturing_flag", serial)
        try:
            rows, seq, changes = await self.store.set_status(
                serial, issuer_key_id, status, manufacturing_flag,
                actor.audit(action, "ok", serial, {"status": status,
                                                   "manufacturing_flag": manufacturing_flag}))
        except ConflictError as exc:
            raise await self._refuse(actor, action, 409, str(exc), serial) from None
        if not rows:
            raise await self._refuse(actor, action, 404, f"no certificate with serial {serial}",
                                     serial)
        row = rows[0]
        self.changed(changes)
        await self.committed(seq)
        return {"serial": row["serial"], "status": row["status"],
                "manufacturing_flag": row["manufacturing_flag"],
                "issuer_key_id": format_key_id(row["issuer_key_id"] or b"")}

    # -- CRLs ---------------------------------------------------------------------------
    async def _checked_crl(self, body: bytes, actor: Actor,
                           action: str) -> tuple[CrlInfo, Issuer, bytes, str]:
        """A lodged CRL/ARL checked in Boulder's order (size cap, parse, issuer present,
        signature, CRL number present, thisUpdate not in the future): (the CRL, its issuer,
        the issuer's key id, the audit object); anything else is refused (audited)."""
        if len(body) > self.max_crl_bytes:
            raise await self._refuse(actor, action, 413, f"CRL of {len(body)} bytes exceeds the"
                                     f" limit of {self.max_crl_bytes}")
        try:
            info = parse_crl(load_pem_or_der_crl(body))
        except ParseError as exc:
            raise await self._refuse(actor, action, 400, f"not a CRL: {exc}") from None
        obj = f"crl issuer={info.issuer_name!r} number={info.crl_number}"
        issuer, reason = await self._crl_issuer(info)
        if issuer is None:
            raise await self._refuse(actor, action, 422, reason, obj)
        if info.crl_number is None:
            raise await self._refuse(actor, action, 422, "CRL has no CRL number extension", obj)
        now = self.clock()
        if info.this_update > now + self.clock_skew:
            raise await self._refuse(actor, action, 422, f"thisUpdate {info.this_update.isoformat()}"
                                     " is in the future", obj)
        key_id = info.issuer_key_id or issuer.subject_key_id
        if key_id is None or issuer.id is None:
            raise await self._refuse(actor, action, 422, "issuer has no key identifier", obj)
        return info, issuer, key_id, obj

    async def _crl_issuer(self, info: CrlInfo) -> tuple[Issuer | None, str]:
        """The CA certificate in the repository whose key signed this CRL, or why none."""
        await self.issuers.ensure()
        candidates = issuer_candidates(info.issuer_dn, info.issuer_key_id, self.issuers.by_dn)
        if not candidates:  # another process may have lodged the CA meanwhile
            await self.issuers.refresh()
            candidates = issuer_candidates(info.issuer_dn, info.issuer_key_id,
                                           self.issuers.by_dn)
        if not candidates:
            return None, f"issuer {info.issuer_name!r} is not a CA certificate in the repository"
        issuer = next((c for c in candidates
                       if verify_crl_signature(info.der, c.public_key_der)), None)
        if issuer is None:
            return None, f"CRL signature does not verify under issuer {info.issuer_name!r}"
        return issuer, ""

    async def lodge_crl(self, body: bytes, actor: Actor) -> dict[str, Any]:
        action = "lodge.crl"
        info, issuer, key_id, obj = await self._checked_crl(body, actor, action)
        assert issuer.id is not None
        kind = "arl" if issuer.root else "crl"
        lint = [{"code": f.code, "message": f.message} for f in info.findings]
        try:
            outcome, previous, seq, changes = await self.store.insert_crl(
                info, kind=kind, issuer_key_id=key_id, issuer_cert_id=issuer.id,
                lodged_by=actor.name, lint=lint,
                audit=actor.audit(action, "ok", obj, {"sha256": info.sha256.hex(),
                                                      "revoked": len(info.revoked), "kind": kind}))
        except ConflictError as exc:
            raise await self._refuse(actor, action, 409, str(exc), obj,
                                     outcome="conflict") from None
        self.changed(changes)
        await self.committed(seq)
        return {"outcome": outcome, "kind": kind, "issuer": info.issuer_name,
                "issuer_key_id": format_key_id(key_id), "crl_number": info.crl_number,
                "previous_crl_number": previous, "revoked": len(info.revoked),
                "this_update": json_time(info.this_update),
                "next_update": json_time_or_none(info.next_update),
                "url": f"/crls/{format_key_id(key_id)}.crl",
                "findings": [f["code"] for f in lint]}

    # -- documents -------------------------------------------------------------------------
    async def lodge_document(self, name: str, content_type: str, body: bytes,
                             actor: Actor) -> dict[str, Any]:
        action = "lodge.document"
        if not is_document_name(name):
            raise await self._refuse(actor, action, 400, "document name: letters, digits, '.', '_'"
                                     f" and '-', up to 200 characters (got {name!r})", name)
        if not body:
            raise await self._refuse(actor, action, 400, "document body is empty", name)
        declared = content_type.strip()
        content_type = safe_type(declared)  # never a type a browser would run (web/doctypes)
        sha = hashlib.sha256(body).digest()
        outcome, version, seq, changes = await self.store.insert_document(
            name, content_type, body, sha, lodged_by=actor.name,
            audit=actor.audit(action, "ok", name, {"sha256": sha.hex(), "size": len(body),
                                                   "content_type": content_type,
                                                   "declared_type": declared[:200]}))
        self.changed(changes)
        await self.committed(seq)
        return {"outcome": outcome, "name": name, "version": version,
                "content_type": content_type, "size": len(body), "sha256": sha.hex(),
                "url": f"/documents/{name}/{version}"}
