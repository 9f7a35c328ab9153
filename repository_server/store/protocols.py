"""What each service needs of the store, by area: narrow interfaces (`typing.Protocol`) that
`Store` satisfies and that services take instead of it, so their rules can be exercised
against small in-memory stand-ins (`tests/fakes.py`) and each area's SQL can change behind
its interface. A Protocol names exactly the methods its callers use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from repository_server import events
from repository_server.pki.model import CrlInfo
from repository_server.store.models import (
    CertRow,
    CpmRow,
    CrlRow,
    DocumentRow,
    ExtractMarkers,
    ExtractRow,
    FailureRule,
    Failures,
    IssuerRow,
    NewCertificate,
    PortalSessionRow,
    TryRule,
    UserRow,
)

if TYPE_CHECKING:
    from repository_server.store.bulkload import BulkLoad


# -- audit -------------------------------------------------------------------------------
class AuditLog(Protocol):
    async def audit(self, **entry: Any) -> None: ...


# -- lodging writes, by area -------------------------------------------------------------
class CertificateWrites(Protocol):
    async def issuers(self, *, key_id: bytes | None = None, subject_dn: bytes | None = None,
                      cas_only: bool = True) -> list[IssuerRow]: ...

    async def insert_certificates(
        self, records: Sequence[NewCertificate], *, lodged_by: str, audit: dict[str, Any],
    ) -> tuple[list[int], list[int], list[events.Event], int]: ...

    async def set_status(self, serial: str, issuer_key_id: bytes | None, status: str | None,
                         manufacturing_flag: bool | None, audit: dict[str, Any]
                         ) -> tuple[list[dict[str, Any]], int, list[events.Event]]: ...


class CrlWrites(Protocol):
    async def insert_crl(self, info: CrlInfo, *, kind: str, issuer_key_id: bytes,
                         issuer_cert_id: int, lodged_by: str, audit: dict[str, Any],
                         lint: list[dict[str, str]]
                         ) -> tuple[str, int | None, int, list[events.Event]]: ...


class DocumentWrites(Protocol):
    async def insert_document(self, name: str, content_type: str, body: bytes, sha256: bytes,
                              *, lodged_by: str, audit: dict[str, Any]
                              ) -> tuple[str, int, int, list[events.Event]]: ...


@runtime_checkable
class BulkLoads(Protocol):
    """`import` into an empty store: secondary indexes dropped, built after the COPYs."""

    async def begin_bulk_load(self) -> BulkLoad | None: ...


class LodgingStore(CertificateWrites, CrlWrites, DocumentWrites, AuditLog, Protocol):
    """Everything the lodging service writes (and audits)."""


# -- accounts ----------------------------------------------------------------------------
class UserDirectory(Protocol):
    async def users(self) -> list[UserRow]: ...


class UserAdmin(UserDirectory, Protocol):
    """The operator's user commands."""

    async def user(self, name: str) -> UserRow | None: ...

    async def create_user(self, name: str, role: str, *, api_key_sha256: bytes | None,
                          api_key_hint: str | None, password_hash: str | None,
                          actor: str) -> UserRow: ...

    async def update_user(self, name: str, *, actor: str, action: str,
                          **fields: Any) -> UserRow | None: ...

    async def user_ssh_keys(self, name: str) -> tuple[UserRow, list[str]] | None: ...

    async def set_user_ssh_keys(self, name: str, keys: Sequence[str], *, actor: str,
                                detail: dict[str, Any]) -> bool: ...


class SignInStore(AuditLog, Protocol):
    """Password attempts, lockout and portal sessions (accounts.signin)."""

    async def portal_account(self, name: str
                             ) -> tuple[UserRow, Failures, datetime | None] | None: ...

    async def sign_in_begin(self, name: str, may_try: TryRule,
                            rule: FailureRule) -> int | None: ...

    async def sign_in_failed(self, name: str, attempt: int, rule: FailureRule,
                             audit: dict[str, Any]) -> tuple[Failures, datetime | None, bool]: ...

    async def sign_in_succeeded(self, name: str, attempt: int,
                                still_locked: Callable[[datetime | None], bool],
                                audit: dict[str, Any] | None, *,
                                session: tuple[bytes, datetime] | None = None) -> bool: ...

    async def portal_start_session(self, token_sha256: bytes, name: str, now: datetime,
                                   audit: dict[str, Any]) -> None: ...

    async def portal_session(self, token_sha256: bytes) -> PortalSessionRow | None: ...

    async def portal_touch_session(self, token_sha256: bytes, now: datetime) -> None: ...

    async def portal_end_session(self, token_sha256: bytes,
                                 audit: dict[str, Any] | None = None) -> None: ...

    async def portal_purge_sessions(self, idle_before: datetime,
                                    created_before: datetime) -> int: ...

    async def update_user(self, name: str, *, actor: str, action: str,
                          **fields: Any) -> UserRow | None: ...


# -- service levels ----------------------------------------------------------------------
class AccountsStore(SignInStore, UserAdmin, Protocol):
    """Everything the accounts service (accounts.Accounts) reads and writes."""


class ServiceLevelReports(UserDirectory, Protocol):
    """The month's and day's totals (users: their demand forecasts)."""

    async def cpm_counts(self, month: str) -> list[CpmRow]: ...

    async def demand_counts(self, day: date) -> list[tuple[str, int, int]]: ...


class ServiceLevelCounts(ServiceLevelReports, Protocol):
    """What the service-level counter flushes into and reads back (users: forecasts)."""

    async def add_service_level_counts(self, cpm: Sequence[CpmRow],
                                       demand: Sequence[tuple[Any, str, int, int]]) -> None: ...


# -- extracts ----------------------------------------------------------------------------
class ExtractLock(Protocol):
    def extract_lock(self, *, wait: bool) -> contextlib.AbstractAsyncContextManager[bool]: ...

    async def extract_latest(self) -> ExtractRow | None: ...


class ExtractSchedule(ExtractLock, Protocol):
    async def extract_slot_taken(self, slot: str) -> bool: ...


class ExtractPages(Protocol):
    """The keyset pages an extract is written from: the store, or the node's read replica
    (`extracts.replica.ReplicaPages`), which give the same rows."""

    async def extract_certificates_page(self, after_id: int, upto_id: int,
                                        limit: int) -> list[CertRow]: ...

    async def extract_crls_page(self, after_id: int, upto_id: int,
                                limit: int) -> list[CrlRow]: ...

    async def extract_documents_page(self, after_id: int, upto_id: int,
                                     limit: int) -> list[tuple[int, DocumentRow]]: ...


class ExtractStorer(ExtractLock, ExtractPages, Protocol):
    """What an extract producer reads (keyset pages) and records."""

    async def extract_markers(self) -> ExtractMarkers: ...

    async def extract_change_head(self) -> int: ...

    async def extract_changed_page(self, after_change: int, upto_change: int, id_upto: int,
                                   limit: int) -> list[tuple[int, CertRow]]: ...

    async def extract_next_id(self) -> int: ...

    async def extract_begin(self, extract_id: int, name: str, kind: str, slot: str | None,
                            previous_id: int | None, upto: ExtractMarkers) -> None: ...

    async def extract_published(self, extract_id: int, size: int, sha256: bytes,
                                counts: dict[str, Any]) -> None: ...

    async def extract_failed(self, extract_id: int | None = None) -> int: ...

    async def extract_removed(self, ids: Sequence[int]) -> None: ...

    async def extracts(self, states: Sequence[str] = ("published",)) -> list[ExtractRow]: ...
