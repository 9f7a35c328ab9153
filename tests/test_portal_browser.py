"""The portal in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright,
one browser per test session. A relying party's day: sign in, the forced password change,
search by device and organisation EUI-64, a certificate page, DER and PEM downloads compared
with the store, a CRL with revoked entries, documents, sign out; the lockout after 5 wrong
passwords and its end an hour later (the portal's clock moved); the pages with JavaScript
off. axe-core (tests/node, pinned by the lock file) checks every page for accessibility:
no serious or critical violation. Screenshots of the main pages go to docs/screenshots/
(shown in the README).

Skipped, with the reason, only when Chromium or axe-core is missing outside CI; CI installs
both (.ci/run), and there a missing one is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import ROOT, Running
from tests.portal_client import new_user
from tests.test_portal import GOOD, move_clock

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM = os.environ.get("SMKI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
AXE = ROOT / "tests" / "node" / "node_modules" / "axe-core" / "axe.min.js"
SHOTS = ROOT / "docs" / "screenshots"
_missing = [what for what, ok in (("chromium", Path(CHROMIUM).is_file()),
                                  ("axe-core (npm ci in tests/node)", AXE.is_file())) if not ok]
if _missing and not os.environ.get("CI"):
    pytest.skip(f"{' and '.join(_missing)} not installed (.ci/run installs them)",
                allow_module_level=True)

Page = Any  # playwright.async_api.Page (typed loosely: the tests only call it)


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    assert not _missing, f"CI must have {', '.join(_missing)}"
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                            args=["--no-sandbox"])
        yield chromium
        await chromium.close()


async def new_page(browser: Any, base: str, **kw: Any) -> Page:
    context = await browser.new_context(base_url=base, accept_downloads=True,
                                        viewport={"width": 1280, "height": 900},
                                        locale="en-GB", **kw)
    context.set_default_timeout(15_000)
    return await context.new_page()


async def check_accessibility(page: Page, name: str) -> None:
    """axe-core on the page as it is: no serious or critical violation (WCAG 2.1 A and AA
    rules and best practices)."""
    if not await page.evaluate("() => typeof window.axe !== 'undefined'"):
        await page.evaluate(AXE.read_text())
    result = await page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations'], runOnly: {type: 'tag',"
        " values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})")
    bad = [{"id": v["id"], "impact": v["impact"], "help": v["help"],
            "nodes": [n["target"] for n in v["nodes"]][:5]}
           for v in result["violations"] if v["impact"] in ("serious", "critical")]
    assert not bad, f"{name}: {json.dumps(bad, indent=1)}"


async def shot(page: Page, name: str, *, full: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full)


async def no_sideways_scroll(page: Page) -> None:
    width = await page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways: {width}"


async def sign_in(page: Page, username: str, password: str) -> None:
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password", exact=True).fill(password)
    await page.get_by_role("button", name="Sign in").click()


async def change_password(page: Page, current: str, new: str) -> None:
    await page.get_by_label("Current password").fill(current)
    await page.get_by_label("New password", exact=True).fill(new)
    await page.get_by_label("New password again").fill(new)
    await page.get_by_role("button", name="Change password").click()


async def test_a_relying_party_day_in_the_browser(loaded: Running, browser: Any) -> None:
    repo = loaded.repo
    assert repo.store is not None
    device = loaded.objects("device")[0]
    org = loaded.objects("organisation")[0]
    initial = await new_user(repo, "ruth")
    page = await new_page(browser, loaded.http)
    # a bookmarked search sends her to sign in, and back to it afterwards
    await page.goto(f"/portal/search?q={device['eui64']}")
    assert page.url.startswith(f"{loaded.http}/portal/sign-in?next=")
    await check_accessibility(page, "sign-in")
    await page.keyboard.press("Tab")  # the first stop is the skip link
    assert await page.evaluate("() => document.activeElement.textContent") == \
        "Skip to main content"
    await shot(page, "sign-in")
    await sign_in(page, "ruth", "not her password")
    assert await page.get_by_role("alert").inner_text() != ""
    await check_accessibility(page, "sign-in failed")
    await sign_in(page, "ruth", initial)
    # first sign-in: the password must change before anything else
    await page.wait_for_url("**/portal/password")
    assert "You must choose a new password" in await page.content()
    await check_accessibility(page, "password change")
    await shot(page, "password")
    await change_password(page, initial, GOOD)
    await page.wait_for_url("**/portal/?password-changed=1")
    assert "Your password has been changed" in await page.get_by_role("status").inner_text()
    await check_accessibility(page, "home")
    # search by a device's EUI-64, written as the DCC client writes it
    await page.get_by_label("EUI-64 or certificate serial").fill(device["eui64"].lower().replace(
        "-", ":"))
    await page.get_by_role("button", name="Search").click()
    table = page.get_by_role("table")
    await table.wait_for()
    assert await table.locator("tbody tr").count() == 2
    assert device["serial"] in await table.inner_text()
    await check_accessibility(page, "search results")
    await shot(page, "search")
    # ... and by an organisation's, EUI-64 only
    await page.get_by_label("EUI-64 or certificate serial").fill(org["eui64"])
    await page.get_by_label("EUI-64", exact=True).check()
    await page.get_by_role("button", name="Search").click()
    await page.get_by_role("link", name=org["serial"]).wait_for()
    assert "Organisation" in await page.get_by_role("table").inner_text()
    # a certificate page, from the device search
    await page.goto(f"/portal/search?q={device['eui64']}")
    await page.get_by_role("link", name=device["serial"]).click()
    await page.get_by_role("heading", name=f"Certificate {device['serial']}").wait_for()
    text = await page.inner_text("main")
    for expected in ("Status: In use", device["eui64"], "Chain to the root", "Lint findings",
                     "Subject key identifier", "Valid until"):
        assert expected in text, expected
    await check_accessibility(page, "certificate")
    await shot(page, "certificate")
    stored = (await repo.store.certificates_by_serial(device["serial"]))[0].der
    for link, check in (("Download DER (binary)", lambda b: b == stored),
                        ("Download PEM (text)", lambda b: b.startswith(b"-----BEGIN CERTIFICATE")
                         and _pem_der(b) == stored)):
        async with page.expect_download() as info:
            await page.get_by_role("link", name=link).click()
        download = await info.value
        body = Path(await download.path()).read_bytes()
        assert check(body), (link, body[:60])
    # the chain: the issuing CA, then its root
    chain = page.locator("ol.chain a")
    assert await chain.count() == 2
    await chain.nth(1).click()
    await page.get_by_text("This is a self-signed root certificate.").wait_for()
    await check_accessibility(page, "root certificate")
    # narrow screen: nothing scrolls sideways but the tables inside their own region
    await page.set_viewport_size({"width": 360, "height": 780})
    await page.goto(f"/portal/certificates/{device['serial']}")
    await no_sideways_scroll(page)
    await check_accessibility(page, "certificate (narrow)")
    await shot(page, "certificate-narrow")
    await page.goto(f"/portal/search?q={device['eui64']}")
    await no_sideways_scroll(page)
    await page.set_viewport_size({"width": 1280, "height": 900})
    # revocation: the Organisation CRL with its revoked entries
    await page.get_by_role("link", name="Revocation lists").click()
    await page.get_by_role("heading", name="Revocation lists").wait_for()
    await check_accessibility(page, "revocation lists")
    await shot(page, "crls")
    crl = next(o for o in loaded.pki["objects"] if o["kind"] == "crl")
    await page.get_by_role("link", name=f"CRL of {crl['issuer_key_id']}").click()
    revoked = [o for o in loaded.objects("organisation") if o.get("revoked")]
    rows = page.get_by_role("region", name="Entries").locator("tbody tr")
    assert await rows.count() == len(revoked)
    assert revoked[0]["serial"] in await page.inner_text("main")
    await check_accessibility(page, "CRL")
    await shot(page, "crl")
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download this CRL (DER)").click()
    assert Path(await (await info.value).path()).read_bytes() == loaded.path(
        crl["path"]).read_bytes()
    # a revoked certificate, from the CRL: its status names the CRL
    await page.get_by_role("link", name=revoked[0]["serial"]).click()
    assert "Status: Revoked" in await page.inner_text("main")
    await check_accessibility(page, "revoked certificate")
    # documents, extracts, and a page that does not exist
    await page.get_by_role("link", name="Documents").click()
    await page.get_by_role("heading", name="SMKI documents").wait_for()
    await check_accessibility(page, "documents")
    await shot(page, "documents")
    await page.get_by_role("link", name="Extracts").click()
    await check_accessibility(page, "extracts")
    await page.goto("/portal/certificates/00FF00FF")
    assert "Certificate not found" in await page.inner_text("h1")
    await check_accessibility(page, "not found")
    # sign out
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/portal/sign-in?signed-out=1")
    assert "You have signed out" in await page.inner_text("main")
    await page.goto("/portal/documents")
    assert "/portal/sign-in" in page.url
    await page.context.close()


def _pem_der(pem: bytes) -> bytes:
    from repository_server.pki.pem import load_pem_or_der_certificates

    (der,) = load_pem_or_der_certificates(pem)
    return der


async def test_lockout_and_its_end_in_the_browser(loaded: Running, browser: Any) -> None:
    """5 wrong passwords within the hour lock the account: the right one is refused too, with
    the same message; an hour later (the portal's clock moved) it works."""
    initial = await new_user(loaded.repo, "sybil")
    page = await new_page(browser, loaded.https, ignore_https_errors=True)
    await page.goto("/portal/sign-in")
    await sign_in(page, "sybil", initial)
    await page.wait_for_url("**/portal/password")
    await change_password(page, initial, GOOD)
    await page.wait_for_url("**/portal/?password-changed=1")
    cookies = {c["name"]: c for c in await page.context.cookies()}
    assert cookies["smki_portal"]["httpOnly"] and cookies["smki_portal"]["secure"]
    assert cookies["smki_portal"]["sameSite"] == "Strict"
    await page.get_by_role("button", name="Sign out").click()
    messages = []
    for attempt in range(5):
        await sign_in(page, "sybil", f"wrong password {attempt}")
        messages.append(await page.get_by_role("alert").inner_text())
    await sign_in(page, "sybil", GOOD)
    messages.append(await page.get_by_role("alert").inner_text())
    assert len(set(messages)) == 1 and "Sign-in failed" in messages[0]
    await shot(page, "sign-in-failed", full=False)
    move_clock(loaded.repo, 3601)
    await sign_in(page, "sybil", GOOD)
    await page.wait_for_url("**/portal/")
    assert "Signed in as" in await page.inner_text("header")
    await page.context.close()


async def test_the_portal_works_with_javascript_off(loaded: Running, browser: Any) -> None:
    initial = await new_user(loaded.repo, "trent")
    device = loaded.objects("device")[0]
    page = await new_page(browser, loaded.http, java_script_enabled=False)
    await page.goto("/portal/")
    await sign_in(page, "trent", initial)
    await change_password(page, initial, GOOD)
    await page.get_by_label("EUI-64 or certificate serial").fill(device["serial"])
    await page.get_by_role("button", name="Search").click()
    await page.get_by_role("link", name=device["serial"]).click()
    assert "Status: In use" in await page.inner_text("main")
    await page.get_by_role("button", name="Sign out").click()
    assert "You have signed out" in await page.inner_text("main")
    await page.context.close()
