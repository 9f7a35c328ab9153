"""A cookie-keeping HTTP client of the portal for tests (aiohttp, redirects not followed), and
helpers to make portal users with known passwords."""

from __future__ import annotations

import html
import re
import ssl
from typing import Any

import aiohttp

from repository_server.cli import admin
from repository_server.server import Repository
from tests.conftest import Running

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')
_PASSWORD = re.compile(r"password[^:]*: (\S+)$", re.MULTILINE)


async def new_user(repo: Repository, name: str, role: str = "party") -> str:
    """A user as `users add` makes it; returns its initial (must-change) password."""
    assert repo.store is not None
    text = await admin.users_add(repo.store, name, role=role, with_key=False)
    found = _PASSWORD.search(text)
    assert found, text
    return found.group(1)


async def reset_user(repo: Repository, name: str) -> str:
    assert repo.store is not None
    text = await admin.users_reset(repo.store, name)
    found = _PASSWORD.search(text)
    assert found, text
    return found.group(1)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes,
                 set_cookies: list[str]) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.set_cookies = set_cookies

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def location(self) -> str:
        return self.headers.get("location", "")

    def csrf(self) -> str:
        found = _CSRF.search(self.text)
        assert found, self.text[:500]
        return html.unescape(found.group(1))


class PortalClient:
    """One browser's worth of state: the portal cookie, sent by hand so tests see it."""

    def __init__(self, base: str, ca: str | None = None) -> None:
        self.base = base
        self.cookie: str | None = None
        self.ssl: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca) if ca
                                           else False)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PortalClient:
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, data: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> Response:
        assert self._session is not None
        hdrs = dict(headers or {})
        if self.cookie is not None:
            hdrs["Cookie"] = f"smki_portal={self.cookie}"
        async with self._session.request(method, self.base + path, data=data, headers=hdrs,
                                         allow_redirects=False, ssl=self.ssl) as resp:
            body = await resp.read()
            cookies = resp.headers.getall("Set-Cookie", [])
            for c in cookies:
                name, _, rest = c.partition("=")
                if name == "smki_portal":
                    self.cookie = rest.split(";", 1)[0]
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body,
                            cookies)

    async def get(self, path: str, **kw: Any) -> Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> Response:
        return await self.request("POST", path, data=data, **kw)

    async def sign_in(self, username: str, password: str) -> Response:
        form = await self.get("/portal/sign-in")
        return await self.post("/portal/sign-in", {"csrf": form.csrf(), "username": username,
                                                   "password": password})

    async def sign_out(self) -> Response:
        home = await self.get("/portal/")
        return await self.post("/portal/sign-out", {"csrf": home.csrf()})

    async def change_password(self, current: str, new: str) -> Response:
        form = await self.get("/portal/password")
        return await self.post("/portal/password", {"csrf": form.csrf(), "current": current,
                                                    "new": new, "confirm": new})

    async def ready(self, running: Running, name: str, new: str) -> None:
        """A new user, signed in, with its password changed from the initial one to `new`."""
        initial = await new_user(running.repo, name)
        first = await self.sign_in(name, initial)
        assert first.status == 303 and first.location == "/portal/password", first.text
        changed = await self.change_password(initial, new)
        assert changed.status == 303, changed.text
