"""Stage processes over ipc://, supervised: a SIGKILLed stage is restarted and
every volume still appears exactly once in the published results; a restarted
connectivity stage resumes from its checkpoint."""

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
from pipeline_support import (
    assert_same_target,
    chain,
    make_series,
    pipeline_settings,
    restamp,
    subscribe,
    volumes,
)

from boldstream.config import Settings
from boldstream.pipeline.connectivity_stage import ConnectivityStage, connectivity_options
from boldstream.pipeline.service import Pipeline
from boldstream.pipeline.stages import MotionStage, QCStage, stage_options
from boldstream.receiver.volume import Volume
from boldstream.sinks import topics
from boldstream.stream.messages import Message, SeriesEnd

pytestmark = pytest.mark.timeout(240)

N = 60


def run_with_kills(
    settings: Settings,
    ctx: zmq.Context[Any],
    vols: list[Volume],
    kills: dict[int, str],
    *,
    kill_on: str = topics.QC,
) -> tuple[list[Message], dict[str, Any], dict[str, int]]:
    """Feed ``vols`` to a process-mode pipeline, SIGKILL stage ``kills[i]`` once
    the ``kill_on`` result of volume ``i`` is out; every message, health, first pids."""
    series = vols[0].series
    got: list[Message] = []
    kills = dict(kills)
    with Pipeline(settings, mode="process") as pipeline:
        sub = subscribe(ctx, pipeline)
        pids = {name: pipeline.stage_pid(name) for name in set(kills.values())}
        assert all(pids.values())

        def feed() -> None:
            for v in vols:
                pipeline.submit(restamp(v))
                time.sleep(0.02)  # paced like a (fast) scanner, so kills land mid-series

        feeder = threading.Thread(target=feed)
        feeder.start()
        deadline = time.monotonic() + 180
        while sum(m.topic == topics.QC for m in got) < len(vols):
            assert time.monotonic() < deadline, Counter(m.topic for m in got)
            m = sub.recv(timeout_ms=1000)
            if m is None:
                continue
            got.append(m)
            if m.topic == kill_on and m.index in kills:
                pid = pids[kills.pop(m.index)]
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
        feeder.join()
        pipeline.end_series(series, n_volumes=len(vols))
        assert pipeline.drain(60)
        while (m := sub.recv(timeout_ms=2000)) is not None:
            got.append(m)
            if m.kind == "series-end":
                break
        health = pipeline.health()
        # A finished series leaves no checkpoint behind (the run folder stays
        # until the pipeline stops).
        root = settings.receiver.spool_dir / "pipeline-state"
        assert [p.name for p in root.glob("run-*")] != []
        assert [p for p in root.glob("run-*/*")] == []
        sub.close()
    return got, health, {k: v for k, v in pids.items() if v is not None}


def test_killed_stage_processes_are_restarted_and_nothing_is_lost_or_doubled(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    vols = volumes(N, make_series())
    settings = pipeline_settings(tmp_path, "pipeline.checkpoint_every=5")
    got, health, pids = run_with_kills(settings, ctx, vols, {15: "motion", 35: "qc"})

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


def test_a_killed_connectivity_stage_resumes_and_its_targets_are_those_of_an_unbroken_run(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    series = make_series("3.3.3")
    vols = volumes(N, series)
    settings = pipeline_settings(tmp_path, "target.every_s=20", "pipeline.checkpoint_every=5")
    options = stage_options(settings, checkpoint_dir=None)
    unbroken = [
        m
        for m in chain(
            [
                MotionStage(**options["motion"]),
                QCStage(**options["qc"], forward_corrected=True),
                ConnectivityStage(**connectivity_options(settings, checkpoint_dir=None)),
            ],
            [Message(v) for v in vols] + [Message(SeriesEnd(series, ended=0.0))],
        )
        if m.topic == topics.TARGET
    ]
    assert [m.index for m in unbroken] == [19, 29, 39, 49, 59]

    # Killed once its target at 29 is out (so it has checkpointed), before 39.
    # Not on a qc result: qc goes straight to the hub and can be volumes ahead
    # of this stage, which may still be registering (no checkpoint yet).
    got, health, _ = run_with_kills(
        settings, ctx, vols, {29: "connectivity"}, kill_on=topics.TARGET
    )

    assert health["hub"]["journal"] == 0  # nothing of the ended series is kept
    stages = {s["name"]: s for s in health["stages"]}
    assert stages["connectivity"]["restarts"] == 1
    # Resumed from its checkpoint (and, when the journal's copies of volumes
    # it has already ended with come late, restored once more to repeat them).
    assert stages["connectivity"]["stage"]["restored"] >= 1
    targets = [m for m in got if m.topic == topics.TARGET]
    assert [m.index for m in targets] == [19, 29, 39, 49, 59]
    for received, want in zip(targets, unbroken, strict=True):
        assert_same_target(received, want)
    for topic in (topics.MOTION, topics.QC):
        assert Counter(m.index for m in got if m.topic == topic) == Counter(range(N))
