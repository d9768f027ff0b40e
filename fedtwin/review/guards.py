"""What every request to the reader study passes before the app sees it: the host it names,
the site a form post comes from, and the size of its body; and the bound on wrong access
codes a client address may try.

The request guards are plain ASGI middleware, outside FastAPI: a body over the limit is
refused before a form is parsed (Starlette would otherwise spool a large upload to a
temporary file, with ``--allow-remote`` before the access code is even checked).
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 16 * 1024  # bytes a request may carry: a login or an answer is under 1 KiB
MAX_CODE_TRIES = 5  # wrong access codes a client address may give in CODE_WINDOW_S; then 429
CODE_WINDOW_S = 60.0
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # change nothing: no Origin check


def host_name(header: str) -> str:
    """The host a Host header names, without its port, as the app compares it:
    ``[::1]:8765`` -> ``::1``, ``LocalHost:8765`` -> ``localhost``."""
    header = header.strip().lower()
    name = header[1:].partition("]")[0] if header.startswith("[") else header.partition(":")[0]
    return _canonical(name)


def _canonical(name: str) -> str:
    """An IP address in its one written form (``0:0::1`` -> ``::1``); a name as given."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


class AllowedHosts:
    """Refuse (400) a request whose Host header names a host other than ``hosts`` (``*``:
    any). IPv6 addresses are compared as addresses, so ``[::1]:8765`` is ``::1``."""

    def __init__(self, app: ASGIApp, hosts: Sequence[str]):
        self.app = app
        self.any = "*" in hosts
        self.hosts = {_canonical(h.lower()) for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] != "http":
            await self.app(scope, receive, send)
        elif host_name(Headers(scope=scope).get("host", "")) in self.hosts:
            await self.app(scope, receive, send)
        else:
            await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)


class BodyLimit:
    """Refuse (413) a request body over ``limit`` bytes: at once when its Content-Length
    says so (nothing of it is read), else, sent in chunks, as soon as they pass the limit:
    the app is then told the client has gone, and what it answers is dropped."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and not (
            re.fullmatch(r"[0-9]{1,18}", declared) and int(declared) <= self.limit
        ):
            await self._refuse(send)
            return
        received, started, refused = 0, False, False

        async def bounded() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                refused = True
                if not started:  # a body sent to a page that was answered without it
                    await self._refuse(send)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        await self.app(scope, bounded, guarded)

    async def _refuse(self, send: Send) -> None:
        body = f"Request body over {self.limit} bytes: refused.".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def origin_host(url: str | None) -> str | None:
    """The ``host[:port]`` an Origin or Referer header names, lower case; None for none,
    ``null`` or a header that is not a URL."""
    if not url or url == "null":
        return None
    try:
        return urlsplit(url).netloc.lower() or None
    except ValueError:
        return None


class SameOrigin:
    """Refuse (403) a form post from another site (login CSRF): a POST must name the host it
    is sent to (its Host header) in its Origin header, or, where a browser sends none, in
    its Referer. A post with neither, as from a script, is refused too."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = Headers(scope=scope)
            sent = origin_host(headers.get("origin")) or origin_host(headers.get("referer"))
            if sent is None or sent != headers.get("host", "").strip().lower():
                text = "A form post from another site, or with no Origin header: refused."
                await PlainTextResponse(text, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def client_key(address: str) -> str:
    """Whom ``Attempts`` counts for a client ``address``: an IPv6 address by its /64
    network (one machine may hold all of it), any other as given."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:192.0.2.1 is 192.0.2.1
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Attempts:
    """Wrong access codes per client (``client_key``) in the last ``window_s`` seconds: a
    client that gave ``limit`` must wait (``wait_s``) until the oldest is that old. Shared
    by the app's worker threads."""

    def __init__(
        self,
        limit: int = MAX_CODE_TRIES,
        window_s: float = CODE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.wrong: dict[str, deque[float]] = {}
        self.lock = threading.Lock()

    def wait_s(self, address: str) -> float:
        """Seconds before ``address`` may try a code again (0: now)."""
        with self.lock:
            times = self.wrong.get(client_key(address), ())
            if len(times) < self.limit:
                return 0.0
            return max(0.0, times[0] + self.window_s - self.clock())

    def failed(self, address: str) -> None:
        """Count a wrong code from ``address``."""
        with self.lock:
            now = self.clock()
            # forget clients whose last try is old: the table holds the last minute's only
            self.wrong = {k: t for k, t in self.wrong.items() if t[-1] > now - self.window_s}
            self.wrong.setdefault(client_key(address), deque(maxlen=self.limit)).append(now)
