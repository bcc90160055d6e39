"""The dashboard's HTTP endpoints, against a real fake publisher on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from boldstream.sinks import topics
from boldstream.sinks.dashboard import Dashboard, DashboardError

TIMEOUT = 10.0


def get(
    dashboard: Dashboard,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def get_json(dashboard: Dashboard, path: str) -> tuple[int, Any]:
    status, _, body = get(dashboard, path)
    return status, json.loads(body)


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class EventStream:
    """A minimal server-sent events reader over http.client."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=TIMEOUT)
        self.conn.request("GET", "/events")
        self.resp = self.conn.getresponse()
        self.comments = 0

    def next(self) -> tuple[str, dict[str, Any]]:
        """The next event (name, data); comments are counted and skipped."""
        name, data = "message", []
        while True:
            line = self.resp.fp.readline()
            if not line:
                raise EOFError("event stream closed")
            text = line.decode().rstrip("\n")
            if text == "":
                if data:
                    return name, json.loads("\n".join(data))
                continue
            if text.startswith(":"):
                self.comments += 1
            elif text.startswith("event: "):
                name = text[7:]
            elif text.startswith("data: "):
                data.append(text[6:])

    def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            _, event = self.next()
            if predicate(event):
                return event
        pytest.fail("no matching event before the deadline")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def live(publisher: Any, make_dashboard: Callable[..., Dashboard]) -> Iterator[Dashboard]:
    dashboard = make_dashboard(publisher.endpoint, heartbeat_s=0.5)
    publisher.wait_for_subscribers()
    yield dashboard


def test_binds_loopback_by_default_on_an_ephemeral_port(live: Dashboard) -> None:
    assert live.host == "127.0.0.1"
    assert live.url == f"http://127.0.0.1:{live.port}/"
    assert live.port > 0


def test_healthz_and_readyz_follow_the_publisher(
    zctx: zmq.Context[Any], make_dashboard: Callable[..., Dashboard]
) -> None:
    # A publisher that is not there yet: reserve a port, then free it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dashboard = make_dashboard(f"tcp://127.0.0.1:{port}")
    assert get(dashboard, "/healthz")[0] == 200
    status, body = get_json(dashboard, "/readyz")
    assert status == 503 and body["ready"] is False and body["running"] is True

    pub = zctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.bind(f"tcp://127.0.0.1:{port}")
    wait_until("ready", lambda: get(dashboard, "/readyz")[0] == 200)
    pub.close(linger=0)
    wait_until("not ready after the publisher left", lambda: get(dashboard, "/readyz")[0] == 503)


