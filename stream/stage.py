"""A stage: an input socket, an output socket and a loop (pyzmq's basedevice shape).

The work of a stage is one call, ``process(message) -> messages``, written
once as a :class:`Stage` subclass (or a plain callable) and run by
:func:`run_stage` in a thread or a process (:mod:`boldstream.stream.runner`).
Only a picklable :class:`StageConfig` describes a stage: addresses and a
``"module:attribute"`` factory path, never a socket.

Sockets of one stage:

- ``pull`` (bound): the chain's input, PUSH/PULL so that no volume is dropped;
  a full downstream blocks the sender (back-pressure), it does not lose data.
- ``push`` (connected, optional): the chain's output, every emitted message
  except those routed to ``side``.
- ``side`` (connected, optional): a second output that skips the rest of the
  chain, for results nothing further down needs (the QC stage sends its ``qc``
  and ``motion`` results straight to the pipeline's hub, so that they do not
  wait behind the connectivity stage). Messages whose topic is in
  ``side_topics`` go there instead of ``push``; those in ``side_copies`` (a
  series' end) go to both, so the receiver of ``side`` knows when this stage
  has sent all of a series. PUSH/PULL like ``push``: lossless, back-pressured.
- ``pub`` (bound XPUB, optional): fan-out of the emitted messages whose kind is
  in ``publish_kinds``; lossy per subscriber by design, see
  :mod:`boldstream.stream.pubsub`.
- ``control`` (bound ROUTER): requests ``health`` and ``stop`` from a
  supervisor, answered with JSON, even while the stage waits on a full output.

A stage stops on a ``stop`` request (at once, after the message in hand) or
on an in-band :class:`~boldstream.stream.messages.EndOfStream`, which it
forwards downstream after :meth:`Stage.finish` has flushed what it holds, so
everything sent before it is processed first.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq

from boldstream.errors import StreamError
from boldstream.logs import get_logger
from boldstream.stream.codec import MessageError, decode, encode
from boldstream.stream.messages import EndOfStream, Message
from boldstream.stream.pubsub import Publisher

__all__ = [
    "DEFAULT_PUBLISH_KINDS",
    "FunctionStage",
    "PassThrough",
    "Stage",
    "StageConfig",
    "load_stage",
    "run_stage",
]

#: What a stage with a ``pub`` socket fans out unless told otherwise: results
#: and events, not the volumes themselves.
DEFAULT_PUBLISH_KINDS = ("result", "gap", "series-start", "series-end", "volume-missing")


class Stage:
    """Base class of the work a stage does; override :meth:`process`.

    A subclass may also hold timers (``next_deadline``/``tick``, used by the
    orderer to give up on a volume) and state to flush at the end (``finish``).
    """

    name: str = "stage"

    def process(self, message: Message) -> Iterable[Message]:
        """Messages to emit for ``message`` (none, itself, or new ones)."""
        return (message,)

    def next_deadline(self) -> float | None:
        """``time.monotonic()`` at which :meth:`tick` must run, or None."""
        return None

    def tick(self, now: float) -> Iterable[Message]:
        """Called once the deadline has passed; ``now`` is ``time.monotonic()``."""
        return ()

    def finish(self) -> Iterable[Message]:
        """End of stream: emit whatever is still held."""
        return ()

    def stats(self) -> dict[str, Any]:
        """Stage-specific counters, reported under ``"stage"`` in health."""
        return {}

    def close(self) -> None:
        """Release resources; called once when the loop ends."""


class PassThrough(Stage):
    """Emit every message unchanged (tests, benchmarks, wiring checks)."""

    def __init__(self, name: str = "pass") -> None:
        self.name = name


class FunctionStage(Stage):
    """Wrap a plain ``process(message) -> messages`` callable."""

    def __init__(self, name: str, function: Callable[[Message], Iterable[Message]]) -> None:
        self.name = name
        self._function = function

    def process(self, message: Message) -> Iterable[Message]:
        return self._function(message)


@dataclass(frozen=True, slots=True)
class StageConfig:
    """Everything a stage needs, picklable: addresses, a factory path, limits.

    ``pull``/``control`` (and ``pub``) are bound by the stage: a
    ``tcp://127.0.0.1:*`` address gets an ephemeral port, reported back by the
    runner's ``start()``. ``None`` for ``pull``/``control`` means a fresh
    address chosen by the runner (``inproc://`` for a thread, an ephemeral
    TCP port for a process). ``push`` is connected, ``pub=None`` disables fan-out.
    """

    name: str
    #: ``"package.module:attribute"`` returning a :class:`Stage` or a callable.
    factory: str = "boldstream.stream.stage:PassThrough"
    #: Keyword arguments for the factory (JSON-able, picklable).
    options: Mapping[str, Any] = field(default_factory=dict)
    pull: str | None = None
    push: str | None = None
    #: Connected second output; see the module docstring.
    side: str | None = None
    #: Topics (a result's topic, else the message kind) sent on ``side`` instead of ``push``.
    side_topics: tuple[str, ...] = ()
    #: Topics sent on both ``side`` and ``push``.
    side_copies: tuple[str, ...] = ("series-end",)
    pub: str | None = None
    control: str | None = None
    publish_kinds: tuple[str, ...] = DEFAULT_PUBLISH_KINDS
    #: High-water marks in messages. A 90x90x60 float32 volume is 1.9 MB; each
    #: hop can hold up to twice ``hwm`` of them (sender + receiver queues).
    hwm: int = 32
    pub_hwm: int = 100
    #: Bounded linger on close, so an end-of-stream forwarded just before
    #: closing still leaves; tests use 0.
    linger_ms: int = 1000
    #: Longest wait in one poll (bounds the reaction time to ``stop``).
    poll_ms: int = 100
    #: Messages taken from ``pull`` before looking at ``control`` again.
    batch: int = 16


def load_stage(config: StageConfig) -> Stage:
    """Build the stage named by ``config.factory`` with ``config.options``."""
    module_name, _, attribute = config.factory.partition(":")
    if not module_name or not attribute:
        raise StreamError(
            f"stage {config.name!r}: factory must be 'package.module:attribute', "
            f"got {config.factory!r}"
        )
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise StreamError(f"stage {config.name!r}: cannot load {config.factory!r}: {exc}") from exc
    made = target(**config.options)
    if isinstance(made, Stage):
        if made.name == Stage.name:
            made.name = config.name
        return made
    if callable(made):
        return FunctionStage(config.name, made)
    raise StreamError(
        f"stage {config.name!r}: {config.factory!r} returned {type(made).__name__}, "
        "expected a Stage or a callable"
    )


# --------------------------------------------------------------------------- the loop


class _Loop:
    """One stage's sockets and counters; runs in whichever thread calls run()."""

    def __init__(self, config: StageConfig, context: zmq.Context[Any], stage: Stage) -> None:
        self.config = config
        self.stage = stage
        self.log = get_logger("stage", stage=config.name)
        self.running = True
        self.state = "starting"
        self.started = time.time()
        self.counts = {"received": 0, "sent": 0, "errors": 0, "abandoned": 0}
        self.last: dict[str, Any] = {}
        linger = config.linger_ms
        self.pull = context.socket(zmq.PULL)
        self.pull.linger = linger
        self.pull.rcvhwm = config.hwm
        self.control = context.socket(zmq.ROUTER)
        self.control.linger = 0
        self.push: zmq.Socket[Any] | None = None
        self.side: zmq.Socket[Any] | None = None
        self.publisher: Publisher | None = None
        sockets: list[zmq.Socket[Any]] = [self.pull, self.control]
        try:
            self.pull.bind(_required(config.pull, "pull"))
            self.control.bind(_required(config.control, "control"))
            for attribute in ("push", "side"):
                address = getattr(config, attribute)
                if address is None:
                    continue
                out = context.socket(zmq.PUSH)
                sockets.append(out)
                out.linger = linger
                out.sndhwm = config.hwm
                out.connect(address)
                setattr(self, attribute, out)
            if config.pub is not None:
                xpub = context.socket(zmq.XPUB)
                sockets.append(xpub)
                xpub.linger = 0
                self.publisher = Publisher(xpub, name=config.name, sndhwm=config.pub_hwm)
                xpub.bind(config.pub)
        except zmq.ZMQError as exc:
            for s in sockets:
                s.close(linger=0)
            raise StreamError(f"stage {config.name!r}: cannot set up sockets: {exc}") from exc
        self.poller = zmq.Poller()
        self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)
        if self.publisher is not None:
            self.poller.register(self.publisher.socket, zmq.POLLIN)

    def endpoints(self) -> dict[str, str]:
        out = {
            "pull": _last_endpoint(self.pull),
            "control": _last_endpoint(self.control),
        }
        if self.publisher is not None:
            out["pub"] = _last_endpoint(self.publisher.socket)
        return out

    # -- control -------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        now = time.time()
        last_in = self.last.get("in")
        return {
            "name": self.config.name,
            "pid": os.getpid(),
            "state": self.state,
            "uptime_s": now - self.started,
            **self.counts,
            "published": 0 if self.publisher is None else self.publisher.published,
            "subscriptions": 0 if self.publisher is None else self.publisher.subscriptions,
            "last_session": self.last.get("session"),
            "last_series": self.last.get("series"),
            "last_index": self.last.get("index"),
            "last_in": last_in,
            "idle_s": None if last_in is None else now - last_in,
            "lag_s": self.last.get("lag"),
            "process_s": self.last.get("process"),
            "stage": self.stage.stats(),
        }

    def handle_control(self) -> None:
        while True:
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            command = frames[-1]
            if command == b"stop":
                self.running = False
                self.state = "stopping"
                reply: dict[str, Any] = {"ok": True, "state": self.state}
            elif command == b"health":
                reply = self.health()
            else:
                reply = {"ok": False, "error": f"unknown command {command!r}"}
            self.control.send_multipart([*frames[:-1], json.dumps(reply).encode()])

    # -- data ----------------------------------------------------------------

    def send_downstream(self, frames: list[Any], socket: zmq.Socket[Any] | None = None) -> bool:
        """Send on ``socket`` (default ``push``), waiting while its peer is full
        but still answering control."""
        out = self.push if socket is None else socket
        assert out is not None
        poller = zmq.Poller()
        poller.register(out, zmq.POLLOUT)
        poller.register(self.control, zmq.POLLIN)
        while True:
            try:
                out.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            events = dict(poller.poll(self.config.poll_ms))
            if self.control in events:
                self.handle_control()
                if not self.running:
                    return False

    def emit(self, messages: Iterable[Message]) -> None:
        out_key = f"{self.config.name}.out"
        for message in messages:
            now = time.time()
            message.stamp(out_key, now)
            received = message.timestamps.get("received")
            if received is not None:
                self.last["lag"] = now - received
            if self.publisher is not None and message.kind in self.config.publish_kinds:
                self.publisher.publish(message)
            targets = self._outputs(message.topic)
            if not targets:
                continue
            frames = encode(message)
            for socket in targets:
                if self.send_downstream(frames, socket):
                    self.counts["sent"] += 1
                else:
                    self.counts["abandoned"] += 1

    def _outputs(self, topic: str) -> list[zmq.Socket[Any]]:
        """The sockets a message of ``topic`` leaves on (``side``, ``push`` or both)."""
        if self.side is not None:
            if topic in self.config.side_topics:
                return [self.side]
            if topic in self.config.side_copies:
                return [self.side] if self.push is None else [self.side, self.push]
        return [] if self.push is None else [self.push]

    def handle(self, frames: Sequence[zmq.Frame]) -> None:
        try:
            message = decode(frames)
        except MessageError as exc:
            self.counts["errors"] += 1
            self.log.error("undecodable message dropped", error=str(exc))
            return
        t_in = time.time()
        message.stamp(f"{self.config.name}.in", t_in)
        self.counts["received"] += 1
        series = message.series
        index = message.index
        self.last["in"] = t_in
        self.last["index"] = index
        if series is not None:
            self.last["session"] = series.session_key
            self.last["series"] = series.series_uid
        if isinstance(message.payload, EndOfStream):
            self.emit(self.stage.finish())
            self.emit([message])
            self.running = False
            self.state = "drained"
            return
        context: dict[str, Any] = {}
        if series is not None:
            context["series"] = series.series_uid
        if index is not None:
            context["volume"] = index
        with structlog.contextvars.bound_contextvars(**context):
            try:
                outputs = list(self.stage.process(message))
            except Exception as exc:
                self.counts["errors"] += 1
                self.log.exception("stage failed on a message; dropped", kind=message.kind)
                if isinstance(exc, MemoryError):
                    raise
                return
            self.last["process"] = time.time() - t_in
            self.emit(outputs)

    def run(self) -> None:
        self.state = "running"
        config = self.config
        try:
            while self.running:
                timeout = config.poll_ms
                deadline = self.stage.next_deadline()
                if deadline is not None:
                    wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
                    timeout = min(timeout, wait_ms)
                events = dict(self.poller.poll(timeout))
                if self.control in events:
                    self.handle_control()
                if self.publisher is not None and self.publisher.socket in events:
                    self.publisher.drain_subscriptions()
                if self.pull in events:
                    for _ in range(config.batch):
                        if not self.running:
                            break
                        try:
                            frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames)
                deadline = self.stage.next_deadline()
                if self.running and deadline is not None and time.monotonic() >= deadline:
                    self.emit(self.stage.tick(time.monotonic()))
        finally:
            if self.state != "drained":
                self.state = "stopped"
            self.close()

    def close(self) -> None:
        try:
            self.stage.close()
        finally:
            for s in (self.pull, self.push, self.side, self.control):
                if s is not None:
                    s.close()
            if self.publisher is not None:
                self.publisher.socket.close()


def _required(address: str | None, what: str) -> str:
    if address is None:
        raise StreamError(f"no {what} address: start the stage through a runner or set it")
    return address


def _last_endpoint(socket: zmq.Socket[Any]) -> str:
    endpoint = socket.get(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


def run_stage(
    config: StageConfig,
    context: zmq.Context[Any],
    *,
    on_ready: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Build the stage, bind its sockets, report its endpoints, loop until stopped."""
    stage = load_stage(config)
    loop = _Loop(config, context, stage)
    if on_ready is not None:
        on_ready(loop.endpoints())
    loop.run()
