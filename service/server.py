"""The uvicorn server the CLI runs: its config, and limits on each request's head.

uvicorn times a request's body only through the app (`BodyLimitMiddleware`) and an idle
keep-alive connection only after a response, and httptools buffers a head of any size; a client
that opens a connection and never finishes a request line and headers (slowloris), or streams
headers without end, never reaches the app and was held open indefinitely, its buffered bytes
growing. Here each connection gets `header_read_timeout_s` from its opening, and each later
request from its first byte (or from any byte, a stray CRLF included, after an answer), to finish
its head, and a head may be at most `max_header_bytes`. Past the deadline the connection is
closed: with a 408 when part of a head had arrived, silently when nothing had (a client that
pre-opened a connection and later sends a request on it must not read an unsolicited 408 as its
answer), and after the answers in flight when a pipelined head stalls behind them (HTTP answers
go in order: a 408 sent first would read as the answer to the request before). Past the size: 431
and close. A chunked body's trailer fields count against the same cap and are never kept (the app
reads none). A request the parser rejects gets a 400 in the app's error format, under the same
rule of order as the 408 (uvicorn wrote its plain-text 400 at once and closed: behind a request
still being answered, the client read the 400 as that request's answer, whose own was cut off).
A client's FIN still means it is gone, as in uvicorn: that is how a request whose client left is
dropped before its forward, so a client that only half-closes loses its answer. Each refusal (408,
431, 400, trailer fields over the cap) counts in `adaptserve_connection_refusals_total`; a connection
closed having sent nothing does not (it made no request, as one idle after an answer).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import weakref
from typing import Any, Iterable
from urllib.parse import unquote_plus

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.api.errors import SERVER_ANSWER
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

LINGER_S = 2.0  # how long a refused connection is read (and dropped) after its answer, before the close
# `adaptserve_connection_refusals_total`'s reason (service.metrics.REFUSAL_REASONS) for each refusal's status.
REFUSAL_REASON = {400: "malformed", 408: "header_timeout", 431: "headers_too_large"}


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap for each request's head.

    Every parser callback is a no-op once the connection is refused (`_discarding`): the read being
    parsed may still hold the rest of the refused request, which must never reach the app."""

    header_timeout_s: float = 15.0  # all three set per server by `header_timeout_protocol`
    max_header_bytes: int = 64 * 1024
    metrics: Metrics | None = None  # the app's, which counts the refusals

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # a byte of the current request's head has been parsed
        # The head's size two ways, the cap applied to the larger: what the parser has reported
        # (the URL, each header once whole: exact, but a header still arriving is not in it), and
        # the bytes of the reads since the head began (counts a header still arriving; leaves out
        # the read it began in when a previous request ended in that read too, as its body's bytes
        # are in it: a pipelined head is then counted from its next read on).
        self._head_parsed = 0
        self._head_streamed = 0
        self._head_began_now = False  # the head began in the read being parsed
        self._message_ended_now = False  # a request ended in the read being parsed
        self._trailer_bytes = 0  # a chunked body's trailer fields: counted, never kept
        self._discarding = False  # refused: further bytes are dropped, unparsed
        self._close_after_answers = False  # refused behind requests in flight: close once they are answered
        self._lost = False  # the connection is gone (connection_lost)

    # -- the connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)
        self._lost = True
        self._release_cycle()

    def _release_cycle(self) -> None:
        """Once the connection is gone and its last answer given, let go of that request: the
        request holds this protocol (uvicorn's `cycle.on_response`, our `_AnswerTransport`), so
        keeping it made each connection a reference cycle that only a full collection frees."""
        if self._lost and self.cycle is not None and self.cycle.response_complete:
            self.cycle = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._head_began_now = self._message_ended_now = False
        self._parse(data)
        if self.transport.is_closing() or self._discarding:
            return
        if self._head_started:  # this read left a head unfinished
            if not (self._head_began_now and self._message_ended_now):
                self._head_streamed += len(data)
            self._check_head_size()
        elif self._head_timer is None and self.timeout_keep_alive_task is None and self._idle():
            # Bytes that began no request (a stray CRLF after an answer) stopped uvicorn's idle
            # timer: time the connection from here as if a head had begun.
            self._arm_head_timer()

    def _parse(self, data: bytes) -> None:
        """uvicorn's `data_received`, but for its answer to a request the parser rejects, which was
        plain text, logged as a WARNING (any client could flood the log so), and written at once;
        and an Upgrade it cannot serve, which it also logged as a WARNING."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            if self._discarding:  # refused earlier in this read (431): the parser read on into bytes now dropped
                return
            # A callback that raised (uvicorn's, on a target it cannot parse) reads "User callback
            # error": name the parser's own reason beneath it, if it gave one.
            cause = err.__context__ if isinstance(err, httptools.HttpParserCallbackError) else err
            reason = f": {cause}" if isinstance(cause, httptools.HttpParserError) else ""
            cycle = self.cycle
            # In the body of the request the app is reading (a malformed chunk): that request's own answer.
            in_body = cycle is not None and not self.pipeline and cycle.more_body and not cycle.response_started
            self._refuse(400, "Bad Request", "bad_request", f"malformed HTTP request{reason}", in_body=in_body)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            # Any other Upgrade is ignored and the request served over HTTP/1.1 (RFC 9110 7.8), with
            # no WARNING each time, as uvicorn logged (`curl --http2` asks for h2c on every request).

    def on_response_complete(self) -> None:
        if self._close_after_answers and not self.pipeline:
            self.server_state.total_requests += 1
            self._linger()
            return
        super().on_response_complete()
        self._release_cycle()  # an answer that ends after its connection went

    # -- parser callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._discarding:
            return
        super().on_message_begin()
        self._head_started, self._head_began_now = True, True
        self._head_parsed = len(" HTTP/1.1\r\n\r\n")  # the request line's framing and the blank line
        self._head_streamed = self._trailer_bytes = 0
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        if self._discarding:
            return
        if not self.url:  # the first piece of the URL: the method and its space come before it
            self._head_parsed += len(self.parser.get_method()) + 1
        super().on_url(url)
        self._head_parsed += len(url)
        self._check_head_size()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._discarding:
            return
        if not self._head_started:  # a trailer field after a chunked body: the app reads none
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self.max_header_bytes:
                log.info("closed the connection of %s: its body's trailer fields passed %d bytes", self._who(),
                         self.max_header_bytes)
                self._count_refusal(REFUSAL_REASON[431])
                self._discarding = True
                self.transport.close()  # mid-request: the app sees the client gone
            return
        super().on_header(name, value)
        self._head_parsed += len(name) + len(value) + 4  # ": " and CRLF
        self._check_head_size()

    def on_headers_complete(self) -> None:
        if self._discarding:
            return
        self._disarm_head_timer()
        self._head_started = False
        self.scope.setdefault("extensions", {})[SERVER_ANSWER] = {}  # before the app gets the scope
        super().on_headers_complete()
        cycle = self.cycle  # this request's (an Upgrade made none: the previous request's, already wrapped)
        if cycle is not None and not isinstance(cycle.transport, _AnswerTransport):
            cycle.transport = _AnswerTransport(self, cycle)

    def on_body(self, body: bytes) -> None:
        if not self._discarding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._discarding:
            self._message_ended_now = True
            super().on_message_complete()

    # -- limits ------------------------------------------------------------------------------------
    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _who(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"

    def _check_head_size(self) -> None:
        if not self._discarding and max(self._head_parsed, self._head_streamed) > self.max_header_bytes:
            self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                         f"request line and headers over {self.max_header_bytes} bytes")

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._discarding:
            return
        if self._idle() and not self._head_started:  # nothing of a request yet: close without an answer
            self.transport.close()
            return
        self._refuse(408, "Request Timeout", "request_timeout",
                     f"request headers not complete within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, error_type: str, message: str, in_body: bool = False) -> None:
        """Answer a head the app never saw, in the app's error format, and close. Behind requests
        still being answered (pipelining) no answer is sent: HTTP answers go in order, and one sent
        now would read as the answer to the request before; the connection closes after theirs.
        `in_body`: the bytes refused are the body of the request the app is reading, which has no
        answer yet: this is its answer, and the app is told at once that its client is gone (as a
        close would tell it), so that nothing it answers follows this one."""
        self._disarm_head_timer()
        self._discarding = True
        log.info("closed the connection of %s: %s", self._who(), message)
        self._count_refusal(REFUSAL_REASON[status])
        if not self._idle() and not in_body:
            self._close_after_answers = True
            return
        body = json.dumps({"error": message, "error_type": error_type}).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body))
        if in_body:
            cycle = self.cycle
            assert cycle is not None
            # the app's metrics count this answer, and its log says it
            cycle.scope["extensions"][SERVER_ANSWER].update(status=status, error_type=error_type, error=message)
            cycle.disconnected = True  # what uvicorn's connection_lost does: the app's writes are dropped
            cycle.message_event.set()
        self._linger()

    def _count_refusal(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.observe_refusal(reason)

    def _linger(self) -> None:
        """A lingering close: closing with the client's bytes still unread makes the kernel send a
        reset, which can destroy the answer before the client reads it. So send our side's end
        (FIN), keep reading and dropping what still comes, and close a moment later."""
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


class _AnswerTransport:
    """The connection as one request's cycle (uvicorn's `RequestResponseCycle`) sees it. The cycle
    closes the connection once it has answered a request that ends it (`Connection: close`, a 413,
    HTTP/1.0): an answer given before the request's body was all read (401, 413, 415) was followed
    by a reset, as the client's body kept coming, and a client could lose the answer. That close
    is lingering (`HeaderTimeoutProtocol._linger`); every other call goes to the transport.

    It holds its cycle weakly: the cycle holds it (`cycle.transport`), and a strong reference back
    would make every request's objects (its scope, FastAPI's exit stacks, the cycle's event) a
    reference cycle that only the garbage collector frees. Those piled up into a full collection
    every few seconds under load, 25-50 ms with the event loop and the forward thread stopped."""

    def __init__(self, protocol: HeaderTimeoutProtocol, cycle: Any) -> None:
        self._protocol = protocol
        self._cycle = weakref.ref(cycle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol.transport, name)

    def close(self) -> None:
        cycle = self._cycle()  # only the cycle calls this, so it is alive
        if cycle is not None and cycle.response_complete and cycle.more_body:  # answered, its body still arriving
            self._protocol._linger()
        else:
            self._protocol.transport.close()


def header_timeout_protocol(seconds: float, max_bytes: int = HeaderTimeoutProtocol.max_header_bytes,
                            metrics: Metrics | None = None) -> type[HeaderTimeoutProtocol]:
    """The protocol class for one server (uvicorn builds a protocol per connection from a class)."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": seconds, "max_header_bytes": max_bytes, "metrics": metrics})