def test_snapshot_and_metrics_reflect_a_scan(live: Dashboard, publisher: Any) -> None:
    publisher.start_series()
    publisher.scan(12, target_every=10)
    publisher.end_series(12)

    def series() -> Any:
        _, snap = get_json(live, "/api/snapshot")
        s = snap["series"]
        return s[0] if s and s[0]["ended"] else None

    s = wait_until("the series end", series)
    assert s["qc"]["index"] == [i for i in range(12) if i not in (7, 9)]
    assert len(s["motion"]["trans_x"]) == 10
    assert s["receiver"]["received"] == 10
    assert s["receiver"]["n_missing"] == 2 and s["receiver"]["n_late"] == 1
    assert s["target"]["status"] == "provisional" and len(s["target"]["slices"]) == 3
    assert s["usable"]["frames_total"] == 10
    assert {w["code"] for w in s["warnings"]} == {"volume-missing"}

    status, headers, body = get(live, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "boldstream_dashboard_volumes_received_total 10\n" in text
    assert "boldstream_dashboard_volumes_missing_total 2\n" in text
    assert "boldstream_dashboard_volumes_late_total 1\n" in text
    assert "boldstream_dashboard_latency_seconds_count 10\n" in text
    assert 'boldstream_dashboard_latency_seconds_bucket{le="+Inf"} 10\n' in text
    assert "boldstream_dashboard_publisher_connected 1\n" in text


def test_events_send_a_snapshot_then_deltas_then_heartbeats(
    live: Dashboard, publisher: Any
) -> None:
    publisher.start_series()
    publisher.scan(3)
    wait_until(
        "3 qc rows",
        lambda: (
            len(get_json(live, "/api/snapshot")[1]["series"]) == 1
            and len(get_json(live, "/api/snapshot")[1]["series"][0]["qc"]["index"]) == 3
        ),
    )
    stream = EventStream(live)
    try:
        assert stream.resp.status == 200
        assert stream.resp.headers["Content-Type"].startswith("text/event-stream")
        assert stream.resp.headers["Cache-Control"] == "no-store"
        name, snap = stream.next()
        assert name == "snapshot" and snap["type"] == "snapshot"
        assert snap["heartbeat_s"] == 0.5
        assert snap["series"][0]["qc"]["index"] == [0, 1, 2]
        publisher.scan(2, start=3)
        rows = [stream.until(lambda e: e["type"] == "qc")["row"]["index"] for _ in range(2)]
        assert rows == [3, 4]  # after the snapshot, in order, none twice
        status = stream.until(lambda e: e["type"] == "status")
        assert status["subscriber"]["connected"] is True
        wait_until("a heartbeat comment", lambda: stream.next() and stream.comments > 0)
    finally:
        stream.close()


def test_stop_closes_open_event_streams(
    publisher: Any, make_dashboard: Callable[..., Dashboard]
) -> None:
    dashboard = make_dashboard(publisher.endpoint, heartbeat_s=30.0)
    stream = EventStream(dashboard)
    try:
        assert stream.next()[0] == "snapshot"
        started = time.monotonic()
        dashboard.stop()
        # Events queued before the stop come first (under load the subscriber's
        # "connected" status can follow the snapshot); then the stream ends.
        with pytest.raises(EOFError):
            for _ in range(10):
                stream.next()
        assert time.monotonic() - started < 5.0
    finally:
        stream.close()
    dashboard.stop()  # idempotent


def test_page_and_assets_are_served_with_a_strict_policy(live: Dashboard) -> None:
    status, headers, body = get(live, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"].startswith("boldstream-dashboard")
    assert b"/static/vendor/uPlot.iife.min.js" in body
    for path, ctype in (
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
        ("/static/vendor/uPlot.iife.min.js", "text/javascript"),
        ("/static/vendor/uPlot.min.css", "text/css"),
        ("/static/vendor/uPlot.LICENSE", "text/plain"),
    ):
        status, headers, body = get(live, path)
        assert status == 200 and headers["Content-Type"].startswith(ctype) and body, path
    status, headers, body = get(live, "/static/app.js", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


@pytest.mark.parametrize(
    "path",
    ["/nope", "/static/../app.py", "/static/%2e%2e/state.py", "/static/", "//etc/passwd"],
)
def test_unknown_paths_are_not_found(live: Dashboard, path: str) -> None:
    assert get(live, path)[0] == 404


def test_the_dashboard_is_read_only(live: Dashboard) -> None:
    for method in ("POST", "PUT", "DELETE"):
        assert get(live, "/api/snapshot", method=method)[0] == 501


def test_foreign_host_names_are_refused(live: Dashboard) -> None:
    """A DNS-rebinding page would send its own host name; IP literals and localhost pass."""
    assert get(live, "/api/snapshot", headers={"Host": "evil.example:80"})[0] == 421
    assert get(live, "/api/snapshot", headers={"Host": f"localhost:{live.port}"})[0] == 200
    assert get(live, "/api/snapshot", headers={"Host": "[::1]:80"})[0] == 200


def test_allowed_hosts_extend_the_host_check(
    publisher: Any, make_dashboard: Callable[..., Dashboard]
) -> None:
    dashboard = make_dashboard(publisher.endpoint, allowed_hosts=("mr-console.local",))
    assert get(dashboard, "/healthz", headers={"Host": "MR-Console.local:8080"})[0] == 200


def test_undecodable_messages_are_counted_and_skipped(live: Dashboard, publisher: Any) -> None:
    publisher.publisher.socket.send_multipart([topics.QC.encode(), b"not json"])
    publisher.publisher.socket.send_multipart([topics.QC.encode(), b'{"v":"9.0"}'])
    publisher.start_series()
    publisher.scan(1)
    wait_until("the good volume", lambda: get_json(live, "/api/snapshot")[1]["series"])
    _, ready = get_json(live, "/readyz")
    assert ready["bad_messages"] == 2


def test_a_port_in_use_is_a_clear_error(publisher: Any, live: Dashboard) -> None:
    other = Dashboard(publisher.endpoint, port=live.port)
    with pytest.raises(DashboardError, match="cannot serve the dashboard"):
        other.start()
    other.stop()


def test_too_many_streams_are_refused(
    publisher: Any, make_dashboard: Callable[..., Dashboard], monkeypatch: pytest.MonkeyPatch
) -> None:
    from boldstream.sinks.dashboard import app

    monkeypatch.setattr(app, "_MAX_EVENT_STREAMS", 1)
    dashboard = make_dashboard(publisher.endpoint)
    first = EventStream(dashboard)
    try:
        assert first.next()[0] == "snapshot"
        assert get(dashboard, "/events")[0] == 503
    finally:
        first.close()
