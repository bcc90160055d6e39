"""The Pipeline service over real sockets: threads over inproc, results on loopback XPUB."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zmq
from pipeline_support import collect, make_series, pipeline_settings, subscribe, volumes

from boldstream.pipeline.service import Pipeline
from boldstream.pipeline.snapshot import request_snapshot
from boldstream.receiver.volume import Volume, VolumeIncomplete
from boldstream.sinks import topics

pytestmark = pytest.mark.timeout(120)


def _keyed(messages: list[Any], uid: str, topic: str) -> list[int]:
    return [m.index for m in messages if m.topic == topic and m.series.series_uid == uid]


def gave_up(volume: Volume) -> VolumeIncomplete:
    """What the receiver sends instead of ``volume`` when its slices never all come."""
    return VolumeIncomplete(
        series=volume.series,
        index=volume.index,
        slices_received=10,
        slices_expected=24,
        first_received=volume.first_received,
        reported=volume.assembled,
    )


def test_two_series_publish_the_contract_once_each(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    a, b = make_series("1.2.3.10"), make_series("1.2.3.20", session_key="sess-b")
    va, vb = volumes(12, a), volumes(12, b, seed=1)
    incomplete = gave_up(va[5])
    # A: volume 5 never completes, 7 arrives before 6, 2 arrives twice.
    order_a = [*va[:5], incomplete, va[7], va[6], va[2], *va[8:]]
    with Pipeline(pipeline_settings(tmp_path), mode="thread") as pipeline:
        sub = subscribe(ctx, pipeline)
        for ea, eb in zip(order_a, vb, strict=False):
            pipeline.submit(ea)
            pipeline.submit(eb)
        for extra in order_a[len(vb) :]:
            pipeline.submit(extra)
        pipeline.end_series(a, n_volumes=12)
        pipeline.end_series(b, n_volumes=12)
        got = collect(sub, ends=2)
        snapshot = request_snapshot(pipeline.snapshot_endpoint, context=ctx)
        health = pipeline.health()
        sub.close()

    done_a = [i for i in range(12) if i != 5]
    assert Counter(_keyed(got, a.series_uid, topics.VOLUME_RECEIVED)) == Counter(done_a)
    assert _keyed(got, a.series_uid, topics.MOTION) == done_a
    assert _keyed(got, a.series_uid, topics.QC) == done_a
    assert _keyed(got, a.series_uid, topics.VOLUME_MISSING) == [5]
    assert _keyed(got, a.series_uid, topics.GAP) == [5]
    assert _keyed(got, b.series_uid, topics.QC) == list(range(12))
    for uid in (a.series_uid, b.series_uid):
        mine = [m for m in got if m.series is not None and m.series.series_uid == uid]
        assert mine[0].topic == topics.SERIES_START
        assert mine[-1].topic == topics.SERIES_END
    assert not any(m.topic.startswith("pipeline.") or m.topic == "volume" for m in got)

    first = next(m for m in got if m.topic == topics.VOLUME_RECEIVED)
    assert first.payload.values["shape"] == [40, 40, 24]
    assert first.payload.values["voxel_mm"] == pytest.approx([4.5, 4.5, 4.5])
    assert first.payload.values["instances"] == 1
    for m in got:
        if m.topic == topics.MOTION:
            assert set(m.payload.values) == set(topics.MOTION_FIELDS)
        elif m.topic == topics.QC:
            assert set(m.payload.values) == set(topics.QC_FIELDS)
            latency = m.payload.values["latency_ms"]
            assert 0 < latency < 60_000
            # Published after the stages stamped it: end-to-end covers the chain.
            assert latency / 1000 >= m.timestamps["qc.out"] - m.timestamps["received"]

    series_a = next(s for s in snapshot["series"] if s["series_uid"] == a.series_uid)
    assert series_a["counts"]["qc"] == 11
    assert series_a["counts"]["missing"] == 1
    assert series_a["counts"]["gaps"] == 1
    assert series_a["counts"]["duplicates"] == 1
    assert series_a["latest_qc"]["volume"] == 11
    # 11 volumes measured and the lost one: 12 TRs of scan time.
    assert series_a["usable"]["frames_total"] == 12
    assert series_a["usable"]["thresholds"][-1]["frames"] <= 11
    assert series_a["ended"] is not None

    stages = {s["name"]: s for s in health["stages"]}
    assert set(stages) == {"motion", "qc", "connectivity"}
    for s in stages.values():
        assert s["alive"] and s["heartbeat"] is not None
        assert s["state"] == "running"
        assert s["lag_s"] is not None and s["last_series"] is not None
    assert health["hub"]["duplicates_dropped"] == 0


def test_a_series_that_states_its_length_ends_when_all_are_in(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    series = replace(make_series("1.2.3.30"), n_volumes=6)
    vols = volumes(7, series)
    incomplete = gave_up(vols[4])
    # No end_series() and an idle time far beyond the test: the count ends it.
    settings = pipeline_settings(tmp_path, "pipeline.series_idle_s=3600")
    with Pipeline(settings, mode="thread") as pipeline:
        sub = subscribe(ctx, pipeline)
        for event in [*vols[:4], vols[5], incomplete]:
            pipeline.submit(event)
        got = collect(sub, ends=1)
        pipeline.submit(vols[6])  # more than the header said
        assert pipeline.drain(10)
        while (m := sub.recv(timeout_ms=1000)) is not None:
            got.append(m)
        sub.close()
    end = next(m for m in got if m.kind == "series-end")
    assert end.payload.n_volumes == 6 and end.payload.reason == "complete"  # type: ignore[union-attr]
    assert _keyed(got, series.series_uid, topics.QC) == [0, 1, 2, 3, 5]
    assert _keyed(got, series.series_uid, topics.GAP) == [4]
    late = [m for m in got if m.topic == topics.WARNING]
    assert [(m.index, m.payload.values["code"]) for m in late] == [(6, "after-series-end")]  # type: ignore[union-attr]
    assert 6 not in _keyed(got, series.series_uid, topics.QC)


def test_drain_reads_no_state_of_the_hub_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal and the orderer are the hub thread's: another thread that
    walked them while the hub changed them could fail ("dictionary changed
    size during iteration") and take Pipeline.stop() down with it."""
    from boldstream.pipeline.journal import Journal
    from boldstream.stream.ordering import Orderer

    callers: set[str] = set()
    unfinished, stats = Journal.unfinished, Orderer.stats

    def spy_unfinished(self: Journal) -> int:
        callers.add(threading.current_thread().name)
        return unfinished(self)

    def spy_stats(self: Orderer) -> dict[str, Any]:
        callers.add(threading.current_thread().name)
        return stats(self)

    monkeypatch.setattr(Journal, "unfinished", spy_unfinished)
    monkeypatch.setattr(Orderer, "stats", spy_stats)
    vols = volumes(6, make_series("1.2.3.40"))
    with Pipeline(pipeline_settings(tmp_path), mode="thread") as pipeline:
        for v in vols:
            pipeline.submit(v)
            pipeline.drain(0.0)  # while the hub works on it
        assert pipeline.drain(30)
        assert pipeline.health()["hub"]["published"] > 0
    assert callers and threading.current_thread().name not in callers


