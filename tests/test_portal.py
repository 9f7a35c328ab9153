"""The portal over real sockets without a browser: sign-in rules (forced password change,
lockout counted in PostgreSQL across two servers, expiry, fixation, CSRF, enumeration),
pages, downloads, bad input and CPM 8 counting. tests/test_portal_browser.py drives the same
pages in Chromium."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from repository_server.accounts.keys import check_password
from repository_server.listeners.http.portal.app import Portal
from repository_server.pki.pem import load_pem_or_der_certificates
from repository_server.pki.testpki import DEVICE_POLICY_OID
from repository_server.server import Repository
from tests.conftest import REALDATA, ROOT, Running, start_repository
from tests.portal_client import PortalClient, new_user, reset_user

pytestmark = pytest.mark.asyncio(loop_scope="session")

GOOD = "correct horse battery staple"


def portal(repo: Repository) -> Portal:
    assert repo.portal is not None
    return repo.portal


def move_clock(repo: Repository, seconds: float) -> None:
    """Move the portal's clock (what tests of the lockout hour and expiry do)."""
    auth = portal(repo).auth
    before = auth.clock
    auth.clock = lambda: before() + seconds


async def audit_actions(repo: Repository) -> list[tuple[str, str, str | None]]:
    assert repo.store is not None
    return [(e["action"], e["outcome"], e["detail"].get("reason"))
            for e in await repo.store.audit_entries() if e["action"].startswith("portal.")]


# -- sign-in, forced change, cookies, fixation ----------------------------------------------------
async def test_sign_in_forced_change_cookies_and_fixation(loaded: Running) -> None:
    initial = await new_user(loaded.repo, "alice")
    for base, ca, secure in ((loaded.http, None, False), (loaded.https, loaded.tls_ca, True)):
        async with PortalClient(base, ca) as c:
            r = await c.get("/portal/search?q=00-11")
            assert r.status == 303
            assert r.location == "/portal/sign-in?next=%2Fportal%2Fsearch%3Fq%3D00-11"
            form = await c.get(r.location)
            assert form.status == 200 and "<h1>Sign in</h1>" in form.text
            (cookie,) = form.set_cookies
            attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
            assert {"httponly", "samesite", "path"} <= attrs
            assert "SameSite=Strict" in cookie and "Path=/portal" in cookie
            assert ("secure" in attrs) is secure
            assert form.headers["cache-control"] == "no-store"
            assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
            before = c.cookie
            assert before and before.startswith("a.")
            # the form carries where to go next
            assert 'name="next" value="/portal/search?q=00-11"' in form.text
            if not secure:  # first sign-in: a password change is forced
                r = await c.post("/portal/sign-in", {"csrf": form.csrf(), "username": "alice",
                                                     "password": initial,
                                                     "next": "/portal/search?q=00-11"})
                assert r.status == 303 and r.location == "/portal/password"
                assert c.cookie != before and c.cookie and c.cookie.startswith("s.")  # fixation
                assert (await c.get("/portal/search?q=1")).location == "/portal/password"
                page = await c.get("/portal/password")
                assert "You must choose a new password" in page.text
                weak = await c.post("/portal/password", {"csrf": page.csrf(), "current": initial,
                                                         "new": "short", "confirm": "short"})
                assert weak.status == 200 and "at least 12 characters" in weak.text
                wrong = await c.post("/portal/password", {"csrf": page.csrf(), "current": "nope",
                                                          "new": GOOD, "confirm": GOOD})
                assert "The current password is not right" in wrong.text
                signed_in = c.cookie
                done = await c.change_password(initial, GOOD)
                assert done.status == 303 and done.location == "/portal/?password-changed=1"
                assert c.cookie != signed_in  # a new session after the change
                home = await c.get(done.location)
                assert home.status == 200 and "Your password has been changed" in home.text
                # the session from before the change has ended (the store deleted it)
                old = PortalClient(base)
                async with old:
                    old.cookie = signed_in
                    r = await old.get("/portal/")
                    assert r.status == 303 and "ended=1" in r.location
                # the anonymous token from before sign-in grants nothing
                async with PortalClient(base) as planted:
                    planted.cookie = before
                    assert (await planted.get("/portal/")).status == 303
            else:
                r = await c.sign_in("alice", GOOD)
                assert r.status == 303 and r.location == "/portal/"
                assert "Secure" in r.set_cookies[0] and c.cookie != before
    assert loaded.repo.store is not None
    row = await loaded.repo.store.user("alice")
    assert row is not None and not row.must_change_password
    assert check_password(GOOD, row.password_hash)
    actions = await audit_actions(loaded.repo)
    assert ("portal.sign-in", "ok", None) in actions
    assert ("portal.password-change", "ok", None) in actions


