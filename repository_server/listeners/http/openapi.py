"""The OpenAPI 3.1 description of the read listeners' HTTP API, served at GET /openapi.json.
No I/O: `describe()` builds the document from the same constants the handlers use.

It covers the downloads, the web service, extracts, the operator reports, /healthz, /readyz
and itself (Prometheus /metrics is on its own listener, `listeners.metrics`). Not described:
the portal's HTML pages (under /portal/ and `/`), the catch-all 404 for any other path, and
HEAD (answered for every GET, with the GET's headers).
tests/test_openapi.py checks that the paths here are exactly the routes the server registers
and fuzzes every operation against a running server (schemathesis).
"""

from __future__ import annotations

from typing import Any

from repository_server import doctypes
from repository_server.listeners.apidoc import JSON, json_answer
from repository_server.listeners.apidoc import path_param as _path
from repository_server.listeners.apidoc import query_param as _query
from repository_server.listeners.apidoc import ref as _ref
from repository_server.listeners.http.downloads import (
    MAX_CRL_NUMBER,
    MAX_DOC_VERSION,
    PEM,
    PKIX_CERT,
    PKIX_CRL,
)

XML = "application/xml"

_HEX_ID = r"^([0-9A-Fa-f]{2}){1,64}"
_SERIAL = r"^[0-9A-Fa-f]{1,40}(\.(pem|der|cer|crt))?$"
_EUI64 = r"^[0-9A-Fa-f]{2}(-[0-9A-Fa-f]{2}){7}$"


def _error(description: str) -> dict[str, Any]:
    return json_answer(description, "Error")


def _list(item: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {JSON: {"schema": {"type": "array", "items": _ref(item)}}}}


def _bytes(description: str, *types: str) -> dict[str, Any]:
    return {"description": description,
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in types}}


_CONDITIONAL = [
    {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "ETag(s) held: 304 when one matches (weak comparison)"},
    {"name": "If-Modified-Since", "in": "header", "required": False,
     "schema": {"type": "string"}, "description": "an HTTP date: 304 when not modified since"},
]
_NOT_MODIFIED = {"description": "not modified (the validators and caching headers only)"}
_UNAVAILABLE = _error("the store or the read replica cannot answer now; Retry-After says when"
                      " to try again")
_MALFORMED = {"text/plain": {"schema": {"type": "string"}}}  # refused by the HTTP parser
_KEYED: list[dict[str, list[str]]] = [{"apiKeyHeader": []}, {"apiKeyQuery": []}]
_KEY_OR_NONE = [{}, *_KEYED]


def _with_malformed(responses: dict[str, Any]) -> dict[str, Any]:
    """Any operation: a request line or header the HTTP parser refuses is a text/plain 400."""
    bad = responses.get("400", {"description": "malformed request"})
    return {**responses, "400": {**bad, "content": {**bad.get("content", {}), **_MALFORMED}}}


def _get(summary: str, responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None,
         security: list[dict[str, list[str]]] | None = None, tag: str = "downloads"
         ) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag],
                          "responses": _with_malformed({**responses, "503": _UNAVAILABLE})}
    if parameters:
        op["parameters"] = parameters
    if security is not None:
        op["security"] = security
    return {"get": op}


def _ws(summary: str, root: str, field_names: list[str], pattern: str) -> dict[str, Any]:
    xml_answer = {"description": "", "content": {XML: {"schema": {"type": "string"}}}}
    answers = {
        "200": "found: the answer's ResponseCode is 200",
        "401": "invalid request (the ResponseMessage names the problem), or a body over"
               " web.ws_max_body_bytes",
        "402": "nothing found",
        "403": "no API key, or an unknown or disabled one",
        "408": "the body did not arrive within web.body_timeout_seconds",
        "503": "the store is unavailable and the answer is not in memory (Retry-After)",
    }
    return {"post": {
        "summary": summary, "tags": ["web service"],
        "security": [{"apiKeyQuery": []}, {"apiKeyHeader": []}],
        "requestBody": {"required": True, "content": {XML: {"schema": {
            "type": "object", "xml": {"name": root},
            "properties": {f: {"type": "string", "pattern": pattern} for f in field_names},
            "minProperties": 1, "maxProperties": 1}}}},
        "responses": _with_malformed({code: {**xml_answer, "description": text}
                                      for code, text in answers.items()}),
    }}


