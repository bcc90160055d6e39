"""No patient identifiers leave the service: result streams and dashboard.

The simulator's DICOM carries PatientName ``SIM^PHANTOM``, PatientID
``SIM-0001`` and PatientBirthDate ``19700101``. A mosaic and a per-slice run
go through a live receiver + pipeline (loopback, ephemeral ports); a raw SUB
socket subscribed to every topic keeps every frame (topic, JSON header and
array buffers), and a dashboard on the same publisher serves /api/snapshot,
/events and /metrics. None of them may contain any of those values; the
dashboard's pages must not contain the StudyInstanceUID either. (The stream
headers still carry ``series.study_uid``, which consumers such as the PACS
export use to file derived series in the same study.)
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from pipeline_support import pipeline_settings, wait_for

from boldstream.pipeline.service import Pipeline
from boldstream.receiver.service import Receiver
from boldstream.simulator import SendOptions, SeriesSpec, make_phantom_run, send_run
from boldstream.sinks.dashboard import Dashboard
from boldstream.stream.codec import decode

pytestmark = pytest.mark.timeout(180)

N = 5
TR = 2.0


def _http(dashboard: Dashboard, path: str, *, stream: bool = False) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", dashboard.port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200, path
        if not stream:
            return resp.read()
        # The first event (the snapshot) and what follows until a blank line.
        lines = []
        while True:
            line = resp.fp.readline()
            lines.append(line)
            if line.startswith(b"data: "):
                return b"".join(lines)
    finally:
        conn.close()


def test_streams_and_dashboard_carry_no_patient_identifiers(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    settings = pipeline_settings(tmp_path, "receiver.port=0")
    specs = [SeriesSpec(tr_s=TR, n_volumes=N, series_number=n) for n in (3, 4)]
    patient = [b"SIM^PHANTOM", b"PHANTOM", b"SIM-0001", b"19700101", b"PatientName"]
    patient += [b"PatientID", b"BirthDate"]
    studies = [s.study_uid.encode() for s in specs]
    run = make_phantom_run(n_volumes=N, shape=(40, 40, 24), voxel_mm=4.5, tr_s=TR)
    frames: list[bytes] = []
    qc: dict[str, int] = {}
    with Pipeline(settings, mode="thread", context=ctx) as pipeline:
        raw = ctx.socket(zmq.SUB)
        raw.linger = 0
        raw.rcvhwm = 0
        raw.subscribe(b"")
        raw.connect(pipeline.pub_endpoint)
        dashboard = Dashboard(pipeline.pub_endpoint, heartbeat_s=0.5, context=ctx)
        dashboard.start()
        try:
            assert wait_for(lambda: pipeline.health()["hub"]["subscriptions"] >= 2, timeout=30)
            with Receiver(settings, pipeline.submit) as receiver:
                for spec, encoding in zip(specs, ("mosaic", "slice"), strict=True):
                    report = send_run(
                        run,
                        "127.0.0.1",
                        receiver.port,
                        SendOptions(encoding=encoding, spec=spec),
                    )
                    assert report.failed == 0
                deadline = time.monotonic() + 60
                while sum(qc.values()) < 2 * N:
                    remaining = deadline - time.monotonic()
                    assert remaining > 0, qc
                    if not raw.poll(int(remaining * 1000)):
                        continue
                    parts = raw.recv_multipart()
                    frames.extend(parts)
                    message = decode(parts)
                    if message.topic == "qc" and message.series is not None:
                        uid = message.series.series_uid
                        qc[uid] = qc.get(uid, 0) + 1

            def shown() -> bool:
                body = json.loads(_http(dashboard, "/api/snapshot"))
                return len(body["series"]) == 2

            assert wait_for(shown, timeout=30)
            pages = [
                _http(dashboard, "/api/snapshot"),
                _http(dashboard, "/events", stream=True),
                _http(dashboard, "/metrics"),
            ]
        finally:
            dashboard.stop()
            raw.close(linger=0)
    assert sorted(qc) == sorted(s.series_uid for s in specs)
    assert len(frames) > 4 * N
    for blob in [*frames, *pages]:
        for value in patient:
            assert value not in blob, (value, blob[:300])
    # The dashboard shows series by their pseudonymous key: no study UID either.
    for blob in pages:
        for value in studies:
            assert value not in blob, (value, blob[:300])
