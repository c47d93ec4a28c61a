"""A cap on request bodies: the public front door reads no body over `max_bytes`, answering 413.

An ASGI middleware rather than a check in the routes, because a route sees the body only after
the framework has read all of it. A declared `Content-Length` over the cap is refused before
any byte is read; a body without one (chunked) is counted as it arrives and refused as soon as
it passes the cap. A body within the cap is buffered and handed on whole.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The largest valid GenerationRequest: `prompt` and `negative_prompt` of 4000 characters each,
# every one written as a JSON surrogate-pair escape (12 bytes, what json.dumps sends for an
# emoji by default), is about 96 KB with the other fields; 128 KiB admits it with room to spare
# and still bounds what one request makes the gateway hold.
MAX_BODY_BYTES = 128 * 1024


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class BodyLimit:
    """Wraps `app`: an HTTP request whose body passes `max_bytes` gets 413 with
    `{"detail": ...}` and never reaches `app`; `on_refused` is called once per refusal."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
        except BodyTooLarge:
            self.on_refused()
            await self._refuse(send)
            return
        except ClientGone:
            return  # before its body was whole: nothing to do and nobody to answer
        replayed = False

        async def receive_buffered() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, for whoever waits on it

        await self.app(scope, receive_buffered, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body; raises BodyTooLarge past the cap, declared or counted, and
        ClientGone when the client disconnects before the body's end."""
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                raise BodyTooLarge()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"the request body is over {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