def test_snapshot_answers_late_joiners_over_req_and_dealer(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    series = make_series()
    with Pipeline(pipeline_settings(tmp_path), mode="thread") as pipeline:
        empty = request_snapshot(pipeline.snapshot_endpoint, context=ctx)
        assert empty["series"] == []
        for v in volumes(6, series):
            pipeline.submit(v)
        assert pipeline.drain(30)
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(pipeline.snapshot_endpoint)
        dealer.send_multipart([b"", b"snapshot"])
        assert dealer.poll(5000)
        reply = json.loads(dealer.recv_multipart()[-1])
        dealer.close()
    (only,) = reply["series"]
    assert only["series_uid"] == series.series_uid
    assert only["session_key"] == "sess-a"
    assert only["counts"]["received"] == 6
    assert only["counts"]["motion"] == only["counts"]["qc"] == 6
    assert only["latest_qc"]["volume"] == 5
    assert set(topics.QC_FIELDS) <= set(only["latest_qc"])
    assert only["latest_motion"]["volume"] == 5
    assert only["ended"] is None
    assert only["latency_ms"]["max"] >= only["latency_ms"]["last"] > 0


def test_an_unknown_setting_names_the_key(tmp_path: Path) -> None:
    from boldstream.errors import ConfigError

    with pytest.raises(ConfigError, match=r"pipeline\.pub"):
        pipeline_settings(tmp_path, "pipeline.pub='localhost:80'")


def test_an_ended_series_keeps_only_which_volumes_came(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    """After its end the hub forgets a series' per-volume results (a service runs for
    months) but still tells a re-sent volume (a duplicate) from a late new one."""
    series = replace(make_series("1.2.3.40"), n_volumes=6)
    vols = volumes(8, series)
    with Pipeline(pipeline_settings(tmp_path), mode="thread") as pipeline:
        sub = subscribe(ctx, pipeline)
        for event in vols[:6]:
            pipeline.submit(event)
        got = collect(sub, ends=1)
        assert pipeline.drain(10)
        hub = pipeline._hub
        assert hub is not None
        (state,) = [s for s in hub.series.values() if s.info.series_uid == series.series_uid]
        assert state.ended
        assert (state.done, state.gaps, state.passed, state.published, state.warned) == (
            set(),
            set(),
            set(),
            {},
            set(),
        )
        assert len(state.received) == 6
        pipeline.submit(vols[2])  # re-sent: a duplicate, silently
        pipeline.submit(vols[7])  # new and late: warned
        assert pipeline.drain(10)
        while (m := sub.recv(timeout_ms=1000)) is not None:
            got.append(m)
        snapshot = request_snapshot(pipeline.snapshot_endpoint, context=ctx)
        sub.close()
    assert _keyed(got, series.series_uid, topics.QC) == list(range(6))
    late = [m for m in got if m.topic == topics.WARNING]
    assert [(m.index, m.payload.values["code"]) for m in late] == [(7, "after-series-end")]  # type: ignore[union-attr]
    (view,) = [s for s in snapshot["series"] if s["series_uid"] == series.series_uid]
    assert view["counts"]["duplicates"] == 1
