"""Dashboard token authentication, over real HTTP on 127.0.0.1.

Bound to a non-loopback address the dashboard refuses to start without a
token; with a token (forced on loopback here with ``require_token=True``)
every path but /healthz answers 401 without it, ``?token=`` once sets an
HttpOnly SameSite=Strict cookie (the page is redirected to a clean URL), and
the cookie or a bearer header let requests through. A dashboard with CURVE
client keys subscribes to a CURVE publisher; one without cannot.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from pipeline_support import make_series, pipeline_settings, volumes, wait_for

from boldstream.pipeline.service import Pipeline
from boldstream.sinks.dashboard import Dashboard, DashboardError
from boldstream.sinks.dashboard.app import TOKEN_COOKIE, read_token_file

pytestmark = pytest.mark.timeout(120)

TOKEN = "k3Y-zq_8Hn2.VwX~rT5uLp0aBcDeFgHi"
TIMEOUT = 10.0
PROTECTED = [
    "/",
    "/static/app.js",
    "/api/snapshot",
    "/events",
    "/metrics",
    "/readyz",
    "/api/snapshot?x=1",
]


def request(
    dashboard: Dashboard, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = b"" if path.startswith("/events") and resp.status == 200 else resp.read()
        return resp.status, resp.headers, body
    finally:
        conn.close()


def first_event(dashboard: Dashboard, headers: dict[str, str]) -> tuple[str, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/events", headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200
        name, data = "", ""
        while not data:
            line = resp.fp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        return name, json.loads(data)
    finally:
        conn.close()


@pytest.fixture
def guarded() -> Iterator[Dashboard]:
    # Nothing listens on port 9 of loopback: the subscriber just waits.
    d = Dashboard("tcp://127.0.0.1:9", token=TOKEN, require_token=True, heartbeat_s=0.5)
    d.start()
    yield d
    d.stop()


def test_a_non_loopback_bind_needs_a_token() -> None:
    for host in ("0.0.0.0", "192.0.2.10", "::"):
        with pytest.raises(DashboardError, match=r"not a loopback address: it needs a token"):
            Dashboard("tcp://127.0.0.1:9", host=host)
    with pytest.raises(DashboardError, match="needs a token"):
        Dashboard("tcp://127.0.0.1:9", require_token=True)
    with pytest.raises(DashboardError, match="16-256 URL-safe"):
        Dashboard("tcp://127.0.0.1:9", host="0.0.0.0", token="short")
    with pytest.raises(DashboardError, match="16-256 URL-safe"):
        Dashboard("tcp://127.0.0.1:9", token="a" * 20 + ";Path=/")
    # Loopback without a token stays open, as before.
    assert Dashboard("tcp://127.0.0.1:9").token is None
    assert Dashboard("tcp://127.0.0.1:9", host="0.0.0.0", token=TOKEN).token == TOKEN


def test_healthz_stays_open_and_everything_else_needs_the_token(guarded: Dashboard) -> None:
    status, _, body = request(guarded, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    wrong = "x" * len(TOKEN)
    for path in PROTECTED:
        for headers in (
            {},
            {"Cookie": f"{TOKEN_COOKIE}={wrong}"},
            {"Authorization": f"Bearer {wrong}"},
            {"Cookie": f"other={TOKEN}"},
        ):
            status, head, body = request(guarded, path, headers=headers)
            assert status == 401, (path, headers)
            assert head["WWW-Authenticate"] == 'Bearer realm="boldstream"'
            assert TOKEN.encode() not in body and "Set-Cookie" not in head
        status, _, _ = request(guarded, f"{path.split('?')[0]}?token={wrong}")
        assert status == 401
        assert request(guarded, path, method="HEAD")[0] == 401


def test_token_in_the_url_once_then_a_strict_cookie(guarded: Dashboard) -> None:
    status, head, _ = request(guarded, f"/?token={TOKEN}")
    assert status == 303 and head["Location"] == "/"
    cookie = head["Set-Cookie"]
    parts = [p.strip() for p in cookie.split(";")]
    assert parts[0] == f"{TOKEN_COOKIE}={TOKEN}"
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(parts[1:])
    jar = {"Cookie": parts[0]}
    status, head, body = request(guarded, "/", headers=jar)
    assert status == 200 and b"<html" in body.lower()
    assert request(guarded, "/static/app.js", headers=jar)[0] == 200
    status, _, body = request(guarded, "/api/snapshot", headers=jar)
    assert status == 200 and "series" in json.loads(body)
    name, snapshot = first_event(guarded, jar)
    assert name == "snapshot" and "series" in snapshot
    # A script or Prometheus: the bearer header.
    status, _, body = request(guarded, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"boldstream" in body
    # An API URL with the token is served at once (and sets the cookie too).
    status, head, _ = request(guarded, f"/api/snapshot?token={TOKEN}")
    assert status == 200 and head["Set-Cookie"].startswith(f"{TOKEN_COOKIE}=")


def test_a_token_is_enforced_on_loopback_too() -> None:
    d = Dashboard("tcp://127.0.0.1:9", token=TOKEN)
    d.start()
    try:
        assert request(d, "/api/snapshot")[0] == 401
        assert request(d, "/healthz")[0] == 200
    finally:
        d.stop()


def test_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(f"  {TOKEN}\n")
    assert read_token_file(f) == TOKEN
    f.write_text("\n")
    with pytest.raises(DashboardError, match="is empty"):
        read_token_file(f)
    with pytest.raises(DashboardError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_dashboard_subscribes_to_a_curve_publisher_with_keys(
    tmp_path: Path, keys: dict[str, tuple[Path, Path]], ctx: zmq.Context[Any]
) -> None:
    settings = pipeline_settings(tmp_path, f"pipeline.curve_secret_key='{keys['server'][1]}'")
    with Pipeline(settings, mode="thread") as pipeline:
        keyed = Dashboard(
            pipeline.pub_endpoint, token=TOKEN, curve=pipeline.subscriber_curve(), context=ctx
        )
        keyless = Dashboard(pipeline.pub_endpoint, context=ctx)
        keyed.start()
        keyless.start()
        try:
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            assert wait_for(lambda: request(keyed, "/readyz", headers=bearer)[0] == 200)
            series = make_series("1.2.826.0.1.3680043.8.498.81")
            for v in volumes(4, series):
                pipeline.submit(v)
            pipeline.end_series(series, n_volumes=4)
            assert pipeline.drain(60)

            def seen(d: Dashboard, headers: dict[str, str]) -> int:
                body = json.loads(request(d, "/api/snapshot", headers=headers)[2])
                return len(body["series"])

            assert wait_for(lambda: seen(keyed, bearer) == 1)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                assert seen(keyless, {}) == 0
                assert request(keyless, "/readyz")[0] == 503
        finally:
            keyed.stop()
            keyless.stop()