async def test_a_planted_session_token_is_replaced_at_sign_in(loaded: Running) -> None:
    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "bob", GOOD)
        async with PortalClient(loaded.http) as victim:
            planted = "s.attacker-chose-this-token-0123456789abcdef"
            victim.cookie = planted
            r = await victim.get("/portal/sign-in")  # unknown session token: a fresh anonymous one
            assert r.status == 200 and victim.cookie != planted
            r = await victim.post("/portal/sign-in", {"csrf": r.csrf(), "username": "bob",
                                                      "password": GOOD})
            assert r.status == 303 and victim.cookie not in (planted, None)
            async with PortalClient(loaded.http) as attacker:
                attacker.cookie = planted
                assert (await attacker.get("/portal/")).status == 303


# -- CSRF -------------------------------------------------------------------------------------------
async def test_csrf_is_checked_on_every_form(loaded: Running) -> None:
    async with PortalClient(loaded.http) as c, PortalClient(loaded.http) as other:
        form = await c.get("/portal/sign-in")
        foreign = (await other.get("/portal/sign-in")).csrf()
        for data in ({"username": "x", "password": "y"},
                     {"csrf": "", "username": "x", "password": "y"},
                     {"csrf": "0" * 40, "username": "x", "password": "y"},
                     {"csrf": foreign, "username": "x", "password": "y"}):
            r = await c.post("/portal/sign-in", data)
            assert r.status == 403, data
            assert "CSRF check" in r.text and "This form was not accepted" in r.text
        async with PortalClient(loaded.http) as nocookie:  # a cross-site POST: no cookie at all
            r = await nocookie.post("/portal/sign-in", {"csrf": form.csrf(), "username": "x",
                                                        "password": "y"})
            assert r.status == 403
        await c.ready(loaded, "carol", GOOD)
        signed = c.cookie
        for path, data in (("/portal/sign-out", {}), ("/portal/sign-out", {"csrf": form.csrf()}),
                           ("/portal/password", {"current": GOOD, "new": GOOD + "!",
                                                 "confirm": GOOD + "!"})):
            r = await c.post(path, data)
            assert r.status == 403 and "CSRF check" in r.text, path
        assert c.cookie == signed and (await c.get("/portal/")).status == 200  # still signed in
        home = await c.get("/portal/")
        r = await c.post("/portal/sign-out", {"csrf": home.csrf()})
        assert r.status == 303 and r.location == "/portal/sign-in?signed-out=1"
        assert c.cookie != signed and c.cookie and c.cookie.startswith("a.")
        r = await c.get(r.location)
        assert "You have signed out" in r.text
        c.cookie = signed  # the signed-out session is gone
        assert (await c.get("/portal/")).status == 303
    actions = await audit_actions(loaded.repo)
    assert ("portal.sign-out", "ok", None) in actions


