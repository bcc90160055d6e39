"""Fan-out of results: a publisher that never blocks, subscribers that count drops.

PUB/SUB is only for fanning out results (SPEC 6): the chain itself is
PUSH/PULL so no volume is lost. A slow or dead subscriber must never slow the
chain, which is what ZeroMQ's PUB gives for free: when one subscriber's queue
reaches the high-water mark, messages *to that subscriber* are dropped and
``send`` still returns at once. What ZeroMQ does not give is a count of those
drops on the publisher side:

- ``send(..., NOBLOCK)`` on a PUB never raises ``zmq.Again``; PUB drops
  silently, per subscriber.
- ``ZMQ_XPUB_NODROP`` makes ``send`` raise ``zmq.Again`` instead of dropping,
  but libzmq checks the high-water mark of *every* matching subscriber and then
  sends to none of them: one stalled subscriber stalls everyone (measured in
  ``tests/stream/test_pubsub.py``). Not usable here.
- Per-subscriber queues are not observable through the socket API.

So drops are counted where they can be seen: every published message carries
``seq`` (per publisher and topic) and ``pub`` (publisher id) in its header, and
:class:`Subscriber` counts the holes. The publisher side reports what it can:
messages published and, through an XPUB socket with ``XPUB_VERBOSER``, the
number of live subscriptions.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import zmq

from boldstream.stream.codec import decode, encode
from boldstream.stream.curve import CurveClient
from boldstream.stream.messages import Message

__all__ = ["Publisher", "Subscriber"]


class Publisher:
    """An XPUB socket that stamps ``seq``/``published`` and never blocks.

    ``socket`` must be an XPUB (or PUB) socket the caller binds or connects;
    the constructor sets its high-water mark and verbose subscription reporting.
    """

    def __init__(self, socket: zmq.Socket[Any], *, name: str, sndhwm: int = 100) -> None:
        self.socket = socket
        self.id = f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.published = 0
        self.subscriptions = 0
        self._seq: dict[str, int] = {}
        socket.sndhwm = sndhwm
        if socket.type == zmq.XPUB:
            socket.setsockopt(zmq.XPUB_VERBOSER, 1)

    def publish(self, message: Message) -> None:
        """Send a copy of ``message`` stamped ``published``, with its topic's next seq."""
        topic = message.topic
        seq = self._seq.get(topic, 0)
        self._seq[topic] = seq + 1
        copy = Message(message.payload, dict(message.timestamps), seq=seq, publisher=self.id)
        copy.stamp("published", time.time())
        # PUB/XPUB never block on a full subscriber; NOBLOCK only guards the
        # case of no subscriber pipe being writable at all.
        try:
            self.socket.send_multipart(encode(copy), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        self.published += 1

    def drain_subscriptions(self) -> int:
        """Read pending (un)subscription events from an XPUB; return how many."""
        if self.socket.type != zmq.XPUB:
            return 0
        n = 0
        while True:
            try:
                event = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return n
            n += 1
            if event[:1] == b"\x01":
                self.subscriptions += 1
            elif event[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)


class Subscriber:
    """A SUB socket that decodes messages and counts the ones it missed.

    ``curve``: connect as a CurveZMQ client (a publisher that is a CURVE
    server sends nothing to a subscriber without its public key).
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        address: str,
        *,
        topics: tuple[str, ...] = ("",),
        rcvhwm: int = 100,
        curve: CurveClient | None = None,
    ) -> None:
        self.socket = context.socket(zmq.SUB)
        self.socket.linger = 0
        self.socket.rcvhwm = rcvhwm
        if curve is not None:
            curve.apply(self.socket)
        for topic in topics:
            self.socket.subscribe(topic.encode())
        self.socket.connect(address)
        self.received = 0
        self.dropped = 0
        self._last: dict[tuple[str, str], int] = {}

    def recv(self, *, timeout_ms: int | None = None) -> Message | None:
        """Next message, or None when nothing came within ``timeout_ms``."""
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        message = decode(self.socket.recv_multipart(copy=False))
        self.received += 1
        if message.seq is not None and message.publisher is not None:
            key = (message.publisher, message.topic)
            last = self._last.get(key)
            if last is not None and message.seq > last + 1:
                self.dropped += message.seq - last - 1
            self._last[key] = message.seq
        return message

    def close(self) -> None:
        self.socket.close(linger=0)
