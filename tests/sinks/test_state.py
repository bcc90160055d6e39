"""DashboardState: what a page gets from the result streams, without sockets."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import boldstream_tests_fake_publisher as fake
import numpy as np
import pytest

from boldstream.analysis.qc import QCFrame
from boldstream.analysis.usable import UsableData
from boldstream.receiver.volume import VolumeIncomplete
from boldstream.sinks import topics
from boldstream.sinks.dashboard.metrics import exposition
from boldstream.sinks.dashboard.state import (
    DashboardState,
    Trace,
    series_id,
    target_view,
)
from boldstream.stream.codec import decode, encode
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart

SERIES = fake.fake_series()


def wire(payload: Any, **ts: float) -> Message:
    """Through the real codec, as the SUB thread sees it."""
    return decode(encode(Message(payload, dict(ts))))


def qc_message(
    index: int, fd: float | None, usable: UsableData, *, latency_ms: float = 150.0
) -> Message:
    frame = QCFrame(
        index=index,
        fd_mm=fd,
        dvars=20.0,
        std_dvars=1.1,
        global_signal=800.0,
        tsnr_median=55.0,
        outlier=fd is not None and fd > 0.5,
        outlier_reasons=("fd",) if fd is not None and fd > 0.5 else (),
        usable=usable.add(fd),
    )
    return wire(topics.qc_result(SERIES, index, frame, latency_ms=latency_ms))


# --------------------------------------------------------------------------- Trace


def test_trace_keeps_index_order_replaces_repeats_and_caps() -> None:
    t = Trace(("index", "v"), cap=4)
    for i in (0, 1, 3):
        t.add({"index": i, "v": float(i)})
    t.add({"index": 2, "v": 2.0})  # late arrival goes to its place
    t.add({"index": 3, "v": 30.0})  # a repeat replaces
    assert t.column("index") == [0, 1, 2, 3]
    assert t.column("v") == [0.0, 1.0, 2.0, 30.0]
    t.add({"index": 4, "v": 4.0})
    t.add({"index": 5})  # missing column -> None
    assert t.column("index") == [2, 3, 4, 5]
    assert t.column("v") == [2.0, 30.0, 4.0, None]
    with pytest.raises(ValueError):
        Trace(("v", "index"), cap=3)


# --------------------------------------------------------------------------- a scan


def test_scan_fills_traces_usable_receiver_and_latency() -> None:
    state = DashboardState()
    usable = UsableData(tr_s=0.72, goal_minutes=1.0)
    state.apply(wire(SeriesStart(SERIES, 1000.0)))
    fds = [None, 0.1, 0.25, 0.4, 0.7, 0.1]
    for i, fd in enumerate(fds):
        state.apply(
            wire(
                topics.volume_received_result(
                    SERIES, i, shape=(4, 5, 6), voxel_mm=(3, 3, 3), assembly_ms=2.0, instances=1
                )
            )
        )
        state.apply(
            wire(
                topics.motion_result(
                    SERIES,
                    i,
                    [0.1 * i, 0, 0, 0.001 * i, 0, 0],
                    flagged=False,
                    reason=None,
                    iterations=3,
                    correlation=0.99,
                )
            )
        )
        state.apply(qc_message(i, fd, usable, latency_ms=900.0 if i == 3 else 150.0))
    snap = state.snapshot()
    json.dumps(snap, allow_nan=False)  # JSON-able, no NaN
    (s,) = snap["series"]
    assert s["id"] == series_id(SERIES)
    assert s["session_key"] == SERIES.session_key and s["tr_s"] == 0.72
    assert s["started"] == 1000.0
    assert s["qc"]["index"] == list(range(6))
    assert s["qc"]["fd_mm"] == fds
    assert s["qc"]["outlier"] == [False, False, False, False, True, False]
    assert s["motion"]["trans_x"] == pytest.approx([0.1 * i for i in range(6)])
    assert s["motion"]["flagged"] == [False] * 6
    rows = {r["fd_threshold_mm"]: r for r in s["usable"]["thresholds"]}
    # first frame counts as good; FD strictly below the threshold
    assert rows[0.2]["frames"] == 3 and rows[0.3]["frames"] == 4 and rows[0.5]["frames"] == 5
    assert rows[0.2]["minutes_to_goal"] == pytest.approx((1.0 - 3 * 0.012) / 0.5)
    r = s["receiver"]
    assert r["received"] == 6 and r["last_index"] == 5
    assert r["shape"] == [4, 5, 6] and r["voxel_mm"] == [3, 3, 3]
    assert r["n_slow"] == 1  # 900 ms > TR 720 ms
    m = state.metrics()
    assert m["volumes_received"] == 6 and m["latency_count"] == 6
    assert m["bucket_counts"][state.buckets.index(1.0)] == 1  # the 0.9 s volume


def test_missing_volume_counted_once_and_late_from_timeouts() -> None:
    state = DashboardState()
    # Not through the codec: it does not carry VolumeIncomplete.reason (yet).
    state.apply(Message(VolumeIncomplete(SERIES, 7, 10, 36, 1.0, 2.0, "timeout: slices missing")))
    assert state.apply(wire(Gap(SERIES, 7, "incomplete"))) == []  # same hole, no new delta
    state.apply(wire(Gap(SERIES, 9, "timeout")))
    state.apply(wire(Gap(SERIES, 9, "timeout")))
    r = state.snapshot()["series"][0]["receiver"]
    assert r["n_missing"] == 2 and r["n_late"] == 1
    assert r["missing"] == [
        {"index": 7, "reason": "timeout: slices missing"},
        {"index": 9, "reason": "timeout"},
    ]
    m = state.metrics()
    assert m["volumes_missing"] == 2 and m["volumes_late"] == 1


def test_first_message_of_a_series_announces_it_and_eviction_drops_the_oldest() -> None:
    state = DashboardState(max_series=2)
    series = [fake.fake_series(series_number=n) for n in (1, 2, 3)]
    first = state.apply(wire(topics.warning_result(series[0], 0, "hello", code="test")))
    assert [d["type"] for d in first] == ["series", "warning"]
    state.apply(wire(SeriesStart(series[1], 1.0)))
    third = state.apply(wire(SeriesEnd(series[2], 2.0, n_volumes=10, reason="complete")))
    assert [d["type"] for d in third] == ["drop", "series", "series"]
    assert third[0]["id"] == series_id(series[0])
    ids = [s["id"] for s in state.snapshot()["series"]]
    assert ids == [series_id(series[1]), series_id(series[2])]
    assert state.snapshot()["series"][1]["ended"] == {
        "time": 2.0,
        "n_volumes": 10,
        "reason": "complete",
    }


def test_traces_are_bounded() -> None:
    state = DashboardState(max_points=50)
    usable = UsableData(tr_s=0.72)
    for i in range(120):
        state.apply(qc_message(i, 0.1 if i else None, usable))
    qc = state.snapshot()["series"][0]["qc"]
    assert qc["index"] == list(range(70, 120))
    assert all(len(v) == 50 for v in qc.values())


def test_listener_gets_snapshot_then_every_delta_in_order() -> None:
    state = DashboardState()
    usable = UsableData(tr_s=0.72)
    state.apply(qc_message(0, None, usable))
    snapshot, listener = state.listen()
    assert snapshot["series"][0]["qc"]["index"] == [0]
    for i in (1, 2, 3):
        state.apply(qc_message(i, 0.1, usable))
    got = [json.loads(listener.events.get_nowait()) for _ in range(3)]
    assert [d["row"]["index"] for d in got] == [1, 2, 3]
    assert listener.events.empty()
    state.unlisten(listener)
    state.apply(qc_message(4, 0.1, usable))
    assert listener.events.empty()


def test_a_listener_that_falls_behind_is_told_to_close() -> None:
    state = DashboardState(queue_size=5)
    usable = UsableData(tr_s=0.72)
    _, listener = state.listen()
    for i in range(10):
        state.apply(qc_message(i, 0.1, usable))
    assert state.listeners == 0
    assert listener.events.get_nowait() is None  # the close marker, nothing stale before it


def test_non_finite_and_malformed_values_become_none() -> None:
    state = DashboardState()
    # A publisher other than ours might send NaN (JSON allows it on read).
    bad = Message(
        Result(
            topics.QC,
            SERIES,
            0,
            values={"fd_mm": math.nan, "dvars": "x", "std_dvars": math.inf, "usable": 3},
        )
    )
    state.apply(bad)
    state.apply(
        Message(
            Result(topics.VOLUME_RECEIVED, SERIES, 0, values={"shape": [1, 2], "instances": "?"})
        )
    )
    snap = state.snapshot()
    json.dumps(snap, allow_nan=False)
    qc = snap["series"][0]["qc"]
    assert qc["fd_mm"] == [None] and qc["dvars"] == [None] and qc["std_dvars"] == [None]
    assert snap["series"][0]["receiver"]["shape"] is None


def test_latency_falls_back_to_the_message_timestamps() -> None:
    state = DashboardState()
    usable = UsableData(tr_s=0.72)
    frame = QCFrame(0, None, None, None, None, None, False, (), usable.add(None))
    result = topics.qc_result(SERIES, 0, frame, latency_ms=None)
    (delta,) = state.apply(Message(result, {"received": 10.0, "published": 10.25}))[-1:]
    assert delta["row"]["latency_ms"] == pytest.approx(250.0)


def test_warnings_without_a_series_are_global() -> None:
    state = DashboardState()
    (delta,) = state.apply(wire(topics.warning_result(None, None, "disk 95% full", code="disk")))
    assert delta["id"] is None
    assert state.snapshot()["warnings"][0]["code"] == "disk"
    assert state.snapshot()["series"] == []


def test_no_uid_reaches_a_page() -> None:
    state = DashboardState()
    pub_usable = UsableData(tr_s=0.72)
    deltas = state.apply(wire(SeriesStart(SERIES, 1.0)))
    deltas += state.apply(qc_message(0, None, pub_usable))
    text = json.dumps(state.snapshot()) + json.dumps(deltas)
    assert SERIES.series_uid not in text and SERIES.study_uid not in text
    assert SERIES.session_key in text


def test_unrelated_topics_and_results_without_series_are_ignored() -> None:
    state = DashboardState()
    assert state.apply(Message(Result("connectivity", SERIES, 0, values={"r": 0.1}))) == []
    assert state.apply(Message(Result(topics.QC, None, 0, values={}))) == []
    assert state.apply(Message(Result(topics.QC, SERIES, None, values={}))) == []
    assert state.snapshot()["series"] == []


# --------------------------------------------------------------------------- target


def test_target_view_slices_cross_the_target_in_neurological_orientation() -> None:
    ras = (-36.0, 30.0, 28.0)
    cmap = fake.target_map(ras)
    affine = fake.vox2ras()
    view = target_view(
        topics.target_result(
            SERIES,
            100,
            {"status": "settling", "ras_mm": list(ras), "mni_mm": [1, 2, 3], "good_minutes": 6.0},
            correlation_map=cmap,
            vox2ras=affine,
        )
    )
    assert view["status"] == "settling" and view["ras_mm"] == list(ras)
    assert view["split_half_mm"] is None and view["good_minutes"] == 6.0
    ijk = np.rint(np.linalg.solve(affine, [*ras, 1.0])[:3]).astype(int)
    planes = {s["plane"]: s for s in view["slices"]}
    assert set(planes) == {"axial", "coronal", "sagittal"}
    for plane in planes.values():
        col, row = plane["cross"]
        value = plane["values"][row * plane["width"] + col]
        assert value == pytest.approx(float(cmap[tuple(ijk)]), abs=1e-3)
        assert len(plane["values"]) == plane["width"] * plane["height"]
    ax = planes["axial"]
    assert (ax["width"], ax["height"]) == (cmap.shape[0], cmap.shape[1])
    assert ax["labels"] == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    # Patient left (negative x) is on the screen's left, anterior (positive y) up.
    assert ax["cross"][0] < ax["width"] / 2 and ax["cross"][1] < ax["height"] / 2
    # Most negative values sit around the target, and NaN outside the head is None.
    assert value < -0.2
    assert None in ax["values"]
    json.dumps(view, allow_nan=False)


def test_target_view_handles_flipped_axes() -> None:
    # An LPS-like voxel order: i runs to the patient's left, j posterior.
    cmap = np.zeros((10, 12, 8), dtype=np.float32)
    cmap[2, 3, 4] = -1.0
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    ras = affine @ np.array([2, 3, 4, 1.0])
    view = target_view(
        Result(
            topics.TARGET,
            SERIES,
            0,
            values={"status": "provisional", "ras_mm": ras[:3].tolist()},
            arrays={"map": cmap},
            affines={"vox2ras": affine},
        )
    )
    for plane in view["slices"]:
        col, row = plane["cross"]
        assert plane["values"][row * plane["width"] + col] == -1.0
    ax = next(p for p in view["slices"] if p["plane"] == "axial")
    # voxel i=2 is at x=-4 mm (patient right of centre? no: x<0 is patient right in RAS)
    assert ax["cross"][0] == 9 - 2  # i flipped so that +x (patient right) is on the right


def test_target_without_a_map_still_shows_its_numbers() -> None:
    view = target_view(
        Result(topics.TARGET, SERIES, 3, values={"status": "stable", "ras_mm": [1, 2, 3]})
    )
    assert view["slices"] == [] and view["status"] == "stable"
    assert view["p_value"] is None and view["held_s"] is None and view["reasons"] == []


def test_target_view_carries_the_test_against_chance_and_the_reasons() -> None:
    values = {
        "status": "settling",
        "p_value": 0.02,
        "held_s": float("nan"),
        "reasons": ["no anticorrelation beyond chance yet: p = 0.020", 7, *["more"] * 10],
    }
    view = target_view(Result(topics.TARGET, SERIES, 3, values=values))
    assert view["p_value"] == 0.02 and view["held_s"] is None
    assert view["reasons"][0].startswith("no anticorrelation beyond chance")
    assert len(view["reasons"]) == 8 and 7 not in view["reasons"]


# --------------------------------------------------------------------------- metrics


_SAMPLE = re.compile(r'^[a-z_]+(\{le="[^"]+"\})? [0-9.e+-]+|^[a-z_]+\{le="\+Inf"\} [0-9]+$')


def test_metrics_exposition_is_valid_prometheus_text() -> None:
    state = DashboardState(latency_buckets_s=(0.1, 0.5))
    usable = UsableData(tr_s=0.72)
    for i, ms in enumerate((50.0, 200.0, 700.0)):
        state.apply(qc_message(i, 0.1 if i else None, usable, latency_ms=ms))
    text = exposition(state.metrics())
    assert text.endswith("\n")
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or _SAMPLE.match(line), line
    assert 'boldstream_dashboard_latency_seconds_bucket{le="0.1"} 1\n' in text
    assert 'boldstream_dashboard_latency_seconds_bucket{le="0.5"} 2\n' in text
    assert 'boldstream_dashboard_latency_seconds_bucket{le="+Inf"} 3\n' in text
    assert "boldstream_dashboard_latency_seconds_count 3\n" in text
    assert "boldstream_dashboard_latency_seconds_sum 0.95\n" in text


# --------------------------------------------------------------------------- guidance


def test_latest_guidance_is_kept_per_series_and_sent_as_a_delta() -> None:
    state = DashboardState()
    values = {
        "state": "keep-scanning",
        "message": "keep scanning: about 6 more minutes for a settled target (4-9 min)",
        "minutes_more": 6.2,
        "minutes_more_range": [4.1, 9.3],
        "reason": "split-half 11.0 mm at 5.0 good minutes",
        "good_minutes": 5.1,
        "fd_threshold_mm": 0.5,
        "split_half_mm": 11.0,
        "drift_mm": float("nan"),
    }
    deltas = state.apply(Message(topics.guidance_result(SERIES, 140, values)))
    delta = next(d for d in deltas if d["type"] == "guidance")
    assert delta["guidance"]["message"].startswith("keep scanning: about 6")
    assert delta["guidance"]["minutes_more_range"] == [4.1, 9.3]
    assert delta["guidance"]["drift_mm"] is None
    json.loads(json.dumps(delta, allow_nan=False))
    (series,) = state.snapshot()["series"]
    assert series["guidance"]["state"] == "keep-scanning"
    bad = Result(topics.GUIDANCE, SERIES, 141, values={"state": "finished"})
    assert [d for d in state.apply(Message(bad)) if d["type"] == "guidance"] == []
    assert state.snapshot()["series"][0]["guidance"]["index"] == 140
