"""The pipeline's hub: the one thread that owns the pipeline's own sockets.

It takes the receiver's submitted events (``Pipeline.submit`` only encodes
them and pushes them over ``inproc://``), runs the reorder buffer and the
journal, publishes ``series-start``, ``volume-received`` and
``volume-missing`` at once, sends the ordered volumes into the stage chain,
and publishes what comes back: from the chain's end, and with the
connectivity stage also straight from the QC stage (``direct``). See
:mod:`boldstream.pipeline.service` for the whole picture and the rules
(each result once; a volume done when every stage has handled it; a series'
end after everything of it).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from boldstream.config.settings import Settings
from boldstream.errors import StreamError
from boldstream.pipeline.checkpoint import CheckpointStore
from boldstream.pipeline.guidance_stage import GuidanceStage, guidance_options
from boldstream.pipeline.indices import IndexSet
from boldstream.pipeline.journal import Journal
from boldstream.pipeline.series_stage import (
    CHECKPOINT,
    CORRECTED,
    INTERNAL_PREFIX,
    PASSED,
    SKIPPED,
)
from boldstream.pipeline.snapshot import SeriesView, Snapshot
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.sinks import topics
from boldstream.stream.codec import MessageError, decode, encode
from boldstream.stream.curve import CurveServer
from boldstream.stream.messages import (
    Gap,
    Message,
    Result,
    SeriesEnd,
    SeriesStart,
    series_key,
)
from boldstream.stream.ordering import OrderingStage
from boldstream.stream.pubsub import Publisher

__all__ = ["Consumer", "Hub"]

Key = tuple[str, str]
#: An in-process consumer of the hub's messages (:meth:`Pipeline.add_consumer`).
Consumer = Callable[[Message], None]


@dataclass(eq=False)
class _Series:
    """The hub's bookkeeping for one series."""

    info: SeriesInfo
    view: SeriesView
    last_submit: float
    #: Kept after the end (a re-sent volume is a duplicate, a new one late).
    received: IndexSet = field(default_factory=IndexSet)
    done: set[int] = field(default_factory=set)
    gaps: set[int] = field(default_factory=set)
    #: Volumes the chain's end has acknowledged whose qc result is not in yet.
    passed: set[int] = field(default_factory=set)
    published: dict[str, set[int]] = field(default_factory=dict)
    warned: set[tuple[str, int]] = field(default_factory=set)
    #: The series' end from the chain, held until the direct path has ended too.
    chain_end: Message | None = None
    direct_ended: bool = False
    ended: bool = False
    end_sent: bool = False
    #: A volume came after the end was sent (warned once).
    after_end: bool = False

    def release(self) -> None:
        """Forget what only an open series needs (results of an ended one are
        dropped as repeats before any of it is read)."""
        self.done = set()
        self.gaps = set()
        self.passed = set()
        self.published = {}
        self.warned = set()


