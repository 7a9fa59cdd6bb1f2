"""The upload limit, as an ASGI middleware in front of the application.

A body over the limit is refused with 413 and never reaches the application: from its ``Content-Length`` before
any of it is read, or, without one (chunked), as soon as it passes the limit. What the client is still sending is
then read and dropped, up to ``DISCARD`` times the limit, so that it can read the 413 (closing a connection with
unread data makes TCP reset it, and the client sees an error instead of the answer; nginx's lingering close does
the same); a body declared beyond that is answered at once and its connection closed. A body within the limit
is read whole and handed to the application.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


DISCARD = 4  # bodies up to 4 x the limit are drained after a 413, so the client reads it


class UploadLimit:
    """Wrap an ASGI ``app``: HTTP request bodies of at most ``max_bytes``."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if declared.isdigit() and int(declared) <= DISCARD * self.max_bytes:
                await self._drain(receive, 0)
            await self._refuse(send, f"the body's Content-Length is {declared.decode(errors='replace')} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await self._drain(receive, size)
                await self._refuse(send, f"the body passed {self.max_bytes} bytes")
                return
            chunks.append(chunk)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, size: int) -> None:
        """Read and drop the rest of the body, up to ``DISCARD`` times the limit."""
        while size <= DISCARD * self.max_bytes:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _refuse(self, send: Send, what: str) -> None:
        limit_mb = self.max_bytes / 2**20
        body = json.dumps({"detail": f"{what}, over the upload limit of {self.max_bytes} bytes "
                                     f"({limit_mb:g} MiB, --max-upload-mb); nothing of it was used"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
