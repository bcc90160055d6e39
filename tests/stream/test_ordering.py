"""The reorder buffer: order, gaps, duplicates, interleaved series; then as a stage."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import zmq

from boldstream.errors import StreamError
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.stream.codec import recv, send
from boldstream.stream.messages import EndOfStream, Gap, Message, Result, SeriesEnd, SeriesStart
from boldstream.stream.ordering import Orderer
from boldstream.stream.runner import start_chain
from boldstream.stream.stage import StageConfig

NewVolume = Callable[..., Volume]
NewSeries = Callable[..., SeriesInfo]


def summary(messages: list[Message]) -> list[tuple[str, int | None] | tuple[str, int, str]]:
    out: list[tuple[str, int | None] | tuple[str, int, str]] = []
    for m in messages:
        if isinstance(m.payload, Gap):
            out.append(("gap", m.payload.index, m.payload.reason))
        else:
            out.append((m.kind, m.index))
    return out


def missing(series: SeriesInfo, index: int) -> Message:
    return Message(VolumeIncomplete(series, index, 10, 36, 1.0, 2.0))


def test_out_of_order_volumes_leave_in_order(new_volume: NewVolume) -> None:
    o = Orderer(timeout_s=1.0)
    out: list[Message] = []
    for i in (2, 0, 3, 1, 5, 4):
        out += o.push(Message(new_volume(i)), now=0.0)
    assert [m.index for m in out] == [0, 1, 2, 3, 4, 5]
    assert o.stats()["released"] == 6 and o.next_deadline() is None


def test_incomplete_volume_becomes_a_gap_at_once(
    new_volume: NewVolume, new_series: NewSeries
) -> None:
    o = Orderer(timeout_s=100.0)
    s = new_series()
    assert summary(o.push(Message(new_volume(0, series=s)), 0.0)) == [("volume", 0)]
    assert o.push(Message(new_volume(2, series=s)), 0.0) == []
    assert summary(o.push(missing(s, 1), 0.0)) == [("gap", 1, "incomplete"), ("volume", 2)]
    # The receiver gave up on 1: if it shows up after all, it is late, not re-emitted.
    assert o.push(Message(new_volume(1, series=s)), 0.0) == []
    assert o.stats()["late"] == 1 and o.stats()["gaps_incomplete"] == 1


def test_hole_is_skipped_after_timeout_never_waited_on_forever(new_volume: NewVolume) -> None:
    o = Orderer(timeout_s=2.0)
    assert len(o.push(Message(new_volume(0)), 10.0)) == 1
    assert o.next_deadline() is None  # the newest volume not yet here is not a hole
    assert o.push(Message(new_volume(3)), 11.0) == []
    assert o.push(Message(new_volume(4)), 12.5) == []
    assert o.next_deadline() == 13.0
    assert o.expire(12.9) == []
    out = o.expire(13.0)
    assert summary(out) == [
        ("gap", 1, "timeout"),
        ("gap", 2, "timeout"),
        ("volume", 3),
        ("volume", 4),
    ]
    assert o.next_deadline() is None
    # Too late: dropped, counted.
    assert o.push(Message(new_volume(2)), 14.0) == []
    assert o.stats()["late"] == 1 and o.stats()["gaps_timeout"] == 2


def test_deadline_counts_from_the_oldest_waiting_volume(new_volume: NewVolume) -> None:
    o = Orderer(timeout_s=2.0)
    o.push(Message(new_volume(0)), 0.0)
    o.push(Message(new_volume(2)), 1.0)  # waits for 1
    o.push(Message(new_volume(4)), 1.5)  # waits for 3
    assert summary(o.push(Message(new_volume(1)), 2.0)) == [("volume", 1), ("volume", 2)]
    # Volume 4 has waited since 1.5: its hole expires at 3.5, not 2.0 + 2.
    assert o.next_deadline() == 3.5
    assert summary(o.expire(3.5)) == [("gap", 3, "timeout"), ("volume", 4)]


def test_duplicates_are_dropped(new_volume: NewVolume) -> None:
    o = Orderer()
    o.push(Message(new_volume(0)), 0.0)
    o.push(Message(new_volume(2)), 0.0)
    assert o.push(Message(new_volume(0)), 0.0) == []  # already released
    assert o.push(Message(new_volume(2)), 0.0) == []  # already held
    assert [m.index for m in o.push(Message(new_volume(1)), 0.0)] == [1, 2]
    assert o.stats()["duplicates"] == 2 and o.stats()["released"] == 3


def test_interleaved_series_are_kept_apart(new_volume: NewVolume, new_series: NewSeries) -> None:
    a = new_series("sess-a", "1.1")
    b = new_series("sess-b", "2.2")
    b_same_session = new_series("sess-a", "3.3")  # same session, another series
    o = Orderer(timeout_s=5.0)
    out: list[Message] = []
    for index, series in [(1, a), (0, b), (0, b_same_session), (0, a), (2, b), (1, b)]:
        out += o.push(Message(new_volume(index, series=series)), 0.0)
    by_series: dict[str, list[int | None]] = {}
    for m in out:
        assert m.series is not None
        by_series.setdefault(m.series.series_uid, []).append(m.index)
    assert by_series == {"1.1": [0, 1], "2.2": [0, 1, 2], "3.3": [0]}
    assert o.stats()["series"] == 3 and o.stats()["duplicates"] == 0


def test_max_pending_bounds_memory(new_volume: NewVolume) -> None:
    o = Orderer(timeout_s=1000.0, max_pending=3)
    out: list[Message] = []
    for i in (1, 2, 3, 4):
        out += o.push(Message(new_volume(i)), 0.0)
    assert summary(out) == [
        ("gap", 0, "timeout"),
        ("volume", 1),
        ("volume", 2),
        ("volume", 3),
        ("volume", 4),
    ]


def test_series_end_flushes_and_marks_what_never_came(
    new_volume: NewVolume, new_series: NewSeries
) -> None:
    s = new_series()
    o = Orderer(timeout_s=100.0)
    out = o.push(Message(SeriesStart(s, 1.0)), 0.0)
    assert o.push(Message(SeriesStart(s, 1.0)), 0.0) == []  # re-sent after a restart
    for i in (0, 2):
        out += o.push(Message(new_volume(i, series=s)), 0.0)
    out += o.push(Message(SeriesEnd(s, 9.0, n_volumes=5, reason="complete")), 0.0)
    assert summary(out) == [
        ("series-start", None),
        ("volume", 0),
        ("gap", 1, "series-end"),
        ("volume", 2),
        ("gap", 3, "series-end"),
        ("gap", 4, "series-end"),
        ("series-end", None),
    ]
    assert o.push(Message(new_volume(3, series=s)), 0.0) == []


def test_other_messages_pass_straight_through(new_series: NewSeries) -> None:
    o = Orderer()
    m = Message(Result("motion", new_series(), 7, {"fd": 0.1}))
    assert o.push(m, 0.0) == [m]
    eos = Message(EndOfStream())
    assert o.push(eos, 0.0) == [eos]


def test_flush_at_end_of_stream(new_volume: NewVolume) -> None:
    o = Orderer()
    o.push(Message(new_volume(1)), 0.0)
    assert summary(o.flush()) == [("gap", 0, "series-end"), ("volume", 1)]


def test_bad_settings() -> None:
    with pytest.raises(StreamError):
        Orderer(timeout_s=0)


# --------------------------------------------------------------------------- as a stage


def test_ordering_stage_in_a_thread_chain(
    ctx: zmq.Context[zmq.Socket[bytes]], new_volume: NewVolume, new_series: NewSeries
) -> None:
    """Two interleaved series, out of order, with a duplicate, an incomplete volume
    and one that never arrives: each series comes out in order, gaps marked."""
    sink = ctx.socket(zmq.PULL)
    sink.linger = 0
    sink.bind("tcp://127.0.0.1:*")
    configs = [
        StageConfig(name="in", linger_ms=0),
        StageConfig(
            name="order",
            factory="boldstream.stream.ordering:OrderingStage",
            options={"timeout_s": 0.3},
            linger_ms=0,
        ),
        StageConfig(name="out", linger_ms=0),
    ]
    chain = start_chain(
        configs, output=sink.get(zmq.LAST_ENDPOINT).decode(), mode="thread", context=ctx
    )
    try:
        source = ctx.socket(zmq.PUSH)
        source.linger = 0
        source.connect(chain.input)
        a, b = new_series("sess-a", "1.1"), new_series("sess-b", "2.2")
        sent = [
            Message(new_volume(1, series=a)),
            Message(new_volume(0, series=b)),
            Message(new_volume(0, series=a)),
            Message(new_volume(2, series=b)),
            missing(b, 1),
            Message(new_volume(0, series=a)),  # duplicate
            Message(new_volume(3, series=a)),  # 2 never comes: timeout
            Message(new_volume(3, series=b)),
        ]
        for m in sent:
            send(source, m)
        got: dict[str, list[tuple[str, int | None] | tuple[str, int, str]]] = {}
        t0 = time.monotonic()
        for _ in range(8):
            assert sink.poll(20_000)
            m = recv(sink)
            assert m.series is not None
            got.setdefault(m.series.series_uid, []).extend(summary([m]))
        assert got == {
            "1.1": [("volume", 0), ("volume", 1), ("gap", 2, "timeout"), ("volume", 3)],
            "2.2": [("volume", 0), ("gap", 1, "incomplete"), ("volume", 2), ("volume", 3)],
        }
        assert time.monotonic() - t0 < 10
        assert not sink.poll(0)
        stats = chain.stages[1].health()["stage"]
        assert stats["duplicates"] == 1 and stats["gaps_timeout"] == 1 and stats["pending"] == 0
    finally:
        chain.stop()
