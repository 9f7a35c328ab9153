"""The OpenAPI 3.1 description of the lodging listener's API (mutual TLS: only the DCC's
client certificate gets past the handshake), served there at GET /openapi.json. No I/O.

tests/test_openapi.py checks that its paths are exactly the lodging app's routes and fuzzes
every operation with schemathesis over mutual TLS against a throwaway store.
"""

from __future__ import annotations

from typing import Any

from repository_server.listeners.apidoc import JSON, json_answer, path_param, query_param

_SERIAL = r"^[0-9A-Fa-f]{1,40}$"
_DOC_NAME = r"^[A-Za-z0-9._-]{1,200}$"
_BOOL = {"enum": ["true", "false", "1", "0", "yes", "no"]}


def _error(description: str) -> dict[str, Any]:
    return json_answer(description, "Refusal")


def _done(description: str) -> dict[str, Any]:
    return json_answer(description, "Done")


_ON_BEHALF = [
    {"name": "X-On-Behalf-Of", "in": "header", "required": False,
     "schema": {"type": "string", "maxLength": 200},
     "description": "the DCC officer the lodging is made for (audited)"},
]
_ALWAYS = {
    "400": {**_error("the request does not parse (the reason says what)"),
            "content": {**_error("")["content"], "text/plain": {"schema": {"type": "string"}}}},
    "403": _error("the client certificate is not the configured DCC identity, or the TLS"
                  " suite is not AES-GCM"),
    "413": _error("the body is over lodge.max_body_mb (documents: lodge.max_document_mb)"),
    "503": _error("the store is unavailable: nothing was acknowledged; retry (lodging the"
                  " same again is a no-op)"),
}


def _op(summary: str, responses: dict[str, Any], *, body: list[str] | None = None,
        parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": ["lodging"],
                          "parameters": [*(parameters or []), *_ON_BEHALF],
                          "responses": {**_ALWAYS, **responses}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {
            t: {"schema": {"type": "string", "format": "binary"}} for t in body}}
    return op


def describe(version: str) -> dict[str, Any]:
    """The lodging OpenAPI document (a JSON-ready dict)."""
    name = path_param("name", "the document's name (letters, digits, '.', '_', '-')",
                      pattern=_DOC_NAME)
    document = _op("lodge a new version of an SMKI document (the body is the file; its"
                   " Content-Type is kept if on the allow-list, else"
                   " application/octet-stream)",
                   {"200": _done("stored as a new version, or identical to the current one")},
                   body=["application/pdf", "text/plain", "application/xml",
                         "application/octet-stream"], parameters=[name])
    return {
        "openapi": "3.1.0",
        "info": {"title": "smki-repository lodging API", "version": version,
                 "description": "The only way to write: mutual TLS with the DCC's client"
                                " certificate. Every answer is JSON with a status and, when"
                                " refused, a one-line reason."},
        "paths": {
            "/lodge/certificates": {"post": _op(
                "lodge certificates (PEM bundle, or one DER certificate), all or nothing",
                {"200": _done("every certificate stored or identical (per-item results)"),
                 "409": _error("a certificate conflicts with one already lodged"),
                 "422": _error("a certificate is refused (per-item results say which and"
                               " why): nothing was stored")},
                body=["application/x-pem-file", "application/pkix-cert",
                      "application/octet-stream"],
                parameters=[query_param("status", "lodged status (default I)",
                                        enum=["P", "I", "N", "p", "i", "n"]),
                            query_param("manufacturing_flag", "the ManufacturingFlag", **_BOOL),
                            query_param("trust_anchor", "a root lodged as a trust anchor",
                                        **_BOOL)])},
            "/lodge/crls": {"post": _op(
                "lodge a CRL or ARL (DER or PEM)",
                {"200": _done("stored, or identical to one already lodged"),
                 "409": _error("older than (or conflicting with) the current one"),
                 "422": _error("refused: unknown issuer, bad signature, no CRL number, ...")},
                body=["application/pkix-crl", "application/octet-stream"])},
            "/lodge/documents/{name}": {"put": document, "post": document},
            "/lodge/certificates/{serial}/status": {"post": _op(
                "change a certificate's status and/or ManufacturingFlag",
                {"200": _done("changed (or already so)"),
                 "404": _error("no certificate with that serial"),
                 "409": _error("the serial is not unique: give issuer_key_id")},
                parameters=[path_param("serial", "the certificate's serial number, hex",
                                       pattern=_SERIAL),
                            query_param("issuer", "issuer key identifier (hex) when the serial"
                                        " is not unique", pattern="^([0-9A-Fa-f]{2}){1,64}$")])
                | {"requestBody": {"required": False, "content": {JSON: {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"status": {"type": "string",
                                              "enum": ["P", "I", "N", "p", "i", "n"]},
                                   "manufacturing_flag": {"type": "boolean"},
                                   "issuer_key_id": {"type": "string",
                                                     "pattern": "^([0-9A-Fa-f]{2}){1,64}$"},
                                   "on_behalf_of": {"type": "string"}}}}}}}},
            "/lodge/whoami": {"get": _op("the client identity the server sees",
                                         {"200": _done("{status, client}")})},
            "/openapi.json": {"get": _op("this description", {"200": {
                "description": "", "content": {JSON: {"schema": {"type": "object"}}}}})},
        },
        "components": {"schemas": {
            "Done": {"type": "object", "required": ["status"],
                     "properties": {"status": {"const": 200}}},
            "Refusal": {"type": "object", "required": ["status", "reason"],
                        "properties": {"status": {"type": "integer"},
                                       "reason": {"type": "string", "minLength": 1},
                                       "results": {"type": "array"}}},
        }},
    }
