"""The read listeners' access log, and the moment a response counts as sent.

aiohttp calls the access logger after it has written the whole response to the connection
(after `write_eof`), so that is where a request's Code Performance Measure 8 timing ends
(`ServiceLevels.answered`). Handlers leave a `Note` on the request (`request["smki"]`) with
the interface, operation, user, audit reference and outcome; the log line carries them.
The query string is never logged: it holds API keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from repository_server.obs.logs import access_extra

if TYPE_CHECKING:
    from repository_server.accounts.keys import User
    from repository_server.service_levels import Mark, ServiceLevels



class Note:
    """What one read request was, filled in as the handler learns it."""

    __slots__ = ("audit_ref", "interface", "mark", "operation", "outcome", "principal",
                 "started", "user")

    def __init__(self, interface: str, operation: str, user: str, mark: Mark | None,
                 principal: User | None = None, started: float | None = None) -> None:
        self.interface = interface
        self.operation = operation
        self.user = user
        self.principal = principal  # the user an API key identified, if any
        self.audit_ref: str | None = None
        self.outcome: str | None = None
        self.mark = mark
        self.started = started  # perf_counter() when the request came in (a later receipt's time)


NOTE = web.RequestKey("smki", Note)


def access_logger_class(levels: ServiceLevels | None, emit: bool, listener: str | None = None,
                        user_of: Callable[[BaseRequest], str | None] | None = None
                        ) -> type[AbstractAccessLogger]:
    """An access logger bound to this process's service-level counters (aiohttp makes one
    per connection from the class). `listener` names it in the log (default: http or https,
    from the connection); `user_of` finds the user of a request without a Note."""

    class AccessLogger(AbstractAccessLogger):
        def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
            note = request.get(NOTE)
            if note is not None and note.mark is not None and levels is not None:
                levels.answered(note.mark, response.status)
            if not emit:
                return
            peer = request.remote or "-"
            name = listener or ("https" if request.secure else "http")
            agent = request.headers.get("User-Agent")
            if note is None:
                self.logger.info('%s "%s %s" %d %d %.1fms', peer, request.method, request.path,
                                 response.status, response.body_length, time * 1000,
                                 extra=access_extra(
                                     name, peer, user_of(request) if user_of else None,
                                     f"{request.method} {request.path}",
                                     response.status, time * 1000, None,
                                     status=response.status, method=request.method,
                                     path=request.path, bytes=response.body_length,
                                     user_agent=agent))
                return
            self.logger.info(
                '%s "%s %s" %d %d %.1fms interface=%s operation=%s user=%s outcome=%s audit=%s',
                peer, request.method, request.path, response.status, response.body_length,
                time * 1000, note.interface, note.operation, note.user,
                note.outcome or response.status, note.audit_ref or "-",
                extra=access_extra(name, peer, note.user, note.operation,
                                   note.outcome or response.status, time * 1000, note.audit_ref,
                                   interface=note.interface, status=response.status,
                                   method=request.method, path=request.path,
                                   bytes=response.body_length, user_agent=agent))

        @property
        def enabled(self) -> bool:
            return True  # always called: it also ends the CPM timing

    return AccessLogger
