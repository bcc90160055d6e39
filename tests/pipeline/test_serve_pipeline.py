"""``serve`` as a real process: storescu sends mosaics, results come out on the XPUB.

Runs ``python -m boldstream serve``: receiver -> pipeline -> subscribers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zmq
from peers import require_tool

from boldstream.pipeline.snapshot import request_snapshot
from boldstream.sinks import topics
from boldstream.stream.messages import Message
from boldstream.stream.pubsub import Subscriber

pytestmark = pytest.mark.timeout(180)


class _Serve:
    def __init__(self, spool: Path, *extra: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "boldstream",
            "serve",
            "--port",
            "0",
            "--spool",
            str(spool),
            "--set",
            "selector.exclude_image_types=[]",
            "--set",
            "pipeline.pub='tcp://127.0.0.1:*'",
            "--set",
            "pipeline.snapshot='tcp://127.0.0.1:*'",
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.logs: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("boldstream listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])
        # The log line is read on another thread: wait for it, bounded.
        deadline = time.monotonic() + 30
        while not (started := [e for e in self.logs if e.get("event") == "pipeline started"]):
            assert time.monotonic() < deadline, self.logs
            time.sleep(0.01)
        self.pub, self.snapshot = started[0]["pub"], started[0]["snapshot"]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.logs.append(json.loads(line))
            except json.JSONDecodeError:
                self.logs.append({"raw": line})

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._reader.join(5)
        return code


def _until_qc(sub: Subscriber, n: int, timeout_s: float = 90.0) -> list[Message]:
    """Everything ``sub`` receives until ``n`` qc results are in (bounded)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while sum(m.topic == topics.QC for m in got) < n:
        assert time.monotonic() < deadline, Counter(m.topic for m in got)
        if (m := sub.recv(timeout_ms=1000)) is not None:
            got.append(m)
    return got


def test_serve_publishes_motion_and_qc_of_volumes_sent_by_storescu(
    tmp_path: Path, heudiconv_data: Path, ctx: zmq.Context[Any]
) -> None:
    server = _Serve(tmp_path / "spool")
    try:
        sub = Subscriber(ctx, server.pub, topics=topics.DASHBOARD_TOPICS, rcvhwm=0)
        # The XPUB learns of subscriptions asynchronously; the snapshot says
        # how many it has (one per topic of this subscriber).
        deadline = time.monotonic() + 10
        while (reply := request_snapshot(server.snapshot, context=ctx))["subscriptions"] < len(
            topics.DASHBOARD_TOPICS
        ):
            assert time.monotonic() < deadline, reply
            time.sleep(0.02)
        assert reply["series"] == []
        files = sorted((heudiconv_data / "b0dwiForFmap").glob("*.dcm"))
        out = subprocess.run(
            [require_tool("storescu"), "-aet", "SCANNER", "-aec", "BOLDSTREAM",
             "127.0.0.1", str(server.port), *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        got = _until_qc(sub, 3)
        snapshot = request_snapshot(server.snapshot, context=ctx)
        sub.close()
    finally:
        code = server.stop()
    assert code == 0
    counts = Counter(m.topic for m in got)
    assert counts[topics.SERIES_START] == 1
    assert counts[topics.VOLUME_RECEIVED] == counts[topics.MOTION] == counts[topics.QC] == 3
    qc = [m.payload.values for m in got if m.topic == topics.QC]  # type: ignore[union-attr]
    motion = [m.payload.values for m in got if m.topic == topics.MOTION]  # type: ignore[union-attr]
    # No FD for the first volume, nor for one whose motion could not be estimated.
    flagged = [bool(m["flagged"]) for m in motion]
    assert [q["fd_mm"] is None for q in qc] == [True, *flagged[1:]]
    assert flagged[1] is False
    assert all(0 < q["latency_ms"] < 60_000 for q in qc)
    (series,) = snapshot["series"]
    assert series["counts"]["qc"] == 3
    events = Counter(e.get("event") for e in server.logs)
    assert events["volume published"] == 3
    assert events["pipeline stopped"] == 1
    assert not any(e.get("level") == "error" for e in server.logs), [
        e for e in server.logs if e.get("level") == "error"
    ]


def test_an_sbref_sent_before_the_run_is_its_motion_reference(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    """As a multiband sequence sends it: the SBRef series, then the BOLD run."""
    folder = tmp_path / "dicom"
    subprocess.run(
        [sys.executable, "-m", "boldstream", "simulate", "--volumes", "4", "--motion", "mild",
         "--sbref", "--write-dir", str(folder)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 5  # the SBRef mosaic first, then four volumes
    server = _Serve(tmp_path / "spool")
    try:
        sub = Subscriber(ctx, server.pub, topics=(topics.MOTION, topics.QC), rcvhwm=0)
        deadline = time.monotonic() + 10
        while request_snapshot(server.snapshot, context=ctx)["subscriptions"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        out = subprocess.run(
            [require_tool("storescu"), "-aec", "BOLDSTREAM", "127.0.0.1", str(server.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        got = _until_qc(sub, 4)
        sub.close()
    finally:
        assert server.stop() == 0
    assert {m.series.description for m in got if m.series is not None} == {"rsfMRI_sim"}
    (chosen,) = [e for e in server.logs if e.get("event") == "motion reference"]
    assert chosen["reference"] == "SBRef (series 6)"
    (kept,) = [e for e in server.logs if e.get("description") == "rsfMRI_sim_SBRef"]
    assert kept["event"] == "new series: a motion reference (SBRef), not analysed"


def test_a_refused_instance_is_told_to_subscribers_as_a_warning(
    tmp_path: Path, heudiconv_data: Path, ctx: zmq.Context[Any]
) -> None:
    """A spool below its free-space floor refuses (0xA700); the technician sees why."""
    server = _Serve(tmp_path / "spool", "--set", "receiver.min_free_mb=1e12")
    try:
        sub = Subscriber(ctx, server.pub, topics=[topics.WARNING], rcvhwm=0)
        deadline = time.monotonic() + 10
        while request_snapshot(server.snapshot, context=ctx)["subscriptions"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        file = sorted((heudiconv_data / "b0dwiForFmap").glob("*.dcm"))[0]
        out = subprocess.run(
            [require_tool("storescu"), "-v", "-aet", "SCANNER", "-aec", "BOLDSTREAM",
             "127.0.0.1", str(server.port), str(file)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "Refused: OutOfResources" in out.stdout + out.stderr, out.stderr
        warning = sub.recv(timeout_ms=20_000)
        sub.close()
    finally:
        code = server.stop()
    assert code == 0
    assert warning is not None and warning.topic == topics.WARNING
    values = warning.payload.values  # type: ignore[union-attr]
    assert values["code"] == "spool-refused"
    assert "below its free-space floor" in values["message"]
    assert not list((tmp_path / "spool").glob("*/*/*.dcm"))
    events = [e.get("event", "") for e in server.logs]
    assert any(e.startswith("spool below its free-space floor") for e in events), events
    assert "instance refused: spool full" in events