# -- expiry -------------------------------------------------------------------------------------------
async def test_a_use_is_stored_before_its_page_is_answered(loaded: Running) -> None:
    """A session's last use reaches PostgreSQL before the page that used it is answered, and
    at most once per 30 s however many pages are asked at once: of six at once, one waits for
    the write and five are answered. Written in the background, a cached copy dropped in
    between (a users NOTIFY does that) was read again with the older use and the session
    ended as idle."""
    repo = loaded.repo
    settings = portal(repo).settings
    assert repo.store is not None
    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "uma", GOOD)
        move_clock(repo, settings.session_idle_seconds - 5)
        async with repo.store.pool.acquire() as conn:
            held = conn.transaction()
            await held.start()
            await conn.execute("SELECT 1 FROM portal_sessions FOR UPDATE")  # the write waits
            uses = [asyncio.ensure_future(c.get("/portal/")) for _ in range(6)]
            answered, waiting = await asyncio.wait(uses, timeout=1.0)
            await held.rollback()
        assert [r.status for r in await asyncio.gather(*uses)] == [200] * 6
        assert len(waiting) == 1, "the page was answered before its use was stored"
        assert len(answered) == 5  # one write for the six, not six
        portal(repo).auth.forget_sessions("uma")  # as a users NOTIFY does
        move_clock(repo, settings.session_idle_seconds - 5)
        assert (await c.get("/portal/")).status == 200  # idle-5 s since the stored use


async def test_idle_and_absolute_expiry(loaded: Running) -> None:
    repo = loaded.repo
    settings = portal(repo).settings
    assert repo.store is not None
    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "dave", GOOD)
        move_clock(repo, settings.session_idle_seconds - 5)
        assert (await c.get("/portal/")).status == 200  # used just in time
        move_clock(repo, settings.session_idle_seconds - 5)
        assert (await c.get("/portal/")).status == 200  # the last use counts, not sign-in
        move_clock(repo, settings.session_idle_seconds + 1)
        r = await c.get("/portal/")
        assert r.status == 303 and r.location.endswith("ended=1")
        assert "Your session has ended" in (await c.get(r.location)).text
        # absolute: used every few minutes, it still ends after session_absolute_seconds
        assert (await c.sign_in("dave", GOOD)).status == 303
        used = 0
        step = settings.session_idle_seconds // 2
        while used + step < settings.session_absolute_seconds:
            move_clock(repo, step)
            used += step
            assert (await c.get("/portal/")).status == 200, used
        move_clock(repo, settings.session_absolute_seconds - used + 1)
        assert (await c.get("/portal/")).status == 303
    count = await repo.store.pool.fetchval(
        "SELECT count(*) FROM portal_sessions WHERE user_name = 'dave'")
    assert count == 0  # expired sessions are deleted
    # a session nobody comes back to is deleted at a later sign-in (anyone's)
    async with PortalClient(loaded.http) as abandoned, PortalClient(loaded.http) as later:
        assert (await abandoned.sign_in("dave", GOOD)).status == 303
        move_clock(repo, settings.session_idle_seconds + 1)
        assert (await later.sign_in("dave", GOOD)).status == 303
        for _ in range(50):
            count = await repo.store.pool.fetchval(
                "SELECT count(*) FROM portal_sessions WHERE user_name = 'dave'")
            if count == 1:
                break
            await asyncio.sleep(0.05)
        assert count == 1
    reasons = [d for a, _o, d in await audit_actions(repo) if a == "portal.session-expired"]
    assert reasons == [None, None] or len(reasons) == 2


# -- enumeration and lockout -------------------------------------------------------------------------
async def test_same_answer_for_unknown_user_wrong_password_disabled_and_locked(
        loaded: Running) -> None:
    repo = loaded.repo
    assert repo.store is not None
    await new_user(repo, "erin")
    await new_user(repo, "frank")
    from repository_server.cli import admin

    await admin.users_disable(repo.store, "frank")
    async with PortalClient(loaded.http) as c:
        form = await c.get("/portal/sign-in")
        answers = []
        for name in ("nobody-here", "erin", "frank"):
            r = await c.post("/portal/sign-in", {"csrf": form.csrf(), "username": name,
                                                 "password": "wrong password 1"})
            answers.append((r.status, r.text.replace(f'value="{name}"', 'value="NAME"'),
                            r.set_cookies))
        assert answers[0] == answers[1] == answers[2]
        assert answers[0][0] == 200 and "Sign-in failed" in answers[0][1]
    reasons = [d for a, _o, d in await audit_actions(repo) if a == "portal.sign-in"]
    assert {"unknown user", "wrong password"} <= set(reasons)


