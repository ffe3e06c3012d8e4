"""The dashboard's web application (Starlette): the page, its assets, the JSON view it polls
and the actions, over a ``Board``.

Routes::

    GET  /                    the page (index.html, with this process's CSRF token when
                              actions are allowed)
    GET  /static/...          app.js, style.css: served from the package, never a CDN
    GET  /api/snapshot        the Board's view as JSON; 503 with {"error": ...} while the
                              server cannot be reached
    POST /api/actions/ACTION  replay | purge | cleanup, body {"stream": NAME}

Actions are refused (403) unless ``allow_actions``; when allowed, a request needs the CSRF
token (``X-CSRF-Token``, made per process with ``secrets``, compared in constant time), an
``Origin`` (else ``Referer``) of this very host, and a JSON body: a page of another site can
neither read the token nor send such a request. With ``allowed_hosts``, a ``Host`` header
must be an IP address or one of those names: a site whose name is made to resolve to the
dashboard's address (DNS rebinding) does not become its origin, so it can read nothing. Every answer
carries a Content-Security-Policy that allows only the dashboard's own scripts and styles,
and forbids framing.

The Board does blocking I/O: it runs in Starlette's thread pool.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisClusterException, RedisError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.contrib.dashboard.board import Board
from conveyor.errors import ConveyorError

__all__ = ["ACTIONS", "CSRF_HEADER", "STATIC", "create_app", "host_name"]

log = logging.getLogger("conveyor.dashboard")

#: the page's assets, shipped in the package
STATIC = Path(__file__).parent / "static"
#: the request header that carries the CSRF token
CSRF_HEADER = "X-CSRF-Token"
#: what the POST endpoints do, by name
ACTIONS = ("replay", "purge", "cleanup")

_ACTIONS_OFF = "actions are off: start the dashboard with --allow-actions"

#: every response: no sniffing, no framing (the buttons cannot be clicked through another
#: page), scripts and styles from the dashboard only, referrers only to itself
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
]


def create_app(
    board: Board,
    *,
    allow_actions: bool = False,
    interval_s: float = 2.0,
    allowed_hosts: Collection[str] | None = None,
    csrf_token: str | None = None,
) -> Starlette:
    """The dashboard of ``board`` as an ASGI application (serve it with uvicorn).

    ``allow_actions``: the replay, purge and cleanup buttons and endpoints (else 403);
    ``interval_s``: how often the page polls; ``allowed_hosts``: the names the page may be
    reached by, besides IP addresses (None: any name); ``csrf_token``: default, a new random
    one.

    >>> app = create_app(Board(r, ["orders"]), allowed_hosts=["localhost"])  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                          # doctest: +SKIP
    """
    token = csrf_token or secrets.token_urlsafe(32)
    page = _page(allow_actions=allow_actions, interval_s=interval_s, token=token)

    async def index(_request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def snapshot(_request: Request) -> Response:
        view = await run_in_threadpool(board.view)
        return _json({**view, "actions": allow_actions}, 200 if view["reachable"] else 503)

    async def action(request: Request) -> Response:
        name = request.path_params["action"]
        if not allow_actions:
            return _json({"error": _ACTIONS_OFF}, 403)
        refused = _refusal(request, token)
        if refused is not None:
            log.warning("refused %r from %s: %s", name, _client(request), refused)
            return _json({"error": refused}, 403)
        if name not in ACTIONS:
            return _json({"error": f"no action {name!r} (actions: {', '.join(ACTIONS)})"}, 404)
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        stream = body.get("stream") if isinstance(body, dict) else None
        if stream not in board.streams:
            return _json({"error": f"stream {stream!r} is not on this dashboard"}, 404)
        work: Callable[[str], dict[str, Any]] = getattr(board, name)
        try:
            done = await run_in_threadpool(work, stream)
        except (ConveyorError, RedisError, RedisClusterException, OSError) as exc:
            reason = board.error_text(exc)
            log.warning("%s of stream %r failed: %s", name, stream, reason)
            code = 503 if board.is_outage(exc) else 500
            return _json({"error": f"{name} failed: {reason}"}, code)
        return _json(done, 200)

    routes = [
        Route("/", index),
        Route("/api/snapshot", snapshot),
        Route("/api/actions/{action}", action, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)
    return app


def _page(*, allow_actions: bool, interval_s: float, token: str) -> str:
    """index.html with this process's settings; the token only when it is of any use."""
    text = (STATIC / "index.html").read_text(encoding="utf-8")
    values = {
        "actions": "true" if allow_actions else "false",
        "interval_ms": str(int(interval_s * 1000)),
        "csrf_token": token if allow_actions else "",
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value, quote=True))
    return text


def _json(value: Any, status_code: int) -> Response:
    # ensure_ascii: names that were not UTF-8 (surrogate escapes) stay valid JSON text
    body = json.dumps(value, ensure_ascii=True).encode("ascii")
    headers = {"Cache-Control": "no-store"}
    return Response(body, status_code, headers=headers, media_type="application/json")


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "?"


def _refusal(request: Request, token: str) -> str | None:
    """Why a POST is refused (None: it is not): it comes from another origin, it is not JSON,
    or its CSRF token is missing or wrong."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is None:
        referer = urlsplit(request.headers.get("referer", ""))
        origin = f"{referer.scheme}://{referer.netloc}" if referer.netloc else None
    if origin is None or origin.lower() != f"{request.url.scheme}://{host}".lower():
        given = repr(origin) if origin else "not given"
        return f"cross-origin request refused (origin {given})"
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return "the request must be JSON (Content-Type: application/json)"
    given = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return "missing or wrong CSRF token: reload the page"
    return None


def host_name(header: str) -> str:
    """The name in a Host header, without the port: ``[::1]:8000`` -> ``::1``.

    >>> host_name("localhost:8000"), host_name("[::1]:8000"), host_name("127.0.0.1")
    ('localhost', '::1', '127.0.0.1')
    """
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if ":" in header else header


class _Guard:
    """Pure ASGI middleware: refuses Host names not allowed (IP addresses always are), and
    adds the security headers to every answer."""

    def __init__(self, app: ASGIApp, allowed_hosts: Collection[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed is not None:
            headers = dict(scope.get("headers") or [])
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.allowed and not _is_address(name):
                shown = ", ".join(["an IP address", *sorted(self.allowed)])
                text = f"unknown host {name!r}: reach the dashboard by {shown}"
                refusal = PlainTextResponse(text, 400)
                await refusal(scope, receive, _secured(send))
                return
        await self.app(scope, receive, _secured(send))


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _secured(send: Send) -> Callable[[Message], Awaitable[None]]:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *_SECURITY_HEADERS]}
        await send(message)

    return send_with_headers