class Hub:
    """The thread that owns the pipeline's own sockets; see the module docstring.

    Its collaborators come from the :class:`~boldstream.pipeline.service.Pipeline`
    that starts it: the ``inproc://`` address ``submit()`` pushes to, the queue of
    commands (``flush``, ``resend``, ``warn``, ``exit``) of its other threads, the
    in-process consumers, the run's checkpoint folder and the CURVE server.
    """

    def __init__(
        self,
        settings: Settings,
        context: zmq.Context[Any],
        log: Any,
        *,
        submit_address: str,
        results_address: str,
        direct_address: str | None,
        stateful: tuple[str, ...],
        commands: queue.SimpleQueue[tuple[str, Any]],
        consumers: Sequence[Consumer] = (),
        run_dir: Path | None = None,
        curve: CurveServer | None = None,
    ):
        self.settings = settings
        self.context = context
        self.log = log
        self.commands = commands
        self.consumers = consumers
        self.run_dir = run_dir
        p = settings.pipeline
        self.order = OrderingStage(
            "order", timeout_s=p.order_timeout_s, max_pending=p.order_max_pending
        )
        self.journal = Journal(stateful=stateful)
        self.snapshot = Snapshot()
        self.series: dict[Key, _Series] = {}
        self.outbox: deque[Message] = deque()
        self.idle = threading.Condition()
        self.taken = 0
        #: ``taken`` when this thread last found nothing in flight. Other threads
        #: read only this (the journal and the orderer are this thread's alone).
        self.idle_upto = 0
        self.stats: dict[str, int] = {
            "submitted": 0,
            "published": 0,
            "duplicates_dropped": 0,
            "resent": 0,
            "journal": 0,
            "undecodable": 0,
            "subscriptions": 0,
        }
        self.idle_s = p.series_idle_s
        s = settings
        self.guidance = (
            GuidanceStage(**guidance_options(s))
            if s.guidance.enabled and s.connectivity.enabled
            else None
        )
        self.running = True
        self._sockets: list[zmq.Socket[Any]] = []
        try:
            self.submit_pull = self._socket(zmq.PULL)
            self.submit_pull.rcvhwm = 0
            self.submit_pull.bind(submit_address)
            self.results = self._socket(zmq.PULL)
            self.results.rcvhwm = p.hwm
            self.results.bind(results_address)
            #: The QC stage's results sent past the connectivity stage (None: no split).
            self.direct: zmq.Socket[Any] | None = None
            if direct_address is not None:
                self.direct = self._socket(zmq.PULL)
                self.direct.rcvhwm = p.hwm
                self.direct.bind(direct_address)
            xpub = self._socket(zmq.XPUB)
            if curve is not None:
                curve.apply(xpub)
            self.publisher = Publisher(xpub, name="pipeline", sndhwm=1000)
            xpub.bind(p.pub)
            self.pub_endpoint = _last_endpoint(xpub)
            self.router: zmq.Socket[Any] | None = None
            self.snapshot_endpoint = ""
            if p.snapshot:
                self.router = self._socket(zmq.ROUTER)
                if curve is not None:
                    curve.apply(self.router)
                self.router.bind(p.snapshot)
                self.snapshot_endpoint = _last_endpoint(self.router)
        except zmq.ZMQError as exc:
            self.close()
            raise StreamError(f"pipeline: cannot bind its endpoints: {exc}") from exc
        self.chain: zmq.Socket[Any] | None = None

    def _socket(self, kind: int) -> zmq.Socket[Any]:
        s: zmq.Socket[Any] = self.context.socket(kind)
        s.linger = 0
        self._sockets.append(s)
        return s

    def connect_chain(self, address: str) -> None:
        self.chain = self._socket(zmq.PUSH)
        self.chain.sndhwm = self.settings.pipeline.hwm
        self.chain.connect(address)

    def close(self) -> None:
        for s in self._sockets:
            s.close(linger=0)
        self._sockets.clear()

    def is_idle(self, submitted: int) -> bool:
        """Whether the first ``submitted`` volumes are all published (any thread)."""
        return self.idle_upto >= submitted

    def _nothing_in_flight(self) -> bool:
        return (
            not self.outbox
            and self.order.orderer.stats()["pending"] == 0
            and self.journal.unfinished() == 0
        )

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.submit_pull, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        if self.direct is not None:
            poller.register(self.direct, zmq.POLLIN)
        poller.register(self.publisher.socket, zmq.POLLIN)
        if self.router is not None:
            poller.register(self.router, zmq.POLLIN)
        assert self.chain is not None
        next_idle_check = time.monotonic() + 1.0
        try:
            while self.running:
                poller.register(self.chain, zmq.POLLOUT if self.outbox else 0)
                timeout = 50
                deadline = self.order.next_deadline()
                if deadline is not None:
                    timeout = min(timeout, max(0, int((deadline - time.monotonic()) * 1000) + 1))
                events = dict(poller.poll(timeout))
                if self.direct is not None and self.direct in events:
                    self._drain_socket(self.direct, self._on_direct)
                if self.results in events:
                    self._drain_socket(self.results, self._on_result)
                if self.submit_pull in events:
                    self._drain_socket(self.submit_pull, self._on_submit)
                if self.publisher.socket in events:
                    self.publisher.drain_subscriptions()
                    self.stats["subscriptions"] = self.publisher.subscriptions
                if self.router is not None and self.router in events:
                    self._answer_snapshots()
                deadline = self.order.next_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    self._dispatch(self.order.tick(time.monotonic()))
                self._send_outbox()
                self._commands()
                if time.monotonic() >= next_idle_check:
                    self._end_idle_series()
                    next_idle_check = time.monotonic() + 1.0
                self.stats["journal"] = len(self.journal)
                with self.idle:
                    if self.idle_upto < self.taken and self._nothing_in_flight():
                        self.idle_upto = self.taken
                    self.idle.notify_all()
        except Exception:
            self.log.exception("pipeline hub failed")
            raise

    def _drain_socket(self, socket: zmq.Socket[Any], handle: Any) -> None:
        for _ in range(64):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                message = decode(frames)
            except MessageError as exc:
                self.stats["undecodable"] += 1
                self.log.error("undecodable message dropped", error=str(exc))
                continue
            handle(message)

    def _commands(self) -> None:
        while True:
            try:
                command, arg = self.commands.get_nowait()
            except queue.Empty:
                return
            if command == "exit":
                self.running = False
            elif command == "flush":
                self._dispatch(self.order.finish())
            elif command == "resend":
                pending = self.journal.pending()
                self.stats["resent"] += len(pending)
                self.log.info(
                    "re-sending journal after a restart", stage=arg, messages=len(pending)
                )
                self.outbox.extend(pending)
                self._publish(
                    Message(
                        topics.warning_result(
                            None, None, f"stage {arg} restarted", code="stage-restarted"
                        )
                    )
                )
            elif command == "warn":
                text, code = arg
                self._publish(Message(topics.warning_result(None, None, text, code=code)))

    def _send_outbox(self) -> None:
        assert self.chain is not None
        while self.outbox:
            try:
                self.chain.send_multipart(encode(self.outbox[0]), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.outbox.popleft()

    # -- receiver events -----------------------------------------------------------

    def _series(self, info: SeriesInfo, now: float) -> _Series:
        key = series_key(info)
        state = self.series.get(key)
        if state is None:
            view = self.snapshot.view(key, info, started=now)
            state = self.series[key] = _Series(info=info, view=view, last_submit=now)
            start = Message(SeriesStart(info, started=now))
            self._publish(start)
            self._dispatch(self.order.process(Message(SeriesStart(info, started=now))))
        return state

    def _on_submit(self, message: Message) -> None:
        self.taken += 1
        self.stats["submitted"] += 1
        p = message.payload
        now = time.time()
        message.stamp("hub.in", now)
        if isinstance(p, SeriesEnd):
            state = self.series.get(series_key(p.series))
            if state is None or state.end_sent:
                return
            state.end_sent = True
            self._dispatch(self.order.process(message))
            return
        if not isinstance(p, Volume | VolumeIncomplete):
            return
        state = self._series(p.series, now)
        state.last_submit = now
        if p.index in state.received:
            state.view.counts["duplicates"] += 1
        else:
            if state.end_sent and not state.after_end:
                state.after_end = True
                self._after_end(state, message, p.index)
            state.received.add(p.index)
            if isinstance(p, Volume):
                state.view.counts["received"] += 1
                result = topics.volume_received_result(
                    p.series,
                    p.index,
                    shape=p.shape,
                    voxel_mm=[float(v) for v in p.voxel_size],
                    assembly_ms=(p.assembled - p.last_received) * 1000.0,
                    instances=len(p.instance_uids),
                )
                self._publish(message.derive(result))
            else:
                state.view.counts["missing"] += 1
                self._publish(message)
        self._dispatch(self.order.process(message))
        self._end_if_complete(state)

    def _end_if_complete(self, state: _Series) -> None:
        """End a series whose header stated its volume count once all are in."""
        n = state.info.n_volumes
        if n is None or state.end_sent or len(state.received) < n:
            return
        if any(i not in state.received for i in range(n)):
            return
        state.end_sent = True
        self.log.info("series complete", series=state.info.series_uid, volumes=n)
        end = SeriesEnd(state.info, ended=time.time(), n_volumes=n, reason="complete")
        self._dispatch(self.order.process(Message(end)))

    def _after_end(self, state: _Series, message: Message, index: int) -> None:
        """A volume of a series already ended: stored by the receiver, not analysed."""
        text = (
            f"volume {index} arrived after the series ended; it is stored but not "
            "analysed (the series stated fewer volumes, or sent none for "
            f"pipeline.series_idle_s = {self.idle_s:g} s)"
        )
        self.log.warning(
            "volume after the series ended", series=state.info.series_uid, volume=index
        )
        state.view.counts["warnings"] += 1
        self._publish(
            message.derive(topics.warning_result(state.info, index, text, code="after-series-end"))
        )

    def _dispatch(self, messages: Any) -> None:
        """Send what the orderer released into the chain, journaling it first."""
        for message in messages:
            p = message.payload
            if isinstance(p, Volume | Gap):
                self.journal.add(series_key(p.series), p.index, message)
            elif isinstance(p, SeriesEnd):
                self.journal.add(series_key(p.series), None, message)
            self.outbox.append(message)

    def _end_idle_series(self) -> None:
        now = time.time()
        for state in self.series.values():
            if not state.end_sent and now - state.last_submit > self.idle_s:
                state.end_sent = True
                end = SeriesEnd(state.info, ended=now, reason="idle")
                self._dispatch(self.order.process(Message(end)))

    # -- results ---------------------------------------------------------------------

    def _on_direct(self, message: Message) -> None:
        """What the QC stage sent past the connectivity stage: results and its series ends."""
        self._on_result(message, direct=True)

    def _on_result(self, message: Message, *, direct: bool = False) -> None:
        p = message.payload
        series = message.series
        if series is None:
            self._publish(message)
            return
        key = series_key(series)
        state = self.series.get(key)
        if state is None:  # results of a series from before a restart of ours
            return
        if state.ended:
            # Every path delivered all of the series before its end: what
            # comes now is a repeat (a stage re-doing re-sent volumes).
            self._duplicate()
            return
        if isinstance(p, Result):
            self._on_analysis(state, key, message, p)
        elif isinstance(p, Gap):
            if p.index in state.done:
                self._duplicate()
                return
            state.view.counts["gaps"] += 1
            state.gaps.add(p.index)
            self._finish(state, key, p.index)
            self._publish(message)
        elif isinstance(p, SeriesEnd):
            if state.ended or (state.direct_ended if direct else state.chain_end is not None):
                self._duplicate()
                return
            if direct:
                state.direct_ended = True
            else:
                state.chain_end = message
            self._end(state, key)

    def _end(self, state: _Series, key: Key) -> None:
        """Publish the series' end once every path has delivered all of the series.

        Each path is first-in first-out: the chain's end follows every result
        the chain made of the series, and with the split the QC stage's copy
        of the end follows every result it sent straight here.
        """
        message = state.chain_end
        if message is None or (self.direct is not None and not state.direct_ended):
            return
        assert isinstance(message.payload, SeriesEnd)
        state.ended = True
        state.release()
        state.view.ended = message.payload.ended
        self.journal.ended(key)
        if self.run_dir is not None:
            CheckpointStore.forget(self.run_dir, state.info)
        self._guide(message)
        self._publish(message)

    def _on_analysis(self, state: _Series, key: Key, message: Message, p: Result) -> None:
        index = p.index
        if p.topic == CHECKPOINT:
            if index is not None:
                self.journal.checkpoint(key, str(p.values.get("stage")), index)
            return
        if p.topic == SKIPPED:
            if index is not None and index not in state.done:
                state.view.counts["skipped"] += 1
                self._finish(state, key, index)
                self._tap(message)
            return
        if p.topic == CORRECTED:
            seen = state.published.setdefault(CORRECTED, set())
            if index is not None and index not in seen:
                seen.add(index)
                self._tap(message)
            if index is not None and self.direct is not None:
                self._passed(state, key, index)
            return
        if p.topic == PASSED:
            if index is not None:
                self._passed(state, key, index)
            return
        if p.topic.startswith(INTERNAL_PREFIX):
            return
        if p.topic == topics.WARNING:
            code = str(p.values.get("code"))
            if index is not None:
                if (code, index) in state.warned:
                    self._duplicate()
                    return
                state.warned.add((code, index))
            state.view.counts["warnings"] += 1
            self._publish(message)
            return
        if index is None:
            self._publish(message)
            return
        seen = state.published.setdefault(p.topic, set())
        if index in seen or (p.topic == topics.QC and index in state.gaps):
            self._duplicate()
            return
        seen.add(index)
        if p.topic == topics.QC:
            received = message.timestamps.get("received")
            now = time.time()
            values = dict(p.values)
            latency = None if received is None else (now - received) * 1000.0
            values[topics.QC_LATENCY_MS] = latency
            message = Message(
                Result(p.topic, p.series, index, values=values), dict(message.timestamps)
            )
            state.view.on_qc(index, values)
            if self.direct is None or index in state.passed:
                state.passed.discard(index)
                self._finish(state, key, index)
            self._publish(message)
            self._guide(message)
            self.log.info(
                "volume published",
                series=state.info.series_uid,
                volume=index,
                latency_ms=None if latency is None else round(latency, 1),
                fd_mm=values.get("fd_mm"),
                outlier=values.get("outlier"),
            )
            return
        if p.topic == topics.MOTION:
            state.view.on_motion(index, p.values)
        self._publish(message)
        self._guide(message)

    def _passed(self, state: _Series, key: Key, index: int) -> None:
        """The chain's end has handled volume ``index`` (split pipelines only)."""
        if index in state.published.get(topics.QC, ()):
            self._finish(state, key, index)
        elif index not in state.done:
            state.passed.add(index)

    def _finish(self, state: _Series, key: Key, index: int) -> None:
        state.done.add(index)
        state.view.last_index = max(index, state.view.last_index or -1)
        self.journal.done(key, index)

    def _guide(self, message: Message) -> None:
        """Publish the guidance that ``message`` (qc, target, series end) leads to."""
        if self.guidance is None:
            return
        try:
            for guidance in self.guidance.observe(message):
                self._publish(guidance)
        except Exception:
            self.log.exception("guidance failed", topic=message.topic)

    def _duplicate(self) -> None:
        self.stats["duplicates_dropped"] += 1

    def _publish(self, message: Message) -> None:
        self.publisher.publish(message)
        self.stats["published"] += 1
        self._tap(message)

    def _tap(self, message: Message) -> None:
        for consumer in self.consumers:
            try:
                consumer(message)
            except Exception:
                self.log.exception("pipeline consumer failed", topic=message.topic)

    def _answer_snapshots(self) -> None:
        assert self.router is not None
        state = self.snapshot.as_dict()
        state["subscriptions"] = self.publisher.subscriptions
        body = json.dumps(state, separators=(",", ":"), allow_nan=False).encode()
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # REQ puts an empty delimiter before the request; DEALER may not.
            envelope = frames[:-1]
            self.router.send_multipart([*envelope, body])


def _last_endpoint(socket: zmq.Socket[Any]) -> str:
    endpoint = socket.get(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
