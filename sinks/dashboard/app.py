"""The technician's live dashboard: a SUB thread feeding an HTTP server.

:class:`Dashboard` subscribes to the pipeline's result publisher on a thread of
its own (the only thread that touches its ZeroMQ sockets), keeps a
:class:`DashboardState`, and serves it with the standard library's
:class:`~http.server.ThreadingHTTPServer`:

``/``, ``/static/...``  the page and its assets (package data, never a CDN)
``/events``             server-sent events: a snapshot, then deltas; a status
                        event and a comment every ``heartbeat_s``
``/api/snapshot``       the snapshot as JSON
``/healthz``            200 while the process serves HTTP
``/readyz``             200 while the SUB thread runs and is connected to the
                        publisher, 503 otherwise; JSON body either way
``/metrics``            Prometheus text format

Only GET and HEAD are served, static files come from a fixed table (no path
is ever joined from a request), each response carries a strict
Content-Security-Policy, the Host header must name this machine (a defence
against DNS rebinding), and the default address is 127.0.0.1.

Token authentication: bound to any address other than loopback, the
dashboard refuses to start without a ``token``. With a token, every request
but ``/healthz`` must carry it: ``?token=`` in the URL (once: the reply sets
an HttpOnly, SameSite=Strict cookie, and the page itself is redirected to a
URL without the token), the ``boldstream_token`` cookie, or an
``Authorization: Bearer`` header (scripts, Prometheus); others get 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from boldstream.errors import SinkError
from boldstream.logs import get_logger
from boldstream.sinks import topics
from boldstream.sinks.dashboard import metrics
from boldstream.sinks.dashboard.state import DashboardState, to_json
from boldstream.stream.codec import MessageError
from boldstream.stream.curve import CurveClient
from boldstream.stream.pubsub import Subscriber

__all__ = ["TOKEN_COOKIE", "Dashboard", "DashboardError", "read_token_file"]

log = get_logger("dashboard")

#: name in the URL -> (file under static/, content type)
_STATIC: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/vendor/uPlot.iife.min.js": (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
    ),
    "/static/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "/static/vendor/uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
}

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_MAX_EVENT_STREAMS = 32

#: The cookie that carries the token after the first ``?token=`` visit.
TOKEN_COOKIE = "boldstream_token"
#: Paths served without a token (health checks of a service manager or container).
_OPEN_PATHS = frozenset({"/healthz"})
#: URL-safe characters only (it travels in URLs and cookies); 16 at least.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")


class DashboardError(SinkError):
    """The dashboard could not start (address in use, bad endpoint...)."""


def _check_token(token: str) -> str:
    if not _TOKEN_RE.match(token):
        raise DashboardError(
            "the dashboard token must be 16-256 URL-safe characters (A-Z a-z 0-9 . _ ~ -); "
            'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    return token


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (surrounding whitespace ignored); DashboardError if unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DashboardError(f"cannot read the dashboard token file {str(path)!r}: {exc}") from None
    if not text:
        raise DashboardError(f"the dashboard token file {str(path)!r} is empty")
    return _check_token(text)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_static() -> dict[str, tuple[bytes, str]]:
    root = resources.files("boldstream.sinks.dashboard").joinpath("static")
    out: dict[str, tuple[bytes, str]] = {}
    for url, (name, ctype) in _STATIC.items():
        node = root
        for part in name.split("/"):
            node = node.joinpath(part)
        out[url] = (node.read_bytes(), ctype)
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Threads are tracked by the Dashboard (streams are told to close on stop).
    block_on_close = False
    dashboard: Dashboard


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "boldstream-dashboard"
    sys_version = ""
    # A request that does not arrive in full within this many seconds is dropped;
    # an event stream whose page stops reading is dropped after it too.
    timeout = 10.0
    protocol_version = "HTTP/1.0"
    #: Set-Cookie value to send with the response (a valid ``?token=`` came in).
    _cookie: str | None = None
    _routes: ClassVar[dict[str, str]] = {
        "/events": "_events",
        "/api/snapshot": "_snapshot",
        "/healthz": "_healthz",
        "/readyz": "_readyz",
        "/metrics": "_metrics",
    }

    # -- plumbing ----------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http", client=self.client_address[0], request=format % args)

    def _host_allowed(self) -> bool:
        host = self.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 clients may omit it; rebinding needs a browser, which sends it
        if host.startswith("["):  # [IPv6]:port
            name = host[1 : host.find("]")].lower()
        else:
            name = host.split(":", 1)[0].lower()
        if name in self.server.dashboard.allowed_hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        *,
        cache: str = "no-store",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self._security_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _security_headers(self) -> None:
        if self._cookie is not None:
            self.send_header("Set-Cookie", self._cookie)
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")

    def _json(self, status: HTTPStatus, value: Any) -> None:
        self._send(status, to_json(value).encode(), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _presented_token(self) -> tuple[str | None, bool]:
        """(token the request carries, whether it came in the URL)."""
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "token" and value:
                return value, True
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), False
        for item in self.headers.get("Cookie", "").split(";"):
            name, _, value = item.strip().partition("=")
            if name == TOKEN_COOKIE and value:
                return value, False
        return None, False

    def _authorized(self, path: str) -> bool:
        """True if the request may go on; otherwise a 401 or redirect has been sent."""
        token = self.server.dashboard.token
        if token is None or path in _OPEN_PATHS:
            return True
        presented, in_url = self._presented_token()
        if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
            self.send_response(HTTPStatus.UNAUTHORIZED)
            body = b"unauthorized: open the dashboard's URL with ?token=...\n"
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("WWW-Authenticate", 'Bearer realm="boldstream"')
            self._security_headers()
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return False
        if in_url:
            self._cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            if path == "/":
                # Take the token out of the address bar (and of the history).
                self.send_response(HTTPStatus.SEE_OTHER)
                self.send_header("Location", "/")
                self.send_header("Content-Length", "0")
                self.send_header("Cache-Control", "no-store")
                self._security_headers()
                self.end_headers()
                return False
        return True

    def do_GET(self) -> None:
        if not self._host_allowed():
            self._send(
                HTTPStatus.MISDIRECTED_REQUEST,
                b"unknown host name; start the dashboard with it in allowed_hosts\n",
                "text/plain; charset=utf-8",
            )
            return
        path = self.path.split("?", 1)[0]
        self._cookie = None
        if not self._authorized(path):
            return
        static = self.server.dashboard.static.get(path)
        if static is not None:
            body, ctype = static
            self._send(HTTPStatus.OK, body, ctype, cache="no-cache")
            return
        route = self._routes.get(path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
            return
        getattr(self, route)()

    # -- endpoints -----------------------------------------------------------------

    def _snapshot(self) -> None:
        self._json(HTTPStatus.OK, self.server.dashboard.state.snapshot())

    def _healthz(self) -> None:
        self._json(HTTPStatus.OK, {"status": "ok"})

    def _readyz(self) -> None:
        state = self.server.dashboard.state
        sub = state.subscriber()
        ready = bool(sub["running"] and sub["connected"])
        body = {"ready": ready, "endpoint": self.server.dashboard.pub_endpoint, **sub}
        self._json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, body)

    def _metrics(self) -> None:
        dashboard = self.server.dashboard
        text = metrics.exposition(dashboard.state.metrics())
        if dashboard.extra_metrics is not None:
            try:
                text += dashboard.extra_metrics()
            except Exception as exc:  # never let a probe break the scrape
                log.warning("extra metrics failed", error=str(exc))
        self._send(HTTPStatus.OK, text.encode(), metrics.CONTENT_TYPE)

    def _events(self) -> None:
        dashboard = self.server.dashboard
        if dashboard.state.listeners >= _MAX_EVENT_STREAMS:
            self._send(
                HTTPStatus.SERVICE_UNAVAILABLE,
                b"too many open dashboards\n",
                "text/plain; charset=utf-8",
            )
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")  # no proxy buffering
        self._security_headers()
        self.end_headers()
        if self.command == "HEAD":
            return
        snapshot, listener = dashboard.state.listen()
        snapshot["heartbeat_s"] = dashboard.heartbeat_s
        try:
            # Retry after 1 s when the stream drops (EventSource's default is 3 s).
            self._write(f"retry: 1000\nevent: snapshot\ndata: {to_json(snapshot)}\n\n")
            while not dashboard.stopping.is_set():
                try:
                    text = listener.events.get(timeout=dashboard.heartbeat_s)
                except queue.Empty:
                    # A comment keeps proxies from closing an idle stream; the
                    # status event tells the page the stream is alive.
                    status = {"type": "status", "subscriber": dashboard.state.subscriber()}
                    self._write(f": heartbeat\n\nevent: delta\ndata: {to_json(status)}\n\n")
                    continue
                if text is None:
                    return
                self._write(f"event: delta\ndata: {text}\n\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            return
        finally:
            dashboard.state.unlisten(listener)

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode())
        self.wfile.flush()


class Dashboard:
    """Live dashboard for ``pub_endpoint``, served on ``host``:``port``.

    ``port=0`` takes any free port (read :attr:`port` after :meth:`start`).
    ``allowed_hosts`` adds host names that pages may use in URLs besides IP
    literals, ``localhost`` and this machine's own names. ``context`` is a
    ZeroMQ context to use (default: one of its own, ended by :meth:`stop`).

    ``token``: the secret every request but ``/healthz`` must carry (see the
    module docstring). ``require_token``: refuse to start without one; the
    default (None) requires it when ``host`` is not a loopback address.
    ``curve``: subscribe as a CurveZMQ client (``pipeline.curve_secret_key``).
    """

    def __init__(
        self,
        pub_endpoint: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        heartbeat_s: float = 10.0,
        allowed_hosts: tuple[str, ...] = (),
        state: DashboardState | None = None,
        context: zmq.Context[Any] | None = None,
        token: str | None = None,
        require_token: bool | None = None,
        curve: CurveClient | None = None,
        extra_metrics: Callable[[], str] | None = None,
    ) -> None:
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
        if require_token is None:
            require_token = not _is_loopback(host)
        if token is None and require_token:
            raise DashboardError(
                f"the dashboard binds to {host}, which is not a loopback address: it needs a "
                "token (dashboard.token_file: a file holding a secret of 16+ URL-safe "
                "characters) or a loopback bind address"
            )
        self.token = None if token is None else _check_token(token)
        self.curve = curve
        #: More Prometheus exposition text appended to /metrics (e.g. stage lag
        #: from the pipeline that runs in the same process).
        self.extra_metrics = extra_metrics
        self.pub_endpoint = pub_endpoint
        self.host = host
        self.heartbeat_s = float(heartbeat_s)
        self.state = state if state is not None else DashboardState()
        self.static = _load_static()
        names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
        self.allowed_hosts = frozenset(names | {h.lower() for h in allowed_hosts})
        self.stopping = threading.Event()
        self._requested_port = port
        self._own_context = context is None
        self._context = context
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._sub_error: BaseException | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise DashboardError("the dashboard is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Bind the HTTP port, connect the subscriber, start both threads."""
        if self._server is not None:
            raise DashboardError("the dashboard is already started")
        try:
            server_cls: type[_Server] = _Server
            if ":" in self.host:

                class _Server6(_Server):
                    address_family = socket.AF_INET6

                server_cls = _Server6
            server = server_cls((self.host, self._requested_port), _Handler)
        except OSError as exc:
            raise DashboardError(
                f"cannot serve the dashboard on {self.host}:{self._requested_port}: {exc}"
            ) from exc
        server.dashboard = self
        self._server = server
        if self._context is None:
            self._context = zmq.Context()
        started = threading.Event()
        sub = threading.Thread(
            target=self._subscribe, args=(started,), name="dashboard-sub", daemon=True
        )
        http = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="dashboard-http",
            daemon=True,
        )
        self._threads = [sub, http]
        sub.start()
        started.wait(5.0)
        if self._sub_error is not None:
            server.server_close()
            self._server = None
            raise DashboardError(
                f"cannot subscribe to {self.pub_endpoint}: {self._sub_error}"
            ) from self._sub_error
        http.start()
        log.info("dashboard serving", url=self.url, publisher=self.pub_endpoint)

    def stop(self, *, timeout: float = 5.0) -> None:
        """Close event streams, stop serving and unsubscribe; idempotent."""
        server = self._server
        if server is None:
            return
        self.stopping.set()
        self.state.close_listeners()
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._threads = []
        self._server = None
        if alive:
            log.warning("dashboard threads still running after stop", threads=alive)
        elif self._own_context and self._context is not None:
            self._context.term()
            self._context = None
        log.info("dashboard stopped")

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the SUB thread: owns its sockets from creation to close ---------------------

    def _subscribe(self, started: threading.Event) -> None:
        assert self._context is not None
        try:
            sub = Subscriber(
                self._context,
                self.pub_endpoint,
                topics=topics.DASHBOARD_TOPICS,
                rcvhwm=1000,
                curve=self.curve,
            )
        except zmq.ZMQError as exc:
            self._sub_error = exc
            started.set()
            return
        monitor = sub.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )
        monitor.linger = 0
        poller = zmq.Poller()
        poller.register(sub.socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self.state.set_subscriber(running=True, connected=False)
        started.set()
        last_heartbeat = time.monotonic()
        try:
            while not self.stopping.is_set():
                ready = dict(poller.poll(200))
                if monitor in ready:
                    self._monitor_events(monitor)
                if sub.socket in ready:
                    self._drain(sub)
                now = time.monotonic()
                if now - last_heartbeat >= self.heartbeat_s:
                    last_heartbeat = now
                    self.state.heartbeat()
        except Exception:
            log.exception("dashboard subscriber failed")
            raise
        finally:
            self.state.set_subscriber(running=False, connected=False)
            sub.socket.disable_monitor()
            monitor.close(linger=0)
            sub.close()

    def _monitor_events(self, monitor: zmq.Socket[Any]) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.info("connected to publisher", publisher=self.pub_endpoint)
                self.state.set_subscriber(connected=True)
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                log.warning("publisher connection lost", publisher=self.pub_endpoint)
                self.state.set_subscriber(connected=False)

    def _drain(self, sub: Subscriber) -> None:
        # Bounded so that a flood cannot starve the monitor and the stop flag.
        for _ in range(256):
            try:
                message = sub.recv(timeout_ms=0)
            except MessageError as exc:
                self.state.bad_message()
                log.warning("undecodable message", error=str(exc))
                continue
            if message is None:
                break
            self.state.apply(message)
        if sub.dropped != self.state.dropped:
            self.state.set_subscriber(dropped=sub.dropped)