class RedactQueryCredentials(logging.Filter):
    """uvicorn's access log writes each request's path with its query string, so a token a client
    put there (`?access_token=...`; this server reads tokens only from the Authorization header,
    and answers such a request 401) landed in the log verbatim. The values of parameters named
    like a credential are replaced with `***`; the rest of the line is kept. A configured token
    itself is masked wherever it stands (`?t=<token>`, `?<token>`, `/v1/tasks/<token>`): the names
    a client may give it are endless, its value is known."""

    CREDENTIAL = re.compile(r"token|key|secret|passw|pwd|auth|signature|credential|session|jwt|bearer", re.IGNORECASE)
    PARAMETER = re.compile(r"([?&])([^=&#]*)=([^&#]*)")

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        super().__init__()
        self.tokens = tuple(t for t in tokens if t)

    def redact(self, path: str) -> str:
        """`path` with the values of credential-like query parameters replaced by `***`, and every
        configured token too. A name is judged as the server reads it, percent-decoded (`tok%65n`
        is `token`); a token found only once the query is decoded masks the whole query."""
        def mask(m: re.Match[str]) -> str:
            name = m.group(2)
            return f"{m.group(1)}{name}=***" if self.CREDENTIAL.search(unquote_plus(name)) else m.group(0)
        path = self.PARAMETER.sub(mask, path)
        for token in self.tokens:
            path = path.replace(token, "***")
        where, mark, query = path.partition("?")
        decoded = unquote_plus(query)  # once, not once per token: this runs for every logged request
        return f"{where}{mark}***" if any(token in decoded for token in self.tokens) else path

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn.access's args: (client, method, path with its query, http version, status)
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and ("?" in args[2] or self.tokens):
            record.args = (*args[:2], self.redact(args[2]), *args[3:])
        return True


