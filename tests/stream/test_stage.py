"""Stages on real sockets: threads over inproc://, processes over ipc:// and tcp://."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from boldstream.errors import StreamError
from boldstream.receiver.volume import Volume
from boldstream.stream.codec import recv, send
from boldstream.stream.messages import EndOfStream, Gap, Message, SeriesEnd
from boldstream.stream.runner import Chain, StageThread, start_chain
from boldstream.stream.stage import StageConfig

Ctx = zmq.Context[zmq.Socket[bytes]]
NewVolume = Callable[..., Volume]
TIMEOUT_MS = 20_000


@pytest.fixture
def sink(ctx: Ctx) -> Iterator[zmq.Socket[bytes]]:
    s = ctx.socket(zmq.PULL)
    s.linger = 0
    s.bind("tcp://127.0.0.1:*")
    yield s
    s.close()


def source_for(ctx: Ctx, chain: Chain) -> zmq.Socket[bytes]:
    s = ctx.socket(zmq.PUSH)
    s.linger = 0
    s.connect(chain.input)
    return s


def endpoint(s: zmq.Socket[bytes]) -> str:
    return s.get(zmq.LAST_ENDPOINT).decode()


def receive(sink: zmq.Socket[bytes], n: int) -> list[Message]:
    out = []
    for _ in range(n):
        assert sink.poll(TIMEOUT_MS), f"only {len(out)} of {n} messages arrived"
        out.append(recv(sink))
    return out


def three_stages(**kw: Any) -> list[StageConfig]:
    return [StageConfig(name=f"s{i}", linger_ms=0, **kw) for i in (1, 2, 3)]


def assert_all_once_in_order(got: list[Message], n: int) -> None:
    assert [m.index for m in got] == list(range(n))
    for m in got:
        keys = list(m.timestamps)
        assert keys == [
            "received",
            "assembled",
            "s1.in",
            "s1.out",
            "s2.in",
            "s2.out",
            "s3.in",
            "s3.out",
        ]
        times = list(m.timestamps.values())
        assert times == sorted(times)


def test_three_thread_stages_over_inproc(ctx: Ctx, new_volume: NewVolume) -> None:
    sink = ctx.socket(zmq.PULL)
    sink.linger = 0
    sink.bind("inproc://test-sink")
    chain = start_chain(three_stages(), output="inproc://test-sink", mode="thread", context=ctx)
    try:
        assert all(
            a.startswith("inproc://") for a in (chain.input, *chain.stages[0].endpoints.values())
        )
        source = source_for(ctx, chain)
        n = 100
        # Above pyzmq's COPY_THRESHOLD (64 kB), so copy=False really shares memory.
        sent = [new_volume(i, shape=(64, 64, 36)) for i in range(n)]
        for v in sent:
            send(source, Message(v))
        got = receive(sink, n)
        assert_all_once_in_order(got, n)
        for a, b in zip(sent, got, strict=True):
            assert isinstance(b.payload, Volume)
            # Zero-copy all the way over inproc: the sink sees the sender's memory.
            assert np.shares_memory(a.data, b.payload.data)
        assert not sink.poll(0)
        health = chain.health()
        assert [h["received"] for h in health] == [n, n, n]
        assert [h["sent"] for h in health] == [n, n, n]
        assert health[2]["last_index"] == n - 1 and health[2]["state"] == "running"
        assert health[2]["lag_s"] is not None and health[2]["lag_s"] >= 0
    finally:
        chain.stop(timeout=5)
    assert not any(s.is_alive() for s in chain.stages)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_three_process_stages(
    ctx: Ctx, new_volume: NewVolume, tmp_path: Path, transport: str
) -> None:
    sink = ctx.socket(zmq.PULL)
    sink.linger = 0
    if transport == "ipc":
        sink.bind(f"ipc://{tmp_path}/sink")
        configs = [
            StageConfig(
                name=f"s{i}",
                pull=f"ipc://{tmp_path}/s{i}",
                control=f"ipc://{tmp_path}/c{i}",
                linger_ms=0,
            )
            for i in (1, 2, 3)
        ]
    else:
        sink.bind("tcp://127.0.0.1:*")
        configs = three_stages()
    chain = start_chain(configs, output=endpoint(sink), mode="process", context=ctx)
    try:
        assert chain.input.startswith(f"{transport}://")
        pids = {h["pid"] for h in chain.health()}
        assert len(pids) == 3 and os.getpid() not in pids
        source = source_for(ctx, chain)
        n = 60
        for i in range(n):
            send(
                source, Message(new_volume(i, shape=(90, 90, 60) if i % 10 == 0 else (32, 32, 16)))
            )
        got = receive(sink, n)
        assert_all_once_in_order(got, n)
        assert not sink.poll(0)
        assert [h["received"] for h in chain.health()] == [n, n, n]
    finally:
        chain.stop(timeout=10)
    assert all(s.exitcode == 0 for s in chain.stages)  # type: ignore[union-attr]


def test_end_of_stream_drains_the_chain(
    ctx: Ctx, sink: zmq.Socket[bytes], new_volume: NewVolume
) -> None:
    # Bounded (not zero) linger: the end-of-stream must leave each stage before it closes.
    configs = [StageConfig(name=f"s{i}", linger_ms=2000) for i in (1, 2, 3)]
    chain = start_chain(configs, output=endpoint(sink), mode="thread", context=ctx)
    source = source_for(ctx, chain)
    n = 20
    for i in range(n):
        send(source, Message(new_volume(i)))
    send(source, Message(EndOfStream("test")))
    got = receive(sink, n + 1)
    assert [m.index for m in got[:n]] == list(range(n))
    assert isinstance(got[-1].payload, EndOfStream) and got[-1].payload.reason == "test"
    assert chain.join(timeout=10)


def test_stop_is_bounded_while_downstream_is_full(ctx: Ctx, new_volume: NewVolume) -> None:
    """A stage stuck on a full, unread output still answers health and stop."""
    # inproc enforces the high-water marks exactly (no kernel buffers behind them).
    sink = ctx.socket(zmq.PULL)
    sink.linger = 0
    sink.rcvhwm = 1
    sink.bind("inproc://never-read")
    stage = StageThread(
        StageConfig(name="stuck", push="inproc://never-read", hwm=1, linger_ms=0), context=ctx
    )
    stage.start()
    source = ctx.socket(zmq.PUSH)
    source.linger = 0
    source.sndhwm = 1000
    source.connect(stage.endpoints["pull"])
    for i in range(50):
        send(source, Message(new_volume(i, shape=(64, 64, 36))))
    deadline = time.monotonic() + 20
    while stage.health()["received"] == 0:
        assert time.monotonic() < deadline
    health = stage.health()
    assert health["received"] < 50
    t0 = time.monotonic()
    stage.stop(timeout=5)
    assert time.monotonic() - t0 < 5
    assert not stage.is_alive()


def test_unknown_commands_and_bad_messages_are_counted(ctx: Ctx, sink: zmq.Socket[bytes]) -> None:
    stage = StageThread(StageConfig(name="s", push=endpoint(sink), linger_ms=0), context=ctx)
    stage.start()
    try:
        assert stage._client().request("dance") == {
            "ok": False,
            "error": "unknown command b'dance'",
        }
        source = ctx.socket(zmq.PUSH)
        source.linger = 0
        source.connect(stage.endpoints["pull"])
        source.send_multipart([b"volume", b"\x80not json"])
        send(source, Message(EndOfStream()))
        assert sink.poll(TIMEOUT_MS)
        assert stage.join(10)
    finally:
        stage.stop()


def test_factory_errors_are_stream_errors(ctx: Ctx) -> None:
    with pytest.raises(StreamError, match=r"cannot load 'nope\.nowhere:Stage'"):
        StageThread(StageConfig(name="bad", factory="nope.nowhere:Stage"), context=ctx).start()
    with pytest.raises(StreamError, match=r"must be 'package\.module:attribute'"):
        StageThread(StageConfig(name="bad", factory="no_colon"), context=ctx).start()


@pytest.mark.slow
def test_process_factory_error_is_reported(ctx: Ctx) -> None:
    from boldstream.stream.runner import StageProcess

    with pytest.raises(StreamError, match="cannot load"):
        StageProcess(StageConfig(name="bad", factory="nope.nowhere:Stage"), context=ctx).start()
    with pytest.raises(StreamError, match="cannot cross a process boundary"):
        StageProcess(StageConfig(name="bad", pull="inproc://x"), context=ctx)


def test_a_side_output_skips_the_rest_of_the_chain(ctx: Ctx, new_volume: NewVolume) -> None:
    sink = ctx.socket(zmq.PULL)
    sink.linger = 0
    sink.bind("inproc://side-test-sink")
    side = ctx.socket(zmq.PULL)
    side.linger = 0
    side.bind("inproc://side-test-side")
    s1, s2, s3 = three_stages()
    s2 = replace(s2, side="inproc://side-test-side", side_topics=("volume",))
    chain = start_chain([s1, s2, s3], output="inproc://side-test-sink", mode="thread", context=ctx)
    try:
        source = source_for(ctx, chain)
        vols = [new_volume(i, shape=(8, 8, 4)) for i in range(5)]
        series = vols[0].series
        for v in vols:
            send(source, Message(v))
        send(source, Message(Gap(series, 5, "timeout")))
        send(source, Message(SeriesEnd(series, ended=0.0)))
        # Volumes leave s2 on its side output, the gap goes down the chain,
        # and the series' end goes both ways, each after what came before it.
        assert [m.kind for m in receive(side, 6)] == ["volume"] * 5 + ["series-end"]
        assert [m.kind for m in receive(sink, 2)] == ["gap", "series-end"]
        assert not side.poll(100) and not sink.poll(0)
        health = chain.health()
        assert [h["received"] for h in health] == [7, 7, 2]
        assert health[1]["sent"] == 8
    finally:
        chain.stop(timeout=5)
        side.close()
        sink.close()
