"""The page in a real headless Chromium (Debian's), driven by Playwright.

While the fake publisher streams a simulated scan, the FD chart grows, the
good-minutes figure changes, the target panel appears after target messages,
and the connection-lost banner shows when the server goes away (and goes
once a server is back). Screenshots go to $BOLDSTREAM_ARTIFACTS (or tmp_path).

Needs ``apt-get install chromium`` and ``pip install playwright``; the browser
is Debian's /usr/bin/chromium (``playwright install`` is never used).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from boldstream.sinks import topics
from boldstream.sinks.dashboard import Dashboard

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DEADLINE_MS = 15_000


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is needed: apt-get install -y chromium")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
            timeout=DEADLINE_MS,
        )
        context.set_default_timeout(DEADLINE_MS)
        try:
            yield context
        finally:
            context.close()


def until(
    what: str, predicate: Callable[[], bool], *, timeout_s: float = DEADLINE_MS / 1000
) -> None:
    """Poll the page through ``predicate`` until it holds, failing after ``timeout_s``.

    (The page's Content-Security-Policy forbids eval, which Playwright's
    ``wait_for_function`` needs; element queries work under it.)
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def fd_points(page: Page) -> int:
    return int(page.get_attribute("#chart-fd", "data-points") or 0)


def good_minutes(page: Page) -> float:
    return float(page.get_attribute("#good-0\\.2 .big", "data-minutes") or "nan")


def test_live_page_follows_a_scan(
    browser: BrowserContext,
    publisher: Any,
    make_dashboard: Callable[..., Dashboard],
    artifacts: Path,
) -> None:
    dashboard = make_dashboard(publisher.endpoint, heartbeat_s=1.0)
    publisher.wait_for_subscribers()
    page = browser.new_page()
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))

    page.goto(dashboard.url)
    expect(page.locator("body")).to_have_attribute("data-conn", "live")
    assert page.is_hidden("#banner")
    assert page.is_hidden("#target-panel")

    # A first stretch of the scan: volumes 7 (incomplete) and 9 (late) never come.
    publisher.start_series()
    publisher.scan(20)
    until("17 FD points", lambda: fd_points(page) >= 17)
    first_points, first_minutes = fd_points(page), good_minutes(page)
    assert page.inner_text("#received") == "18"
    assert page.inner_text("#missing") == "2"
    assert page.inner_text("#missing-sub") == "1 late · #7, #9"
    assert "sess-7f3a" in page.inner_text("#series-title")
    # A warning that belongs to no series (the receiver's spool refusing
    # instances) shows in the list of the series on screen, newest first.
    refused = (
        "the spool refused an instance: spool /data/spool is below its free-space floor. "
        "The scanner was told the store failed (0xA700) and may resend; it is already in "
        "the live analysis, but not stored on this computer; resend it from the console "
        "once the spool is fixed."
    )
    publisher.send(topics.warning_result(None, None, refused, code="spool-refused"))
    expect(page.locator("#warnings li").first).to_contain_text("spool-refused " + refused)

    publisher.scan(25, start=20)
    until(
        "more FD points and more good minutes",
        lambda: fd_points(page) > first_points and good_minutes(page) > first_minutes,
    )
    assert fd_points(page) > first_points
    assert good_minutes(page) > first_minutes
    assert "min good" in page.inner_text("#usable-rows")
    assert "goal in" in page.inner_text("#usable-rows")

    # The target panel appears once target messages exist.
    why = [
        "3.2 good minutes, stable needs 8",
        "within the stable limits for 30 s so far (stable: held for 60 s)",
    ]
    publisher.target(44, status="provisional", p_value=0.004, held_s=30.0, reasons=why)
    page.wait_for_selector("#target-panel", state="visible")
    expect(page.locator("#target-slices canvas")).to_have_count(3)
    assert page.inner_text("#target-status").lower() == "provisional"
    assert page.inner_text("#target-ras") == "-36.0, 30.0, 28.0"
    # ... with why it is not settled yet, and the test against chance.
    expect(page.locator("#target-reasons li")).to_have_text(why)
    assert page.inner_text("#target-p") == "p = 0.004"
    assert page.inner_text("#target-held") == "30 s"
    publisher.scan(15, start=45)
    until("56 FD points", lambda: fd_points(page) >= 56)

    # The guidance panel beside the good minutes shows the latest advice, big.
    expect(page.locator("#guidance-panel")).to_be_visible()
    publisher.guidance(
        60,
        {
            "state": "keep-scanning",
            "message": "keep scanning: about 6 more minutes for a settled target (4-9 min)",
            "minutes_more": 6.2,
            "minutes_more_range": [4.1, 9.3],
            "reason": "split-half 11.0 mm at 5.0 good minutes",
            "good_minutes": 5.1,
            "fd_threshold_mm": 0.5,
            "split_half_mm": 11.0,
            "drift_mm": 2.0,
        },
    )
    expect(page.locator("#guidance-panel")).to_have_attribute("data-state", "keep-scanning")
    assert page.inner_text("#guidance-message").startswith("keep scanning: about 6 more minutes")
    assert "likely 4–9 more minutes" in page.inner_text("#guidance-range")
    assert page.inner_text("#guidance-state").lower() == "keep scanning"
    publisher.guidance(
        61,
        {
            "state": "enough-data",
            "message": "enough data: target settled (split-half 4.2 mm, drift 1.3 mm over "
            "the last minute)",
            "minutes_more": 0.0,
            "minutes_more_range": None,
            "reason": "10.4 good minutes (>= 10)",
        },
    )
    expect(page.locator("#guidance-panel")).to_have_attribute("data-state", "enough-data")
    assert page.inner_text("#guidance-message").startswith("enough data: target settled")

    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
    assert problems == []
    origin = dashboard.url.rstrip("/")
    assert all(u.startswith(origin) or u.startswith("data:") for u in requests), requests

    # The server goes away: the page says so and keeps trying.
    port = dashboard.port
    dashboard.stop()
    page.wait_for_selector("#banner", state="visible")
    assert page.inner_text("#banner") == "connection lost — reconnecting"
    assert page.get_attribute("#conn", "data-state") == "lost"
    page.screenshot(path=str(artifacts / "dashboard-connection-lost.png"))

    # ... and comes back by itself when a server is there again.
    make_dashboard(publisher.endpoint, port=port, heartbeat_s=1.0)
    expect(page.locator("body")).to_have_attribute("data-conn", "live")
    assert page.is_hidden("#banner")
