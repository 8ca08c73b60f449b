"""The agent's admin HTTP port (127.0.0.1:15090 by default): Prometheus metrics, the dashboard
and the JSON API it polls, and a readiness probe.

  GET /metrics                 Prometheus exposition (OpenMetrics when the scraper asks for it)
  GET /ready                   200 "ready" when capture and workers are up, else 503
  GET /api/overview?window=S   services (with their Route's marks: split, fault, mirror,
                               rate limit), edges, hosts and series for the dashboard (JSON)
  GET /api/hosts               every agent in the registry: its report (ready, capture, applied
                               revision, ...) and whether it runs the newest resources (JSON)
  GET /                        the dashboard (meshnode/dashboard/index.html)
  GET /static/NAME             its files (package data; nothing comes from the internet)
  GET /v1/catalog/services     the read-only catalog (meshnode/discovery/catalog.py): every
  GET /v1/catalog/service/NAME service, or one with its endpoints and health, as JSON with an
                               X-Meshnode-Index header; ?index=N&wait=30s blocks (like Consul)

A threaded WSGI server (the standard library's, as prometheus-client's own exporter uses) in a
daemon thread of the agent: the agent's event loop never blocks on a slow scraper. Requests
read the agent's state by running a coroutine on its loop (`Provider`, `Catalog.query`), so the
loop stays the only thread that touches it. A blocking catalog query holds its thread for up to
its wait; at most MAX_BLOCKING of them wait at once, more get 429 (the thread budget is the
limit, not the loop: a waiting query costs the loop nothing).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import mimetypes
import re
import threading
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from meshnode.discovery.catalog import Answer, BlockingQuery, Catalog, parse_query
from meshnode.errors import UnavailableError, UsageError
from meshnode.telemetry.metrics import MeshCollector, Snapshot

__all__ = ["AdminServer", "HostsSource", "Provider"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_TIMEOUT = 5.0
_MAX_WINDOW = 600.0
MAX_BLOCKING = 256  # blocking catalog queries waiting at once (one thread each)
CLIENT_TIMEOUT = 10.0  # seconds a connection may stay idle mid-request or mid-answer
CATALOG = "/v1/catalog/"
INDEX_HEADER = "X-Meshnode-Index"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
# The mesh's hosts (agent/cluster.py's view). A plain callable, not the agent: the admin port
# needs this one answer, and runs it on the agent's loop, which owns the registry snapshot.
HostsSource = Callable[[], dict[str, Any]]


class Provider(Protocol):
    """What the admin port reads from the agent (coroutines run on the agent's loop)."""

    async def snapshot(self) -> Snapshot: ...

    async def overview(self, window: float) -> dict[str, Any]: ...

    @property
    def ready(self) -> bool: ...


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    # Seconds a client may leave the socket idle (mid-request, or not reading the answer):
    # without it a slowloris client holds a server thread for good.
    timeout = CLIENT_TIMEOUT

    def handle(self) -> None:
        try:
            super().handle()
        except TimeoutError:  # else socketserver prints a traceback for each such client
            log.debug("admin: a client stayed idle for %g s: connection closed", self.timeout)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin: " + format, *args)


class AdminServer:
    def __init__(self, host: str, port: int, provider: Provider,
                 loop: asyncio.AbstractEventLoop, catalog: Catalog | None = None,
                 hosts: HostsSource | None = None) -> None:
        self.host, self.port = host, port
        self._provider = provider
        self._loop = loop
        self._catalog = catalog
        self._hosts = hosts
        self._blocking = threading.BoundedSemaphore(MAX_BLOCKING)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(MeshCollector(lambda: self._run(provider.snapshot())))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            server = make_server(self.host, self.port, self._app, _Server, _QuietHandler)
        except OSError as exc:
            hint = (f"another program holds it (ss -ltnp 'sport = :{self.port}'); start the "
                    "agent with --admin-port OTHER, or 0 for none"
                    if exc.errno == errno.EADDRINUSE else "check --admin-port")
            raise UnavailableError(f"cannot serve the admin port {self.host}:{self.port}: "
                                   f"{exc.strerror}", hint) from exc
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="meshnode-admin",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Blocking (joins the server thread): call it off the event loop."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _run(self, coro: Awaitable[_T], timeout: float = _TIMEOUT) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    # -- WSGI ------------------------------------------------------------------------------
    def _app(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _reply(start, "405 Method Not Allowed", b"GET only\n", "text/plain")
        try:
            if path == "/metrics":
                encoder, ctype = _encoder(environ.get("HTTP_ACCEPT", ""))
                return _reply(start, "200 OK", encoder(self._registry), ctype)
            if path == "/ready":
                ready = self._provider.ready
                return _reply(start, "200 OK" if ready else "503 Service Unavailable",
                              b"ready\n" if ready else b"not ready\n", "text/plain")
            if path == "/api/overview":
                window = _window(environ.get("QUERY_STRING", ""))
                body = json.dumps(self._run(self._provider.overview(window))).encode()
                return _reply(start, "200 OK", body, "application/json")
            if path == "/api/hosts" and self._hosts is not None:
                return _json(start, "200 OK", self._run(_call(self._hosts)))
            if path.startswith(CATALOG) and self._catalog is not None:
                return self._catalog_reply(start, path[len(CATALOG):],
                                           environ.get("QUERY_STRING", ""))
            if path in ("/", "/index.html"):
                return _static(start, ("index.html",))
            if path.startswith("/static/"):
                return _static(start, ("static", *path[len("/static/"):].split("/")))
        except ValueError as exc:
            return _reply(start, "400 Bad Request", f"{exc}\n".encode(), "text/plain")
        except TimeoutError:
            return _reply(start, "503 Service Unavailable", b"the agent is busy; retry\n",
                          "text/plain")
        return _reply(start, "404 Not Found", b"not found\n", "text/plain")

    def _catalog_reply(self, start: StartResponse, rest: str,
                       query: str) -> Iterable[bytes]:
        """/v1/catalog/services and /v1/catalog/service/NAME: routing and HTTP only; what they
        answer, and when, is the catalog's."""
        assert self._catalog is not None
        if rest == "services":
            service = None
        elif rest.startswith("service/") and rest.count("/") == 1:
            service = rest[len("service/"):]
        else:
            return _json(start, "404 Not Found", {
                "error": f"no catalog URL {CATALOG}{rest}",
                "hint": f"use {CATALOG}services or {CATALOG}service/NAME"})
        try:
            q = parse_query(query)
        except UsageError as exc:
            return _json(start, "400 Bad Request", {"error": exc.message, "hint": exc.hint})
        answer = self._catalog_answer(service, q)
        if answer is None:
            return _json(start, "429 Too Many Requests", {
                "error": f"{MAX_BLOCKING} blocking queries are already waiting",
                "hint": "retry later, or share one watch among your clients"})
        headers = [(INDEX_HEADER, str(answer.index))]
        if answer.body is None:
            return _json(start, "404 Not Found", {
                "error": f"no service named {service!r}",
                "hint": f"list them: GET {CATALOG}services"}, headers)
        return _json(start, "200 OK", answer.body, headers)

    def _catalog_answer(self, service: str | None, q: BlockingQuery) -> Answer | None:
        """The catalog's answer, run on the agent's loop; None when too many queries wait."""
        assert self._catalog is not None
        if q.index is None:
            return self._run(self._catalog.query(service, q))
        if not self._blocking.acquire(blocking=False):
            return None
        try:
            # the loop ends the wait; the thread's own timeout is only a backstop
            return self._run(self._catalog.query(service, q), q.wait + _TIMEOUT)
        finally:
            self._blocking.release()


async def _call(source: HostsSource) -> dict[str, Any]:
    return source()


def _json(start: StartResponse, status: str, body: Any,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    return _reply(start, status, json.dumps(body).encode() + b"\n", "application/json",
                  headers=headers)


def _encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The exposition format the scraper asks for; the plain text one when its Accept header
    does not parse (prometheus-client raises TypeError on "...; version=abc")."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")


def _window(query: str) -> float:
    raw = parse_qs(query).get("window", ["10"])[0]
    try:
        window = float(raw)
    except ValueError:
        raise ValueError(f"window must be a number of seconds, not {raw!r}") from None
    if not 0 < window <= _MAX_WINDOW:
        raise ValueError(f"window must be within 0..{_MAX_WINDOW:g} seconds")
    return window


def _static(start: StartResponse, parts: tuple[str, ...]) -> Iterable[bytes]:
    if not all(_STATIC_NAME.match(p) for p in parts):
        return _reply(start, "404 Not Found", b"not found\n", "text/plain")
    node = resources.files("meshnode.dashboard").joinpath(*parts)
    if not node.is_file():
        return _reply(start, "404 Not Found", b"not found\n", "text/plain")
    ctype = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    return _reply(start, "200 OK", node.read_bytes(), ctype, cache=True)


def _reply(start: StartResponse, status: str, body: bytes, ctype: str,
           cache: bool = False, headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   ("Cache-Control", "max-age=300" if cache else "no-store"), *(headers or ())])
    return [body]