async def test_lockout_counted_in_postgresql_across_two_servers(loaded: Running,
                                                               tmp_path: Path) -> None:
    """3 wrong passwords on one server and 2 on another lock the account on both for an hour;
    the right password then fails too, with the same message; an hour later it works."""
    repo_a = loaded.repo
    repo_b = await start_repository(tmp_path / "b", loaded.pki,
                                    repo_a.config.database.url)
    try:
        base_b = f"http://127.0.0.1:{repo_b.bound['http'].port}"
        async with PortalClient(loaded.http) as a, PortalClient(base_b) as b:
            await a.ready(loaded, "grace", GOOD)
            await a.sign_out()
            for client in (a, b, a, b, a):
                r = await client.sign_in("grace", "not the password")
                assert r.status == 200 and "Sign-in failed" in r.text
            for client in (a, b):
                r = await client.sign_in("grace", GOOD)
                assert r.status == 200 and "Sign-in failed" in r.text, "locked: refused"
            assert repo_a.store is not None
            state = await repo_a.store.pool.fetchrow(
                "SELECT failures, locked_until FROM portal_accounts WHERE user_name = 'grace'")
            assert state["failures"] == [] and state["locked_until"] is not None
            for repo in (repo_a, repo_b):
                move_clock(repo, 3599)
            assert (await b.sign_in("grace", GOOD)).status == 200  # not yet
            for repo in (repo_a, repo_b):
                move_clock(repo, 2)
            r = await b.sign_in("grace", GOOD)
            assert r.status == 303 and r.location == "/portal/"
            r = await a.sign_in("grace", GOOD)
            assert r.status == 303
        actions = await audit_actions(repo_a)
        assert ("portal.lockout", "locked", None) in actions
        assert ("portal.sign-in", "refused", "locked") in actions
    finally:
        await repo_b.stop()


async def test_failures_older_than_the_window_do_not_lock(loaded: Running) -> None:
    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "heidi", GOOD)
        await c.sign_out()
        for _ in range(4):
            await c.sign_in("heidi", "nope")
        move_clock(loaded.repo, 3601)
        for _ in range(4):
            await c.sign_in("heidi", "nope")
        assert (await c.sign_in("heidi", GOOD)).status == 303  # 4 + 4 in two hours: no lock
        await c.sign_out()
        # a success forgets the failures
        for _ in range(4):
            await c.sign_in("heidi", "nope")
        assert (await c.sign_in("heidi", GOOD)).status == 303


async def test_operator_reset_and_disable_end_sessions_and_force_a_change(loaded: Running) -> None:
    repo = loaded.repo
    assert repo.store is not None
    from repository_server.cli import admin

    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "ivan", GOOD)
        assert (await c.get("/portal/")).status == 200
        temporary = await reset_user(repo, "ivan")
        for _ in range(50):  # the other processes hear of it through NOTIFY
            r = await c.get("/portal/")
            if r.status == 303:
                break
            await asyncio.sleep(0.05)
        assert r.status == 303 and "ended=1" in r.location
        assert (await c.sign_in("ivan", GOOD)).status == 200  # the old password is gone
        r = await c.sign_in("ivan", temporary)
        assert r.status == 303 and r.location == "/portal/password"
        assert (await c.get("/portal/crls")).location == "/portal/password"
        assert (await c.change_password(temporary, GOOD + " 2")).status == 303
        assert (await c.get("/portal/crls")).status == 200
        await admin.users_disable(repo.store, "ivan")
        for _ in range(50):
            r = await c.get("/portal/crls")
            if r.status == 303:
                break
            await asyncio.sleep(0.05)
        assert r.status == 303
        assert (await c.sign_in("ivan", GOOD + " 2")).status == 200  # disabled: refused


