"""The layering of docs/architecture.md, checked on the source: a listener never imports
another listener, and nothing below the listeners imports one (only the wiring in `server`
and the `cli` commands see them all); pure domain code imports only pure domain code, the
store only that (and the config), and the services nothing above them."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PKG = ROOT / "repository_server"
LISTENERS = ("http", "ldap", "lodge", "sftp", "metrics")
# The wiring sees every listener; the config asks a listener to check its own settings' syntax
# (the LDAP suffix is parsed by the LDAP DN parser).
WIRING = ("server", "cli", "__main__", "config")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("repository_server")}


def _listener_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "listeners" and parts[2] in LISTENERS:
        return parts[2]
    return None


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        module = _module(path)
        top = module.split(".")[1] if "." in module else ""
        own = _listener_of(module)
        for imported in sorted(_imports(path)):
            other = _listener_of(imported)
            if other is None or top in WIRING:
                continue
            if own is None:
                bad.append(f"{module} (below the listeners) imports {imported}")
            elif other != own:
                bad.append(f"{module} (listener {own}) imports {imported}")
    return bad


def test_no_listener_imports_another_and_no_service_imports_a_listener() -> None:
    assert _violations() == []


def test_the_checker_finds_imports_and_listeners() -> None:
    """The checker itself, so that the rule above cannot pass by seeing nothing."""
    assert any(m.startswith("repository_server.listeners.http.")
               for m in _imports(PKG / "listeners" / "http" / "portal" / "app.py"))
    assert _listener_of("repository_server.listeners.ldap.server") == "ldap"
    assert _listener_of(_module(PKG / "listeners" / "sftp.py")) == "sftp"
    assert _listener_of("repository_server.listeners.apidoc") is None


PURE = {"pki", "access", "events", "doctypes", "jsontime", "errors"}
# what each layer below the listeners may import besides itself (docs/architecture.md)
MAY_IMPORT = {
    **{top: PURE for top in PURE},
    "store": PURE | {"config"},
    **{top: PURE | {"config", "obs", "store", "lodging", "readmodel", "accounts", "extracts",
                    "service_levels"}
       for top in ("lodging", "readmodel", "accounts", "extracts", "service_levels")},
}
# Two modules of the layer above that are pure data and shared on purpose: the read
# replica's CRL record (the store hands the same values to the extracts), and the refused
# handshake counts' row (the store writes what obs/refusals.py counts).
SHARED_DATA = {"repository_server.readmodel.records", "repository_server.obs.refusals"}


def _below_its_layer(module: str, imported: str) -> bool:
    """Whether `module` may import `imported` (True for modules the table does not cover)."""
    top = module.split(".")[1] if "." in module else ""
    allowed = MAY_IMPORT.get(top)
    other = imported.split(".")[1] if "." in imported else ""
    return (allowed is None or other in ("", top) or other in allowed
            or any(imported == m or imported.startswith(m + ".") for m in SHARED_DATA))


def _layer_violations() -> list[str]:
    return [f"{_module(path)} imports {imported}" for path in sorted(PKG.rglob("*.py"))
            for imported in sorted(_imports(path)) if not _below_its_layer(_module(path), imported)]


def test_each_layer_imports_only_what_is_below_it() -> None:
    assert _layer_violations() == []


def test_the_layer_table_refuses_an_upward_import() -> None:
    assert not _below_its_layer("repository_server.pki.der", "repository_server.store.db")
    assert not _below_its_layer("repository_server.store.crls", "repository_server.lodging.service")
    assert not _below_its_layer("repository_server.lodging.service",
                                "repository_server.listeners.http.downloads")
    assert _below_its_layer("repository_server.store.crls", "repository_server.pki.der")
    assert _below_its_layer("repository_server.lodging.service", "repository_server.store.models")
