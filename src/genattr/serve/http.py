"""What guards the service at the HTTP level, before a request reaches its handler: bodies
over the upload limit (413) or stalled (408), connections that never send a whole request
head (closed), and a listening address checked before anything loads."""

from __future__ import annotations

import asyncio
import os
import socket

from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from genattr.errors import GenattrError


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether they announce their length
    (refused before reading) or stream it (refused when the count passes the limit), so an
    oversized upload is never spooled to disk whole; and bodies that stall for `timeout`
    seconds with 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen, complete = 0, False

        async def counted():
            nonlocal seen, complete
            if complete:  # after the body: waiting for a disconnect may take any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise HTTPException(
                    408, f"request body stalled: nothing received for {self.timeout:g} s"
                ) from None
            seen += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if seen > self.max_bytes:
                raise HTTPException(413, too_large_text(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def too_large_text(max_bytes: int) -> str:
    return f"upload too large: the limit is {max_bytes:,} bytes"


def _too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"detail": too_large_text(max_bytes)}, status_code=413)


def spooled_size(upload: UploadFile) -> int:
    """Bytes in an upload whose size the form parser did not record (seeking a spooled
    file reads nothing)."""
    size = upload.file.seek(0, os.SEEK_END)
    upload.file.seek(0)
    return size


def with_header_deadline(header_timeout: float) -> type:
    """uvicorn's h11 protocol, closing connections that do not send a whole request head
    within `header_timeout` seconds of opening or of their last answer. uvicorn bounds
    idle keep-alive connections but not ones that trickle a head byte by byte."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(header_timeout, self._drop_without_head, self.cycle)

        def _drop_without_head(self, cycle: object) -> None:
            # a new request's head arrived meanwhile: its cycle replaced this one
            if self.cycle is cycle and not self.transport.is_closing():
                try:
                    self.timeout_keep_alive_handler()  # uvicorn's own way to close
                except h11.LocalProtocolError:  # h11 midway through a head: just close
                    self.transport.close()

    return HeaderDeadline


def check_listen(host: str, port: int) -> None:
    """GenattrError unless a server could listen on host:port now (binds and closes a
    socket, as uvicorn will)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise GenattrError(f"--port must be between 1 and 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise GenattrError(
            f"--host {host!r}: not an address this machine can resolve ({e})"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            raise GenattrError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
