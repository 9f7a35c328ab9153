"""The search operation (RFC 4511 §4.5), paged results (RFC 2696) and the short way for the
commonest search (`fastpath.py`), over one connection's client.

A search is answered in one of three ways: the short way (`FastSearch`) when it qualifies,
one page of a paged search, or the general way: resolve the base, read the candidates the
directory offers for the filter's plan, keep those the filter matches and the reader may read
(`access.ReadAccess`). Small answers are held back, written with the SearchResultDone in one
write and offered to the response cache; larger ones are written as found, pausing while the
client does not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from typing import Protocol, TypeVar

from repository_server.config import Ldap
from repository_server.listeners.ldap import codec, dn, protocol, responses
from repository_server.listeners.ldap.answers import (
    CACHEABLE_BYTES,
    CACHEABLE_ENTRIES,
    Outcome,
    Selection,
)
from repository_server.listeners.ldap.directory import Directory, DirectoryError, Node
from repository_server.listeners.ldap.fastpath import FastSearch
from repository_server.listeners.ldap.filters import Entry, compile_filter, plan
from repository_server.listeners.ldap.protocol import PAGED_RESULTS_OID, ResultCode

MAX_PAGED = 8  # paged searches kept open per connection
K = TypeVar("K")
V = TypeVar("V")


class Client(Protocol):
    """The connection a search answers on."""

    writable: asyncio.Event  # cleared while the client does not read

    @property
    def authenticated(self) -> bool: ...

    def write(self, data: bytes) -> None: ...


class SearchService:
    """What every connection's searches share: the directory, settings, the fast path, and
    memos of what clients ask (a few attribute lists, a few bases)."""

    def __init__(self, settings: Ldap, directory: Directory) -> None:
        self.settings = settings
        self.directory = directory
        self.access = directory.access
        # the short way for searches by EUI-64 (ldap/fastpath.py); off: everything the long way
        self.fast = FastSearch(directory, settings.compiled) if settings.fast_path else None
        self._bases: dict[str, dn.DN] = {}
        self._selections: dict[tuple[str, ...], Selection] = {}

    def selection(self, attributes: tuple[str, ...]) -> Selection:
        """The attributes a search asks for (memoised: clients ask for a few lists)."""
        return _memo(self._selections, attributes, Selection.parse)

    def base_dn(self, text: str) -> dn.DN:
        """A search base, normalised (memoised: clients ask under a few bases)."""
        return _memo(self._bases, text, dn.parse_normalised)

    async def readable(self, base: dn.DN, authenticated: bool) -> Node:
        """The node a base names, if the reader may read it (else noSuchObject)."""
        return await self.directory.resolve(base, authenticated)

    async def matches(self, req: protocol.SearchRequest, node: Node, base: dn.DN,
                      authenticated: bool) -> AsyncGenerator[Entry, None]:
        """The entries in scope that the filter matches and the reader may read."""
        predicate = compile_filter(req.filter)
        access = self.access
        async for entry in self.directory.candidates(node, req.scope, plan(req.filter),
                                                     authenticated, base):
            if (access.may_read(public=entry.public, authenticated=authenticated)
                    and predicate(entry) is True):
                yield entry


class Searches:
    """The searches of one connection, and its open paged searches."""

    def __init__(self, service: SearchService, client: Client) -> None:
        self.service = service
        self.client = client
        # open paged searches: cookie -> (their entries, how many were sent so far)
        self.paged: OrderedDict[bytes, tuple[AsyncGenerator[Entry, None], int]] = OrderedDict()

    def close(self) -> None:
        for gen, _ in self.paged.values():
            close_later(gen)
        self.paged.clear()

    async def search(self, req: protocol.SearchRequest, content: bytes | None) -> Outcome:
        """Answer a search; `content` (its bytes after the message id) when the answer may
        go into the response cache."""
        service = self.service
        settings = service.settings
        paging: tuple[int, bytes] | None = None
        for control in req.controls:
            if control.oid == PAGED_RESULTS_OID:
                paging = responses.decode_paged_results(control.value)
            elif control.critical:
                return Outcome(ResultCode.UNAVAILABLE_CRITICAL_EXTENSION,
                               f"critical control {control.oid} is not supported")
        if req.scope > 3:  # base, one level, subtree, subordinate subtree
            return Outcome(ResultCode.PROTOCOL_ERROR, "invalid scope")
        try:
            base = service.base_dn(req.base)
        except dn.DNError as exc:
            return Outcome(ResultCode.INVALID_DN_SYNTAX, f"invalid base DN: {exc}")
        selection = service.selection(req.attributes)
        limits = [x for x in (req.size_limit, settings.size_limit) if x > 0]
        size_limit = min(limits) if limits else 0
        fast = service.fast
        if paging is None and fast is not None:
            private = service.access.may_read_private(authenticated=self.client.authenticated)
            compiled = fast.compile(req, base, private, selection, size_limit)
            if compiled is not None:
                query, eui_value = compiled
                found = fast.answer(query, eui_value, service.directory.clock())
                if found is not None and (not size_limit or len(found[0]) <= size_limit):
                    if content is not None:  # later requests of this shape skip the decoding
                        ids = codec.message_id(content)
                        if ids is not None:
                            fast.shapes.learn(content[ids[1]:], eui_value, query)
                    return _fast_outcome(*found, content is not None)
        times = [x for x in (req.time_limit, settings.time_limit_seconds) if x > 0]
        deadline = time.monotonic() + min(times) if times else float("inf")
        if paging is not None:
            return await self._paged(req, base, selection, paging, deadline)
        return await self._whole(req, base, selection, size_limit, deadline, content is not None)

    async def _whole(self, req: protocol.SearchRequest, base: dn.DN, selection: Selection,
                     size_limit: int, deadline: float, cacheable: bool) -> Outcome:
        authenticated = self.client.authenticated
        try:
            node = await self.service.readable(base, authenticated)
        except DirectoryError as exc:
            return Outcome(exc.code, exc.message, exc.matched)
        # Entries are held back (and written with the done) while the answer is small enough
        # to be cached; beyond that they are written as found, pausing while the client lags.
        out = Outcome(ResultCode.SUCCESS, cache_until=float("inf") if cacheable else None)
        held = out.held
        held_bytes = 0
        mid = req.message_id
        client = self.client
        matches = self.service.matches(req, node, base, authenticated)
        try:
            async for entry in matches:
                # checked between entries; one store read is bounded by database.command_timeout
                if time.monotonic() > deadline:
                    out.code, out.message = ResultCode.TIME_LIMIT_EXCEEDED, "time limit exceeded"
                    break
                if size_limit and out.sent >= size_limit:
                    out.code = ResultCode.SIZE_LIMIT_EXCEEDED
                    out.message = f"more than {size_limit} entries match"
                    break
                op = responses.entry_op(entry.dn, selection.pick(entry, req.types_only))
                out.sent += 1
                held.append(op)
                if out.cache_until is not None:
                    out.cache_until = min(out.cache_until, entry.valid_until)
                    held_bytes += len(op)
                    if len(held) <= CACHEABLE_ENTRIES and held_bytes <= CACHEABLE_BYTES:
                        continue
                    out.cache_until = None
                client.write(responses.frames(mid, held))
                held.clear()
                if not client.writable.is_set():
                    await client.writable.wait()
        finally:
            await matches.aclose()
        return out

    async def _paged(self, req: protocol.SearchRequest, base: dn.DN, selection: Selection,
                     paging: tuple[int, bytes], deadline: float) -> Outcome:
        """One page. The server's size limit bounds each page; the client's bounds the whole
        search, which ends with sizeLimitExceeded after that many entries (RFC 2696 §3,
        RFC 4511 §4.5.1.4; slapd does the same)."""
        page_size, cookie = paging
        settings = self.service.settings
        client = self.client
        ended = (responses.paged_results_control(0, b""),)
        sent_before = 0
        if cookie:
            found = self.paged.pop(cookie, None)
            if found is None:
                return Outcome(ResultCode.UNWILLING_TO_PERFORM,
                               "unknown or expired paged results cookie")
            matches, sent_before = found
            if page_size == 0:  # the client abandons the paged search
                close_later(matches)
                return Outcome(ResultCode.SUCCESS, controls=ended)
        else:
            try:
                node = await self.service.readable(base, client.authenticated)
            except DirectoryError as exc:
                return Outcome(exc.code, exc.message, exc.matched)
            if page_size == 0:
                return Outcome(ResultCode.SUCCESS, controls=ended)
            matches = self.service.matches(req, node, base, client.authenticated)
        page = min(page_size, settings.size_limit) if settings.size_limit else page_size
        if req.size_limit:
            page = min(page, req.size_limit - sent_before)
        out = Outcome(ResultCode.SUCCESS, controls=ended)
        more = True
        while out.sent < page:
            if time.monotonic() > deadline:
                close_later(matches)
                out.code, out.message = ResultCode.TIME_LIMIT_EXCEEDED, "time limit exceeded"
                return out
            try:
                entry = await anext(matches)
            except StopAsyncIteration:
                more = False
                break
            client.write(responses.frame(req.message_id, responses.entry_op(
                entry.dn, selection.pick(entry, req.types_only))))
            out.sent += 1
            if not client.writable.is_set():
                await client.writable.wait()
        if more and req.size_limit and sent_before + out.sent >= req.size_limit:
            try:  # the client's limit is reached: is there more than it allows?
                await anext(matches)
            except StopAsyncIteration:
                more = False
            else:
                out.code = ResultCode.SIZE_LIMIT_EXCEEDED
                out.message = f"more than {req.size_limit} entries match"
                more = False
        if more:
            next_cookie = secrets.token_bytes(12)
            self.paged[next_cookie] = (matches, sent_before + out.sent)
            while len(self.paged) > MAX_PAGED:
                _, (old, _) = self.paged.popitem(last=False)
                close_later(old)
            out.controls = (responses.paged_results_control(0, next_cookie),)
        else:
            close_later(matches)
        return out


def _fast_outcome(ops: list[bytes], until: float, cacheable: bool) -> Outcome:
    """The answer of ldap/fastpath.py's short way, shaped as the general path's."""
    out = Outcome(ResultCode.SUCCESS, cache_until=until if cacheable else None, sent=len(ops))
    out.held.extend(ops)
    if len(ops) > CACHEABLE_ENTRIES or sum(map(len, ops)) > CACHEABLE_BYTES:
        out.cache_until = None
    return out


def _memo(memo: dict[K, V], key: K, make: Callable[[K], V]) -> V:
    """`make(key)`, kept in `memo` (emptied when it holds 1024)."""
    found = memo.get(key)
    if found is None:
        found = make(key)
        if len(memo) >= 1024:
            memo.clear()
        memo[key] = found
    return found


def close_later(gen: AsyncGenerator[Entry, None]) -> None:
    with contextlib.suppress(RuntimeError):
        task = asyncio.get_running_loop().create_task(gen.aclose())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