# After SIGTERM, a classify request still in flight ends within its deadline plus the forward it
# may be riding (a full batch of 32 rows: 0.2-0.27 s on one MiniLM thread, docs/reliability.md)
# and writing its answer.
DRAIN_MARGIN_S = 2.0


def drain_timeout_s(settings: Settings) -> float:
    """How long the drain after SIGTERM waits for requests in flight before it cancels them. Every
    classify request ends within `request_timeout_s`; an upload has no such deadline (a slow body
    that keeps coming is read for as long as it comes), so without this bound one slow upload held
    the process until the orchestrator's SIGKILL, skipping the app's own shutdown. An upload cut
    here ends as if the server had stopped at that point, with nothing half-written: a store write
    already started finishes in its worker thread (the process waits for it), the registry changes
    in one transaction, and sending the upload again is safe (the same content, the same version)."""
    return settings.request_timeout_s + DRAIN_MARGIN_S


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn config `adaptserve serve` runs (tests serve through it too). One worker: the
    engine holds the backbone and the task cache in this process; more processes would each load
    their own copy. Scale out with more replicas instead. `app` is `service.app.create_app`'s: the
    server counts the requests it refuses itself in the app's metrics."""
    http = header_timeout_protocol(settings.header_read_timeout_s, settings.max_header_bytes, app.state.service.metrics)
    options: dict[str, Any] = dict(host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                                   lifespan="on", timeout_graceful_shutdown=drain_timeout_s(settings), http=http)
    config = uvicorn.Config(app, **(options | overrides))  # configures uvicorn's loggers (a filter added later stays)
    access = logging.getLogger("uvicorn.access")
    for stale in [f for f in access.filters if isinstance(f, RedactQueryCredentials)]:  # another app's tokens
        access.removeFilter(stale)
    access.addFilter(RedactQueryCredentials(t.get_secret_value() for t in (*settings.admin_tokens, *settings.inference_tokens)))
    return config
