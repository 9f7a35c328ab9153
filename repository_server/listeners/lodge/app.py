"""The lodging listener's HTTP layer: identity check on the mutual-TLS client certificate,
then thin handlers over `LodgingService`. Every reply is JSON with a reason."""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

from aiohttp import web
from cryptography import x509

from repository_server import __version__
from repository_server.config import Config
from repository_server.listeners.lodge.openapi import describe as describe_api
from repository_server.lodging.batch import CertOptions
from repository_server.lodging.service import Actor, LodgeError, LodgingService
from repository_server.pki.certificates import parse_certificate
from repository_server.pki.errors import ParseError
from repository_server.pki.ids import IdentifierError, format_eui64, parse_eui64, parse_key_id, parse_serial
from repository_server.store.pool import unavailable as store_unavailable

log = logging.getLogger(__name__)

ACTOR_KEY = web.RequestKey("actor", Actor)


def _error(status: int, reason: str, **extra: Any) -> web.Response:
    return web.json_response({"status": status, "reason": reason, **extra}, status=status)


class Identity:
    """The configured DCC identity; a client certificate must match all that is set."""

    def __init__(self, config: Config) -> None:
        cfg = config.lodge
        self.subject = x509.Name.from_rfc4514_string(cfg.client_subject) if cfg.client_subject else None
        self.eui64 = parse_eui64(cfg.client_eui64) if cfg.client_eui64 else None
        self.role = cfg.client_role if cfg.client_role >= 0 else None

    def check(self, der: bytes) -> tuple[str, str | None]:
        """(client name, refusal reason or None)."""
        cert = x509.load_der_x509_certificate(der)
        name = cert.subject.rfc4514_string()
        if self.subject is not None and cert.subject != self.subject:
            return name, f"client certificate subject {name!r} is not the DCC identity"
        if self.eui64 is not None or self.role is not None:
            try:
                info = parse_certificate(der)
            except ParseError as exc:
                return name, f"client certificate: {exc}"
            if self.eui64 is not None and info.eui64 != self.eui64:
                got = format_eui64(info.eui64) if info.eui64 else "none"
                return name, f"client certificate EUI-64 {got} is not the DCC identity"
            if self.role is not None and info.role != self.role:
                return name, f"client certificate role {info.role} is not {self.role}"
        return name, None


def _bool(value: str | None, name: str) -> bool | None:
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise LodgeError(400, f"{name} must be true or false (got {value!r})")