# -- pages and downloads --------------------------------------------------------------------------
async def test_search_certificate_crl_documents_downloads_and_cpm(loaded: Running) -> None:
    repo = loaded.repo
    device = loaded.objects("device")[0]
    org = loaded.objects("organisation")[0]
    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "judy", GOOD)
        eui = device["eui64"]
        for spelling in (eui, eui.lower(), eui.replace("-", ""), eui.replace("-", ":")):
            r = await c.get(f"/portal/search?q={spelling}")
            assert r.status == 200, spelling
            assert "2 certificates for" in r.text and device["serial"] in r.text
            assert "Device" in r.text and "(no expiry)" in r.text
        r = await c.get(f"/portal/search?q={org['eui64']}&by=eui")
        assert r.status == 200 and org["serial"] in r.text and "Organisation" in r.text
        r = await c.get(f"/portal/search?q={org['serial'].lower()}&by=serial")
        assert r.status == 200 and "1 certificate for" in r.text
        # bad input: a message in the page, never a 500
        r = await c.get("/portal/search?q=not-an-eui&by=eui")
        assert r.status == 400 and "That is not an EUI-64" in r.text
        r = await c.get("/portal/search?q=" + "A" * 5_000)  # (aiohttp refuses lines over 8 KiB)
        assert r.status == 400 and "That is too long" in r.text
        r = await c.get("/portal/search?q=00-00-00-00-00-00-00-01")
        assert r.status == 200 and "No certificates found" in r.text
        r = await c.get("/portal/search?q=%3Cscript%3Ealert(1)%3C/script%3E")
        assert "<script>" not in r.text and "&lt;script&gt;" in r.text
        # the certificate page
        r = await c.get(f"/portal/certificates/{device['serial']}")
        assert r.status == 200
        for text in ("Status: In use", "Device", device["eui64"], "Key usage",
                     "Subject key identifier", DEVICE_POLICY_OID, "Chain to the root",
                     "Download DER"):
            assert text in r.text, text
        links = re.findall(r'href="(/portal/certificates/[^"]+)"', r.text)
        assert len(links) == 2  # the Issuing DCA and the Root DCA
        root = await c.get(links[-1].replace("&amp;", "&"))
        assert root.status == 200 and "self-signed root" in root.text
        # downloads: byte-identical with the store, as attachments
        assert repo.store is not None
        stored = (await repo.store.certificates_by_serial(device["serial"]))[0].der
        href = re.search(r'href="(/portal/download/certificates/[^"]+)"', r.text)
        assert href
        der = await c.get(href.group(1).replace("&amp;", "&"))
        assert der.status == 200 and der.body == stored
        assert der.headers["content-disposition"] == f'attachment; filename="{device["serial"]}"' \
            or der.headers["content-disposition"].startswith("attachment")
        pem = await c.get(f"/portal/download/certificates/{device['serial']}.pem")
        assert pem.status == 200 and load_pem_or_der_certificates(pem.body) == [stored]
        # a revoked organisation certificate: the status names the CRL
        revoked = next(o for o in loaded.objects("organisation") if o.get("revoked"))
        r = await c.get(f"/portal/certificates/{revoked['serial']}")
        assert "Status: Revoked" in r.text and "on the current CRL of its issuer, number" in r.text
        crl_link = re.search(r'href="(/portal/crls/[^"]+)"', r.text)
        assert crl_link
        crl = await c.get(crl_link.group(1).replace("&amp;", "&"))
        assert crl.status == 200 and revoked["serial"] in crl.text and "History" in crl.text
        # unknown and malformed serials
        r = await c.get("/portal/certificates/0123456789ABCDEF")
        assert r.status == 404 and "There is no certificate with serial" in r.text
        r = await c.get("/portal/certificates/not-hex")
        assert r.status == 404 and "not a certificate serial" in r.text
        # revocation lists
        r = await c.get("/portal/crls")
        assert r.status == 200 and "ARL" in r.text and "CRL" in r.text
        assert "Overdue" not in r.text
        keys = re.findall(r'href="/portal/crls/([0-9A-F]+)"', r.text)
        assert len(keys) == 3
        crl_obj = next(o for o in loaded.pki["objects"] if o["kind"] == "crl")
        page = await c.get(f"/portal/crls/{crl_obj['issuer_key_id']}")
        assert page.status == 200 and "Revoked certificates" in page.text
        n_revoked = len(re.findall(r"<tr><td class=\"mono\">", page.text))
        assert n_revoked >= 2
        dl = re.search(r'href="(/portal/download/crls/[^"]+)"', page.text)
        assert dl
        body = (await c.get(dl.group(1))).body
        assert body == loaded.path(crl_obj["path"]).read_bytes()
        # paging
        settings = portal(repo).settings
        portal(repo).settings = dataclasses.replace(settings, page_size=1)
        try:
            p2 = await c.get(f"/portal/crls/{crl_obj['issuer_key_id']}?page=2")
            assert f"Page 2 of {n_revoked}" in p2.text and "Entries 2 to 2" in p2.text
            assert (await c.get(f"/portal/crls/{crl_obj['issuer_key_id']}?page=999")).status == 200
        finally:
            portal(repo).settings = settings
        # bad CRL addresses
        assert (await c.get("/portal/crls/XYZ")).status == 404
        assert (await c.get(f"/portal/crls/{crl_obj['issuer_key_id']}?number=12345")).status == 404
        assert (await c.get(f"/portal/crls/{crl_obj['issuer_key_id']}?number=1" + "9" * 60)
                ).status == 200  # not a number we take: the current one
        # documents
        r = await c.get("/portal/documents")
        assert r.status == 200
        doc = next(o for o in loaded.pki["objects"] if o["kind"] == "document")
        assert doc["name"] in r.text
        href = re.search(r'href="(/portal/download/documents/[^"]+)"', r.text)
        assert href
        got = await c.get(href.group(1))
        assert got.status == 200 and got.headers["content-disposition"].startswith("attachment")
        assert (await c.get("/portal/extracts")).status == 200
        # a CRL whose nextUpdate has passed is flagged
        move_clock(repo, 400 * 86400)
        await c.sign_in("judy", GOOD)
        r = await c.get("/portal/crls")
        assert "Overdue" in r.text
        r = await c.get(f"/portal/crls/{crl_obj['issuer_key_id']}")
        assert "Next update has passed" in r.text
    # CPM 8: portal pages and downloads counted for the user, interface "portal"
    levels = repo.levels
    assert levels is not None
    counted = {(k[2], k[3]): v.received + v.refused for k, v in levels.counts.items()
               if k[1] == "portal"}
    refused = {(k[2], k[3]): v.refused for k, v in levels.counts.items() if k[1] == "portal"}
    assert counted[("search", "judy")] >= 8
    assert refused[("search", "judy")] >= 1  # the malformed ones (400): not in the percentage
    assert counted[("certificate", "judy")] >= 3
    assert counted[("download-certificate", "judy")] == 2
    assert counted[("download-crl", "judy")] == 1
    assert counted[("download-document", "judy")] == 1
    assert ("sign-in", "judy") not in counted


