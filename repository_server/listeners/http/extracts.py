"""Extract downloads on the http and https listeners.

  GET /extracts          JSON list of the published extracts, newest first
  GET /extracts/{name}   the file, with Range (resuming), If-Range and conditional requests

Like organisation and device certificates, they need an API key (or a portal session, for
the portal's download route) unless `web.open_reads`. Only names of published extracts are
served: a `.partial-` file, or any other name, is a 404. Answers that need a key are
`private`: no shared cache may hand them to a client without one.

The list is read from the listing the producer writes beside the files at every publication
(`extracts.format.LISTING`), not from PostgreSQL: it is answered, like the files, with the
store down. Only where no listing has been written yet (an installation that has not made an
extract since it was upgraded) is the store's `extracts` table read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from repository_server.access import ReadAccess
from repository_server.extracts import format as fmt
from repository_server.jsontime import json_time_or_none
from repository_server.listeners.http.apikeys import authenticated, key_refusal
from repository_server.listeners.http.downloads import Handler, error
from repository_server.store.db import Store
from repository_server.store.models import ExtractRow

log = logging.getLogger(__name__)


class ExtractFiles:
    def __init__(self, store: Store, directory: Path, access: ReadAccess) -> None:
        self.store = store
        self.directory = directory
        self.access = access  # the read rule of the HTTP interface: extracts are private
        self._file_cache = f"{access.cache_scope(public=False)}, max-age=86400, immutable"
        self._list_cache = "no-cache" if access.shared(public=False) else "private, no-cache"
        self._listing: tuple[tuple[int, int, int], list[ExtractRow]] | None = None

    def routes(self) -> list[tuple[str, str, str, Handler]]:
        return [("GET", "/extracts", "extract-list", self.listing),
                ("GET", "/extracts/{name}", "extract", self.download)]

    async def published(self) -> list[ExtractRow]:
        """Published extracts whose file is here, newest first."""
        rows = self._read_listing()
        if rows is None:
            rows = await self.store.extracts()
        return [r for r in rows if (self.directory / r.name).is_file()]

    def _read_listing(self) -> list[ExtractRow] | None:
        """The producer's listing (re-read only when the file changes); None if there is
        none, or it cannot be read."""
        path = self.directory / fmt.LISTING
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._listing is not None and self._listing[0] == stamp:
                return self._listing[1]
            rows = fmt.parse_listing(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s cannot be read (%s): listing extracts from the store", path, exc)
            return None
        self._listing = (stamp, rows)
        return rows

    @staticmethod
    def describe(row: ExtractRow, url: str) -> dict[str, Any]:
        return {"name": row.name, "kind": row.kind,
                "published_at": json_time_or_none(row.published_at),
                "size": row.size, "sha256": row.sha256.hex() if row.sha256 else None,
                "counts": row.counts, "url": url + row.name}

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.access.may_read_private(authenticated=authenticated(request)):
            return None
        return error(403, key_refusal(request, "extracts"))

    async def listing(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        rows = await self.published()
        return web.json_response([self.describe(r, "/extracts/") for r in rows],
                                 headers={"Cache-Control": self._list_cache})

    async def download(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        name = request.match_info["name"]
        path = self.directory / name
        if not fmt.is_extract_name(name) or not path.is_file():
            return error(404, f"no published extract named {name!r} (see /extracts)")
        content_type = "application/gzip" if name.endswith(".gz") else "application/x-tar"
        # The Content-Type is given so that aiohttp does not read ".gz" as a Content-Encoding
        # (a client would then unpack the file it asked for).
        return web.FileResponse(path, headers={
            "Content-Type": content_type, "Cache-Control": self._file_cache,
            "Content-Disposition": f'inline; filename="{name}"'})