def build_lodge_app(config: Config, service: LodgingService,
                    version: str = __version__) -> web.Application:
    identity = Identity(config)

    async def audit(actor: Actor, path: str, reason: str, status: int) -> None:
        try:
            await service.store.audit(**actor.audit("lodge.refused", "refused", path,
                                                    {"reason": reason, "status": status}))
        except Exception:  # the refusal stands even if the audit write fails; say so loudly
            log.exception("could not audit a refused lodging request from %s", actor.name)

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        peer = transport.get_extra_info("peername") if transport else None
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None
        der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
        if not der:  # the TLS gate requires a certificate: this is a configuration error
            return _error(403, "a DCC client certificate is required")
        name, refusal = identity.check(der)
        cipher = transport.get_extra_info("cipher") if transport else None
        if refusal is None and (not cipher or "GCM" not in cipher[0]):
            # TLS 1.2 suites are restricted to ECDHE+AESGCM by the context; Python cannot
            # restrict TLS 1.3 suites, so a client that offers only ChaCha20 is refused here.
            refusal = f"cipher {cipher[0] if cipher else '?'} is not an AES-GCM suite"
        on_behalf_of = request.headers.get("X-On-Behalf-Of") or request.query.get("on_behalf_of")
        actor = Actor(name, on_behalf_of, peer_text)
        if refusal:
            await audit(actor, request.path, refusal, 403)
            return _error(403, refusal)
        request[ACTOR_KEY] = actor
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except LodgeError as exc:
            if not exc.audited:
                await audit(actor, request.path, exc.reason, exc.status)
            return _error(exc.status, exc.reason, results=exc.results)
        except web.HTTPRequestEntityTooLarge:
            reason = f"request body exceeds the limit of {config.lodge.max_body_mb} MB"
            await audit(actor, request.path, reason, 413)
            return _error(413, reason)
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            # Nothing is acknowledged. A transaction whose COMMIT was sent just before the
            # connection died may still have been stored: lodging the same bytes again is a
            # no-op then, so the DCC simply retries. (No audit entry: the store is down.)
            first: BaseException = exc  # (a ROLLBACK on a lost connection hides the cause)
            while (earlier := first.__cause__ or first.__context__) is not None:
                first = earlier
            log.warning("lodging by %s on %s: store unavailable: %s: %s%s", actor.name,
                        request.path, type(exc).__name__, exc,
                        f" (after {type(first).__name__}: {first})" if first is not exc else "")
            response = _error(503, "the repository store is unavailable: this lodging is not"
                              " acknowledged; retry shortly (lodging the same again is a"
                              " no-op)")
            response.headers["Retry-After"] = "5"
            return response

    async def certificates(request: web.Request) -> web.Response:
        q = request.query
        status = q.get("status", "I").upper()
        if status not in ("P", "I", "N"):
            raise LodgeError(400, f"status must be P, I or N (got {status!r})")
        opts = CertOptions(
            status=status,
            manufacturing_flag=bool(_bool(q.get("manufacturing_flag"), "manufacturing_flag")),
            trust_anchor=bool(_bool(q.get("trust_anchor"), "trust_anchor")),
        )
        body = await request.read()
        result = await service.lodge_certificates(body, request[ACTOR_KEY], opts)
        return web.json_response({"status": 200, "stored": result.stored,
                                  "identical": result.identical, "results": result.results})

    async def crls(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"status": 200, **await service.lodge_crl(body, request[ACTOR_KEY])})

    async def document(request: web.Request) -> web.Response:
        body = await request.read()
        if len(body) > config.lodge.max_document_mb * 1024 * 1024:
            raise LodgeError(413, f"document exceeds {config.lodge.max_document_mb} MB")
        result = await service.lodge_document(
            request.match_info["name"], request.headers.get("Content-Type", ""), body,
            request[ACTOR_KEY])
        return web.json_response({"status": 200, **result})

    async def status(request: web.Request) -> web.Response:
        try:
            serial = parse_serial(request.match_info["serial"])
        except IdentifierError as exc:
            raise LodgeError(400, str(exc)) from None
        try:
            data = json.loads(await request.read() or b"{}")
        except ValueError:
            raise LodgeError(400, "body must be JSON: {\"status\": \"I\", "
                                  "\"manufacturing_flag\": true}") from None
        if not isinstance(data, dict):
            raise LodgeError(400, "body must be a JSON object")
        unknown = set(data) - {"status", "manufacturing_flag", "issuer_key_id", "on_behalf_of"}
        if unknown:
            raise LodgeError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        flag = data.get("manufacturing_flag")
        if flag is not None and not isinstance(flag, bool):
            raise LodgeError(400, "manufacturing_flag must be true or false")
        st = data.get("status")
        if st is not None and not isinstance(st, str):
            raise LodgeError(400, "status must be a string: P, I or N")
        issuer = data.get("issuer_key_id") or request.query.get("issuer")
        try:
            issuer_key = parse_key_id(issuer) if issuer else None
        except IdentifierError as exc:
            raise LodgeError(400, f"issuer_key_id: {exc}") from None
        actor: Actor = request[ACTOR_KEY]
        if data.get("on_behalf_of"):
            actor = Actor(actor.name, str(data["on_behalf_of"]), actor.peer)
        result = await service.set_status(serial, issuer_key, st.upper() if st else None, flag,
                                          actor)
        return web.json_response({"status": 200, **result})

    async def whoami(request: web.Request) -> web.Response:
        actor: Actor = request[ACTOR_KEY]
        return web.json_response({"status": 200, "client": actor.name})

    described = json.dumps(describe_api(version), indent=1).encode()

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=described, content_type="application/json",
                            headers={"Cache-Control": "no-cache"})

    app = web.Application(middlewares=[authenticate],
                          client_max_size=config.lodge.max_body_mb * 1024 * 1024)
    app.add_routes([
        web.post("/lodge/certificates", certificates),
        web.post("/lodge/crls", crls),
        web.put("/lodge/documents/{name}", document),
        web.post("/lodge/documents/{name}", document),
        web.post("/lodge/certificates/{serial}/status", status),
        web.get("/lodge/whoami", whoami),
        web.get("/openapi.json", openapi),
    ])
    return app