async def test_odd_requests_never_500(loaded: Running) -> None:
    async with PortalClient(loaded.http) as c:
        await c.ready(loaded, "mallory", GOOD)
        for path in ("/portal/certificates/%00", "/portal/certificates/" + "F" * 5000,
                     "/portal/certificates/AB?issuer=zz", "/portal/crls/%ff",
                     "/portal/crls/AB?page=-1&number=-3", "/portal/search?q=%ff%fe&by=%00",
                     "/portal/search?by=serial&q=" + "0" * 100, "/portal/search?q=&by=eui",
                     "/portal/download/certificates/zz", "/portal/download/crls/AB/zz",
                     "/portal/download/documents/none/1", "/portal/static/nothing.css",
                     "/portal/nothing-here", "/portal/sign-in?next=//evil.example/"):
            r = await c.get(path)
            assert r.status < 500, (path, r.status, r.text[:300])
        r = await c.post("/portal/sign-in", {"csrf": "x"}, headers={"Content-Type": "text/plain"})
        assert r.status == 303 or r.status < 500
        # an open redirect is refused: `next` must stay inside the portal
        async with PortalClient(loaded.http) as d:
            form = await d.get("/portal/sign-in?next=https://evil.example/")
            assert 'name="next" value="/portal/"' in form.text