def _schemas() -> dict[str, Any]:
    text, nullable_text = {"type": "string"}, {"type": ["string", "null"]}
    integer, hexdigest = {"type": "integer"}, {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    return {
        "Error": {"type": "object", "required": ["status", "reason"],
                  "properties": {"status": integer, "reason": {"type": "string", "minLength": 1}}},
        "Crl": {"type": "object", "required": ["kind", "issuer_key_id", "crl_number", "url"],
                "properties": {"kind": {"enum": ["crl", "arl"]}, "issuer": text,
                               "issuer_key_id": text, "crl_number": integer,
                               "this_update": text, "next_update": nullable_text,
                               "overdue": {"type": "boolean"}, "revoked": integer,
                               "sha256": hexdigest, "size": integer, "url": text}},
        "CrlVersion": {"type": "object", "required": ["crl_number", "this_update", "url"],
                       "properties": {"crl_number": integer, "this_update": text,
                                      "next_update": nullable_text, "url": text}},
        "Document": {"type": "object",
                     "required": ["name", "version", "content_type", "size", "sha256", "url"],
                     "properties": {"name": text, "version": integer,
                                    "content_type": text, "size": integer, "sha256": hexdigest,
                                    "lodged_at": text, "url": text}},
        "Extract": {"type": "object", "required": ["name", "kind", "url"],
                    "properties": {"name": text, "kind": text, "published_at": nullable_text,
                                   "size": {"type": ["integer", "null"]},
                                   "sha256": {"type": ["string", "null"]},
                                   "counts": {"type": "object"}, "url": text}},
        "Report": {"type": "object"},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": text}},
    }


def describe(version: str) -> dict[str, Any]:
    """The OpenAPI document (a JSON-ready dict)."""
    key_id = _path("key", "issuer key identifier: an even number of hex digits",
                   pattern=_HEX_ID + "$", maxLength=128)
    cert_responses = {
        "200": _bytes("the certificate, DER (or PEM: a .pem name or Accept:"
                      f" {PEM})", PKIX_CERT, PEM),
        "300": _error("the serial is not unique: add ?issuer="),
        "304": _NOT_MODIFIED,
        "400": _error("the serial or issuer does not parse"),
        "403": _error("organisation and device certificates need an API key (unless"
                      " web.open_reads); 'unknown or disabled API key' for a wrong one"),
        "404": _error("no such certificate"),
    }
    crl_file = {"200": _bytes("the CRL/ARL, DER", PKIX_CRL), "304": _NOT_MODIFIED,
                "400": _error("the issuer key identifier does not parse"),
                "404": _error("no such CRL/ARL, or not a CRL path")}
    doc_file = {"200": _bytes("the document, as an attachment (Content-Security-Policy:"
                              " sandbox, nosniff)", *doctypes.ALLOWED),
                "304": _NOT_MODIFIED, "404": _error("no such document or version")}
    hashes = {"certHash": "the certificate", "iHash": "the issuer Name",
              "sHash": "the subject Name",
              "iAndSHash": "IssuerAndSerialNumber (issuer Name and serial)",
              "sKIDHash": "the subject key identifier's octets"}

    def search(what: str, content_type: str, attributes: list[str]) -> dict[str, Any]:
        # exactly one attribute: one query object of one property, each its own parameter
        properties: dict[str, Any] = {
            a: {"type": "string", "pattern": "^[A-Za-z0-9+/]{27}$",
                "description": f"base64 SHA-1 of {hashes[a]} without the trailing '='"}
            for a in attributes}
        properties["name"] = {"type": "string", "pattern": r"\S", "maxLength": 1024,
                              "description": "commonName or the whole RFC 4514 name, any case"}
        return _get(f"RFC 4387 {what} store: exactly one search attribute", {
            "200": _bytes(f"one {what} ({content_type}); several: multipart/mixed, at most"
                          " web.search_max_results, X-Total-Count saying how many matched",
                          content_type, "multipart/mixed"),
            "400": _error("not exactly one search attribute, an unknown one, or a key that is"
                          " not 27 characters of base64 (RFC 4387 section 2.1)"),
            "403": _error("organisation and device certificates need an API key (unless"
                          " web.open_reads)"),
            "404": _error(f"no {what} matches")},
            [{"name": "search", "in": "query", "required": True, "style": "form",
              "explode": True, "description": "one search attribute and its key",
              "schema": {"type": "object", "properties": properties,
                         "additionalProperties": False, "minProperties": 1,
                         "maxProperties": 1}}], _KEY_OR_NONE)

    name = _path("name", "document name", pattern=doctypes.DOCUMENT_NAME.pattern, maxLength=200)
    paths: dict[str, Any] = {
        "/certificates/search.cgi": search("certificate", PKIX_CERT, list(hashes)),
        "/crls/search.cgi": search("CRL", PKIX_CRL, ["iHash", "sKIDHash"]),
        "/certificates/{serial}": _get(
            "a certificate by serial", cert_responses,
            [_path("serial", "hex serial, optionally with .pem/.der/.cer/.crt",
                   pattern=_SERIAL),
             _query("issuer", "issuer key identifier, when two issuers used the serial",
                    pattern=_HEX_ID + "$"), *_CONDITIONAL], _KEY_OR_NONE),
        "/crls": _get("the current CRL/ARL of every issuer", {"200": _list("Crl", "")}),
        "/crls/{key}": _get("an issuer's current CRL/ARL", crl_file, [
            _path("key", "issuer key identifier followed by .crl",
                  pattern=_HEX_ID + r"\.crl$"), *_CONDITIONAL]),
        "/crls/{key}/versions": _get("every version of an issuer's CRL/ARL", {
            "200": _list("CrlVersion", ""), "400": crl_file["400"],
            "404": _error("no CRL/ARL from that issuer")}, [key_id]),
        "/crls/{key}/{number}": _get("one version of an issuer's CRL/ARL", crl_file, [
            key_id, _path("number", f"CRL number (at most {MAX_CRL_NUMBER}) followed by .crl",
                          pattern=r"^[0-9]{1,48}\.crl$"), *_CONDITIONAL]),
        "/documents": _get("the current version of every document",
                           {"200": _list("Document", "")}),
        "/documents/{name}": _get("a document's current version", doc_file, [name,
                                                                            *_CONDITIONAL]),
        "/documents/{name}/versions": _get("every version of a document", {
            "200": _list("Document", ""), "404": doc_file["404"]}, [name]),
        "/documents/{name}/{version}": _get("one version of a document", doc_file, [
            name, {"name": "version", "in": "path", "required": True,
                   "description": "version number", "schema": {
                       "type": "integer", "minimum": 1, "maximum": MAX_DOC_VERSION}},
            *_CONDITIONAL]),
        "/extracts": _get("the published extracts, newest first", {
            "200": _list("Extract", ""), "403": _error("an API key is needed (unless"
                                                       " web.open_reads)")},
            security=_KEYED, tag="extracts"),
        "/extracts/{name}": _get("an extract file (Range resumes)", {
            "200": _bytes("the extract", "application/gzip", "application/x-tar"),
            "206": _bytes("the requested range", "application/gzip", "application/x-tar"),
            "304": _NOT_MODIFIED,
            "403": _error("an API key is needed (unless web.open_reads)"),
            "404": _error("no published extract of that name"),
            "416": {"description": "the range is not satisfiable"}},
            [_path("name", "extract file name, as /extracts lists it"),
             {"name": "Range", "in": "header", "required": False,
              "schema": {"type": "string", "pattern": r"^bytes=[0-9]+-[0-9]*$"},
              "description": "resume from a byte offset (416 when it is past the end)"},
             *_CONDITIONAL], _KEYED, "extracts"),
        "/ops/reports/cpm": _get("Code Performance Measure 8 for a month (operators)", {
            "200": {"description": "", "content": {JSON: {"schema": _ref("Report")}}},
            "400": _error("month is not YYYY-MM"),
            "403": _error("not an operator's API key")},
            [_query("month", "YYYY-MM (default: this month)",
                    pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")], _KEYED, "operations"),
        "/ops/reports/demand": _get("demand against forecast for a day (operators)", {
            "200": {"description": "", "content": {JSON: {"schema": _ref("Report")}}},
            "400": _error("day is not YYYY-MM-DD"),
            "403": _error("not an operator's API key")},
            [_query("day", "YYYY-MM-DD (default: today, UK time)", format="date")], _KEYED,
            "operations"),
        "/ops/loadtest/sample": _get(
            "a random sample of what the replica holds, for load tests (operators): devices and"
            " organisations with their serials, CRL/ARL URLs, document names", {
                "200": {"description": "", "content": {JSON: {"schema": _ref("Report")}}},
                "400": _error("devices or organisations is not a whole number up to 10000"),
                "403": _error("not an operator's API key")},
            [_query(name, f"how many {name} (default {default}, at most 10000)",
                    pattern=r"^(10000|[0-9]{1,4})$") for name, default in (("devices", 100),
                                                                 ("organisations", 10))],
            _KEYED, "operations"),
        "/healthz": _get("the process answers", {
            "200": {"description": "", "content": {JSON: {"schema": _ref("Health")}}}},
            tag="operations"),
        "/readyz": _get("ready: the replica is built and current (503 otherwise, with the"
                        " reason)", {"200": {"description": "", "content": {
                            JSON: {"schema": _ref("Health")}}}}, tag="operations"),
        "/openapi.json": _get("this description", {"200": {"description": "", "content": {
            JSON: {"schema": {"type": "object"}}}}}, tag="operations"),
        "/services/certificatesearch": _ws(
            "DCC Boxed web service: a device's or organisation's certificates by EUI-64",
            "CertificateSearchRequest", ["CertificateSubjectName", "CertificateSubjectAltName"],
            _EUI64),
        "/services/retrievecertificate": _ws(
            "DCC Boxed web service: one certificate by serial", "CertificateDataRequest",
            ["CertificateSerial"], r"^[0-9A-Fa-f]{1,40}$"),
    }
    readyz = paths["/readyz"]["get"]["responses"]
    readyz["503"] = {"description": "not ready: the reason is in the body",
                     "content": {JSON: {"schema": _ref("Health")}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "SMKI Repository read API", "version": version,
                 "description": "Downloads, the DCC Boxed web service, extracts and operations"
                                " on the http and https listeners. Errors are JSON"
                                " {status, reason} (XML for the web service). The portal's"
                                " HTML pages are not described here."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "apiKeyQuery": {"type": "apiKey", "in": "query", "name": "apikey"},
            },
        },
    }
