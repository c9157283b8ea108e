"""The uvicorn server the CLI runs: its config, and a deadline for each request's head.

uvicorn times a request's body only through the app (`BodyLimitMiddleware`) and an idle
keep-alive connection only after a response; a client that opens a connection and never finishes
a request line and headers (slowloris) never reaches the app and was held open indefinitely. Here
each connection gets `header_read_timeout_s` from its opening, and each later request from its
first byte, to finish its head. Past it the connection is closed: with a 408 when part of a head
had arrived, silently when nothing had (a client that pre-opened a connection and later sends a
request on it must not read an unsolicited 408 as its answer).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's line and headers."""

    header_timeout_s: float = 15.0  # set per server by `header_timeout_protocol`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # a byte of the current request's head has been parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._head_started = False
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._head_started:  # nothing of a request yet: close without an answer
            self.transport.close()
            return
        client = "%s:%d" % self.client if self.client else "a client"
        log.info("closed the connection of %s: its request line and headers took over %.0f s", client,
                 self.header_timeout_s)
        body = json.dumps({"error": f"request headers not complete within {self.header_timeout_s:g} s",
                           "error_type": "request_timeout"}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for one server (uvicorn builds a protocol per connection from a class)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": seconds})


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn config `adaptserve serve` runs (tests serve through it too). One worker: the
    engine holds the backbone and the task cache in this process; more processes would each load
    their own copy. Scale out with more replicas instead."""
    options: dict[str, Any] = dict(host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                                   lifespan="on", http=header_timeout_protocol(settings.header_read_timeout_s))
    return uvicorn.Config(app, **(options | overrides))