async def test_static_css_and_root_redirect(server: Running) -> None:
    async with PortalClient(server.http) as c:
        r = await c.get("/portal/static/portal.css")
        assert r.status == 200 and r.headers["content-type"].startswith("text/css")
        again = await c.get("/portal/static/portal.css", headers={"If-None-Match": r.headers["etag"]})
        assert again.status == 304
        assert (await c.get("/")).location == "/portal/"
        assert (await c.get("/portal")).location == "/portal/"
        r = await c.get("/no/such/thing")  # the catch-all stays last
        assert r.status == 404 and r.headers["content-type"].startswith("application/json")


@pytest.mark.skipif(not REALDATA.is_dir(), reason="shared/realdata not available")
async def test_realdata_certificate_pages(server: Running) -> None:
    """Real DCC test certificates (duis-templates: the ZAZ1 issuing CA Z1 and certificates
    it issued; its root ZA is not public): their pages show the real quirks as findings and
    a chain that stops at Z1."""
    from repository_server.lodging.bulk import import_directory
    from repository_server.lodging.service import Actor, LodgingService

    assert server.repo.store is not None
    service = LodgingService(server.repo.store, after_commit=server.repo.catalog.synced)
    report = await import_directory(service, REALDATA / "duis-templates", Actor("operator:test"),
                                    allow_unverified_issuer=True, note=lambda _n: None)
    service.close()
    assert report.stored == 18
    z1 = "71872BDBC82789BC1401CE01BA06ADA3"
    async with PortalClient(server.http) as c:
        await c.ready(server, "realdata-reader", GOOD)
        r = await c.get(f"/portal/certificates/{z1}")
        assert r.status == 200 and "Issuing CA" in r.text and "CN=Z1" in r.text
        assert "is not in the repository" in r.text  # ZA, the root, is not public
        rows = await server.repo.store.pool.fetch(
            "SELECT serial, kind FROM certificates WHERE issuer_verified AND kind <> 'ca'")
        assert rows
        r = await c.get(f"/portal/certificates/{rows[0]['serial']}")
        assert r.status == 200 and f"/portal/certificates/{z1}" in r.text
        assert "dn-mixed-string-types" in r.text  # PrintableString issuer, UTF8String subject
        r = await c.get("/portal/search?q=" + "00DB1234567890A4")
        assert r.status == 200


async def test_templates_and_stylesheet_are_in_the_wheel(tmp_path: Path) -> None:
    """A non-editable install has the templates and the stylesheet (package data)."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
               str(ROOT)]
    res = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                  timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.name for p in (ROOT / "repository_server/listeners/http/portal/templates").glob("*.html")}
    assert {f"repository_server/listeners/http/portal/templates/{t}" for t in templates} <= names
    assert "repository_server/listeners/http/portal/static/portal.css" in names
    assert "repository_server/store/migrations/0003_portal.sql" in names
