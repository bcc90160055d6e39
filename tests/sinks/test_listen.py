"""``boldstream listen`` and the subscriber snippets of docs/results.md, against a live publisher.

The publisher is the fake pipeline of fake_publisher.py (real builders, real
codec, XPUB on tcp://127.0.0.1:<ephemeral>). The command and the snippets run
as child processes, exactly as a user runs them; the snippets are cut out of
the document at test time, so the document cannot drift from working code.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from boldstream.sinks.listen import check_endpoint

DOC = Path(__file__).resolve().parents[2] / "docs" / "results.md"
TIMEOUT = 20.0


class Child:
    """A child process whose stdout lines arrive on a queue (reads never block the test)."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read(self, n: int, *, until: str | None = None) -> list[str]:
        """``n`` lines (or lines up to one containing ``until``), within TIMEOUT."""
        got: list[str] = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < n:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                pytest.fail(f"timed out after {len(got)} lines: {got[-3:]}; {self.stderr()}")
            if line is None:
                break
            got.append(line)
            if until is not None and until in line:
                break
        return got

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


def wait_for_subscriptions(publisher: Any, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while publisher.publisher.subscriptions < n:
        if time.monotonic() > deadline:
            pytest.fail(f"{publisher.publisher.subscriptions} of {n} subscriptions")
        if publisher.publisher.socket.poll(100):
            publisher.publisher.drain_subscriptions()


def listen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "boldstream", "listen", *args]


def publish_scan(publisher: Any) -> int:
    before = publisher.publisher.published
    publisher.start_series()
    publisher.scan(12, target_every=10)
    publisher.end_series(12)
    return int(publisher.publisher.published - before)


# --------------------------------------------------------------------------- the command


def test_listen_prints_one_readable_line_per_message(publisher: Any) -> None:
    child = Child(listen_cmd("--endpoint", publisher.endpoint, "--count", "1000000"))
    try:
        wait_for_subscriptions(publisher, 1)
        n = publish_scan(publisher)
        lines = child.read(n, until="series-end")
    finally:
        child.stop()
    assert len(lines) == n
    by_topic: dict[str, list[str]] = {}
    for line in lines:
        match = re.match(r"^\d\d:\d\d:\d\d\.\d{3}  (\S+)\s+sess-7f3a #12\s", line)
        assert match, line
        by_topic.setdefault(match.group(1), []).append(line)
    assert set(by_topic) == {
        "series-start",
        "volume-received",
        "motion",
        "qc",
        "target",
        "guidance",
        "warning",
        "volume-missing",
        "gap",
        "series-end",
    }
    assert len(by_topic["qc"]) == 10  # 12 volumes, 7 missing and 9 late
    assert "FD n/a" in by_topic["qc"][0] and re.search(r"FD \d\.\d{3} mm", by_topic["qc"][1])
    assert re.search(
        r"vol +10 +(PROVISIONAL|SETTLING|STABLE)  RAS \(-36\.0, 30\.0, 28\.0\)",
        by_topic["target"][0],
    )
    assert "arrays map[40x48x36]" in by_topic["target"][0]
    assert "trans " in by_topic["motion"][0] and " deg" in by_topic["motion"][0]
    assert "[volume-missing] volume 7 did not arrive" in " ".join(by_topic["warning"])
    assert "complete, 12 volumes" in by_topic["series-end"][0]
    assert "1.2.826" not in "\n".join(lines), "UIDs stay out of readable lines"


def test_listen_json_and_topic_filter(publisher: Any) -> None:
    child = Child(
        listen_cmd("--endpoint", publisher.endpoint, "--json", "--topic", "qc", "--count", "10")
    )
    try:
        wait_for_subscriptions(publisher, 1)
        publish_scan(publisher)
        lines = child.read(10)
        assert child.proc.wait(TIMEOUT) == 0  # --count reached
    finally:
        child.stop()
    assert len(lines) == 10
    headers = [json.loads(line) for line in lines]
    assert {h["topic"] for h in headers} == {"qc"}
    assert [h["body"]["index"] for h in headers] == [0, 1, 2, 3, 4, 5, 6, 8, 10, 11]
    assert all(h["kind"] == "result" and h["v"].startswith("1.") for h in headers)
    assert headers[0]["body"]["values"]["fd_mm"] is None


def test_ctrl_c_exits_cleanly(publisher: Any) -> None:
    child = Child(listen_cmd("--endpoint", publisher.endpoint))
    try:
        wait_for_subscriptions(publisher, 1)
        publisher.start_series()
        assert "series-start" in child.read(1)[0]
        child.proc.send_signal(signal.SIGINT)
        assert child.proc.wait(TIMEOUT) == 0
        err = child.stderr()
    finally:
        child.stop()
    assert "Traceback" not in err
    assert err.strip() == f"listening to {publisher.endpoint}"


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1", "127.0.0.1:5555", "tcp://127.0.0.1:99999", "udp://x:1"]
)
def test_a_bad_endpoint_is_one_line_and_exit_2(endpoint: str) -> None:
    proc = subprocess.run(
        listen_cmd("--endpoint", endpoint), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("boldstream listen: --endpoint"), proc.stderr


def test_check_endpoint_accepts_what_zmq_connects_to() -> None:
    for ok in (
        "tcp://127.0.0.1:11120",
        "tcp://scanner-console:11120",
        "tcp://[::1]:5",
        "ipc:///run/x",
    ):
        assert check_endpoint(ok) == ok


# --------------------------------------------------------------------------- the doc


def snippet(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"docs/results.md has no python block after <!-- snippet: {name} -->"
    return match.group(1)


def test_doc_snippet_subscribe(publisher: Any, tmp_path: Path) -> None:
    code = snippet("subscribe")
    assert "boldstream" not in code.replace("BOLDSTREAM_PUB", ""), (
        "the snippet must not need boldstream"
    )
    script = tmp_path / "subscribe.py"
    script.write_text(code)
    child = Child([sys.executable, str(script)], env={"BOLDSTREAM_PUB": publisher.endpoint})
    try:
        wait_for_subscriptions(publisher, 3)
        publish_scan(publisher)
        lines = child.read(100, until="ended (complete)")
    finally:
        child.stop()
    qc = [line for line in lines if " vol " in line]
    assert len(qc) == 10
    assert qc[0] == "sess-7f3a vol 0: FD None mm, outlier False"
    assert re.fullmatch(r"sess-7f3a vol 1: FD \d\.\d+ mm, outlier (True|False)", qc[1])
    assert "sess-7f3a target provisional at scanner RAS [-36.0, 30.0, 28.0] mm" in lines
    assert lines[-1] == "sess-7f3a ended (complete)"


def test_doc_snippet_arrays(publisher: Any, tmp_path: Path) -> None:
    code = snippet("arrays")
    script = tmp_path / "arrays.py"
    script.write_text(code)
    child = Child([sys.executable, str(script)], env={"BOLDSTREAM_PUB": publisher.endpoint})
    try:
        wait_for_subscriptions(publisher, 1)
        result = publisher.target(5)
        lines = child.read(1)
        assert child.proc.wait(TIMEOUT) == 0, child.stderr()
    finally:
        child.stop()
    expected = float(np.nanmin(result.arrays["map"]))
    assert lines == [f"map (40, 48, 36) most anticorrelated r {expected}"]
