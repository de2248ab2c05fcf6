"""The guards that hold a client to `ServeLimits`: an ASGI middleware for bodies, uvicorn's h11 protocol
with a header deadline and a connection cap, and an open-file limit that lets the cap be what binds."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from rosetool.serve.limits import ServeLimits
from rosetool.serve.protocol import error_body

log = logging.getLogger("rosetool.serve")


def _raw_response(status: int, reason: str, message: str, kind: str) -> bytes:
    """A whole HTTP/1.1 error response, for the points where there is no ASGI cycle to send it."""
    body = json.dumps(error_body(message, kind, status)).encode()  # type: ignore[arg-type]
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode()
    return head + body


class BodyLimit:
    """ASGI middleware: read a request's body whole, within `max_body_bytes` and with no piece of it
    taking longer than `header_timeout_s`, before the route sees it (then replay it)."""

    def __init__(self, app: Any, limits: ServeLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, 413, f"request body is {int(length)} bytes; this server takes at most "
                                         f"{limit} (--max-body-bytes)", "invalid_request_error")
            return
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.limits.header_timeout_s)
            except asyncio.TimeoutError:
                await _send_error(send, 408, f"request body not received within {self.limits.header_timeout_s:g} s "
                                             f"(--header-timeout)", "invalid_request_error")
                return
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                await _send_error(send, 413, f"request body is over {limit} bytes (--max-body-bytes)",
                                  "invalid_request_error")
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # afterwards: http.disconnect, when the client leaves
        await self.app(scope, replay, send)


async def _send_error(send: Any, status: int, message: str, kind: str) -> None:
    body = json.dumps(error_body(message, kind, status)).encode()  # type: ignore[arg-type]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two guards: a request's headers must be complete within
    `header_timeout_s` of the connection opening (or of the previous response), else the connection is
    closed with a 408; beyond `max_connections` open connections a new one gets a 503 and is closed."""

    limits = ServeLimits()   # set per server by `guarded_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._refused = len(self.connections) >= self.limits.max_connections
        if self._refused:
            transport.write(_raw_response(503, "Service Unavailable", "too many open connections; try again",
                                          "service_unavailable"))
            transport.close()
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        waiting = self.cycle
        super().data_received(data)
        if self.cycle is not waiting:   # a new request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()   # the next request on this connection gets the same time for its headers

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:   # bytes of a request, not idle
            self.transport.write(_raw_response(408, "Request Timeout", f"request headers not received within "
                                               f"{self.limits.header_timeout_s:g} s", "invalid_request_error"))
        self.transport.close()


def guarded_protocol(limits: ServeLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def raise_open_file_limit(connections: int) -> None:
    """Each connection is a file descriptor: lift the soft limit toward the hard one so that the
    connection cap, not EMFILE on accept, is what a flood of clients meets first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256   # model files, logs, the engine's pipes
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit from %d; --max-connections %d may hit it", soft, connections)
