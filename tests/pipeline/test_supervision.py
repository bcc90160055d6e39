"""Stage processes over ipc://, supervised: a SIGKILLed stage is restarted and
every volume still appears exactly once in the published results."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zmq
from pipeline_support import make_series, pipeline_settings, restamp, subscribe, volumes

from boldstream.pipeline.service import Pipeline
from boldstream.sinks import topics
from boldstream.stream.messages import Message

pytestmark = pytest.mark.timeout(240)

N = 60


def test_killed_stage_processes_are_restarted_and_nothing_is_lost_or_doubled(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    series = make_series()
    vols = volumes(N, series)
    settings = pipeline_settings(tmp_path, "pipeline.checkpoint_every=5")
    got: list[Message] = []
    with Pipeline(settings, mode="process") as pipeline:
        sub = subscribe(ctx, pipeline)
        pids = {name: pipeline.stage_pid(name) for name in ("motion", "qc")}
        assert all(pids.values())

        def feed() -> None:
            for v in vols:
                pipeline.submit(restamp(v))
                time.sleep(0.02)  # paced like a (fast) scanner, so kills land mid-series

        feeder = threading.Thread(target=feed)
        feeder.start()
        kills = {15: "motion", 35: "qc"}
        deadline = time.monotonic() + 180
        while sum(m.topic == topics.QC for m in got) < N:
            assert time.monotonic() < deadline, Counter(m.topic for m in got)
            m = sub.recv(timeout_ms=1000)
            if m is None:
                continue
            got.append(m)
            if m.topic == topics.QC and m.index in kills:
                name = kills.pop(m.index)
                os.kill(pids[name], signal.SIGKILL)
        feeder.join()
        pipeline.end_series(series, n_volumes=N)
        assert pipeline.drain(60)
        while (m := sub.recv(timeout_ms=2000)) is not None:
            got.append(m)
            if m.kind == "series-end":
                break
        health = pipeline.health()
        sub.close()

    for topic in (topics.MOTION, topics.QC, topics.VOLUME_RECEIVED):
        counts = Counter(m.index for m in got if m.topic == topic)
        assert counts == Counter(range(N)), (topic, counts - Counter(range(N)))
    assert not any(m.kind == "gap" for m in got)
    restarted = [m for m in got if m.topic == topics.WARNING]
    assert [m.payload.values["code"] for m in restarted] == ["stage-restarted"] * 2  # type: ignore[union-attr]
    stages = {s["name"]: s for s in health["stages"]}
    assert stages["motion"]["restarts"] == stages["qc"]["restarts"] == 1
    assert stages["motion"]["pid"] != pids["motion"] and stages["qc"]["pid"] != pids["qc"]
    assert all(s["alive"] for s in stages.values())
    assert health["hub"]["resent"] > 0
    # The restarted stages resumed from checkpoints rather than from scratch.
    assert stages["motion"]["stage"]["restored"] == 1
    assert stages["qc"]["stage"]["restored"] == 1
    # FD continues across the restarts (no second "first frame" with FD n/a).
    fd = {m.index: m.payload.values["fd_mm"] for m in got if m.topic == topics.QC}  # type: ignore[union-attr]
    assert [i for i, v in fd.items() if v is None] == [0]
