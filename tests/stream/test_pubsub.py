"""Fan-out: a subscriber that never reads must not slow the chain; drops are counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import pytest
import zmq

from boldstream.receiver.volume import Volume
from boldstream.stream.codec import recv, send
from boldstream.stream.messages import Message
from boldstream.stream.pubsub import Subscriber
from boldstream.stream.runner import Chain, start_chain
from boldstream.stream.stage import StageConfig

Ctx = zmq.Context[zmq.Socket[bytes]]
NewVolume = Callable[..., Volume]
TIMEOUT_MS = 30_000


def run_chain(
    ctx: Ctx,
    new_volume: NewVolume,
    *,
    mode: Literal["thread", "process"],
    n: int,
    stalled_subscriber: bool,
) -> tuple[int, dict[str, Any], Subscriber | None, Chain, zmq.Socket[bytes]]:
    """Push ``n`` volumes through 3 stages whose middle one publishes every volume."""
    pub = f"inproc://fanout-{id(object())}" if mode == "thread" else "tcp://127.0.0.1:*"
    configs = [
        StageConfig(name="s1", linger_ms=0),
        StageConfig(name="s2", pub=pub, publish_kinds=("volume",), pub_hwm=2, linger_ms=0),
        StageConfig(name="s3", linger_ms=0),
    ]
    sink = ctx.socket(zmq.PULL)
    sink.linger = 0
    sink.bind("tcp://127.0.0.1:*")
    chain = start_chain(
        configs, output=sink.get(zmq.LAST_ENDPOINT).decode(), mode=mode, context=ctx
    )
    subscriber = None
    if stalled_subscriber:
        subscriber = Subscriber(ctx, chain.stages[1].endpoints["pub"], rcvhwm=2)
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while chain.stages[1].health()["subscriptions"] < 1:
            assert time.monotonic() < deadline, "subscription never reached the publisher"
    source = ctx.socket(zmq.PUSH)
    source.linger = 0
    source.connect(chain.input)
    for i in range(n):
        send(source, Message(new_volume(i, shape=(64, 64, 36))))
    arrived = 0
    while arrived < n and sink.poll(TIMEOUT_MS):
        recv(sink)
        arrived += 1
    health = chain.stages[1].health()
    source.close()
    return arrived, health, subscriber, chain, sink


@pytest.mark.parametrize("mode", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_stalled_subscriber_does_not_slow_the_chain(
    ctx: Ctx, new_volume: NewVolume, mode: Literal["thread", "process"]
) -> None:
    n = 300
    base, base_health, _, base_chain, _ = run_chain(
        ctx, new_volume, mode=mode, n=n, stalled_subscriber=False
    )
    base_chain.stop()
    arrived, health, subscriber, chain, sink = run_chain(
        ctx, new_volume, mode=mode, n=n, stalled_subscriber=True
    )
    try:
        # Same count with and without a subscriber that never reads: nothing
        # was held back or lost on the PUSH/PULL chain.
        assert base == arrived == n
        assert base_health["published"] == health["published"] == n
        assert health["subscriptions"] == 1
        # Now the subscriber reads: it got what fitted in its queues, and the
        # sequence numbers tell it how many it missed.
        assert subscriber is not None
        source = ctx.socket(zmq.PUSH)
        source.linger = 0
        source.connect(chain.input)
        # Messages published while its queue is still full are dropped too,
        # so keep sending until one published after it caught up arrives.
        last: Message | None = None
        for extra in range(n, n + 50):
            send(source, Message(new_volume(extra, shape=(64, 64, 36))))
            assert sink.poll(TIMEOUT_MS)
            recv(sink)
            while (got := subscriber.recv(timeout_ms=200)) is not None:
                last = got
            if last is not None and last.seq is not None and last.seq >= n:
                break
        assert last is not None and last.seq is not None and last.seq >= n
        m = last
        assert subscriber.dropped > 0
        assert subscriber.received + subscriber.dropped == last.seq + 1
        assert subscriber.received < n // 2
        assert "published" in m.timestamps and "s2.out" in m.timestamps
    finally:
        if subscriber is not None:
            subscriber.close()
        chain.stop()


def test_xpub_nodrop_would_stall_every_subscriber(ctx: Ctx) -> None:
    """Why the publisher does not use ZMQ_XPUB_NODROP to count drops.

    With NODROP, send() raises zmq.Again once *any* matching subscriber is at
    its high-water mark, and the message then reaches none of them: a stalled
    dashboard would starve every other subscriber.
    """
    pub = ctx.socket(zmq.XPUB)
    pub.linger = 0
    pub.sndhwm = 5
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.XPUB_VERBOSER, 1)
    pub.bind("inproc://nodrop")
    subs = []
    for _ in range(2):
        s = ctx.socket(zmq.SUB)
        s.linger = 0
        s.rcvhwm = 5
        s.connect("inproc://nodrop")
        s.subscribe(b"")
        subs.append(s)
    _stalled, reader = subs
    assert pub.poll(5000) and pub.recv() == b"\x01"
    assert pub.poll(5000) and pub.recv() == b"\x01"
    again = delivered = 0
    for i in range(50):
        try:
            pub.send(b"m%d" % i, zmq.NOBLOCK)
        except zmq.Again:
            again += 1
        if reader.poll(50):
            reader.recv()
            delivered += 1
    assert again > 0
    # The reader kept up, yet it only got what the stalled one could take.
    assert delivered < 50 - again + 1
    assert delivered <= 10
