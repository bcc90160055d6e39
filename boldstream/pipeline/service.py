"""The pipeline service: receiver events in, results out on one XPUB endpoint.

::

    receiver ingest --submit()--> [hub thread] --PUSH--> motion --PUSH--> qc --PUSH--> connectivity
                                     ^  |  ^                               |               |
                                     |  |  +------------- PULL (direct) ---+               |
                                     |  +--XPUB (pub_endpoint) <---------------------PULL--+
                                     +--ROUTER (snapshot_endpoint)

The hub is one thread of the calling process that owns every socket of the
pipeline's own: it takes submitted events (``submit`` only encodes the event
and hands it over an ``inproc://`` socket, so the receiver never waits), runs
the reorder buffer (:class:`~boldstream.stream.ordering.OrderingStage`, called
in place: its state and the journal must survive a stage restart), publishes
``series-start``, ``volume-received`` and ``volume-missing`` at once, sends
the ordered volumes into the chain, and publishes what comes out of its end:
``motion``, ``qc`` (with ``latency_ms``, last DICOM byte to publication),
``target`` (the connectivity stage, :mod:`~boldstream.pipeline.connectivity_stage`;
``[connectivity] enabled = false`` leaves it out), ``guidance`` (made in place
from the published ``qc`` and ``target`` results by
:class:`~boldstream.pipeline.guidance_stage.GuidanceStage`; ``[guidance]``),
``gap``, ``warning`` and ``series-end``. Results carry (series, index); the
hub publishes each (series, topic, index) once and drops repeats.

With the connectivity stage, the QC stage sends ``motion``, ``qc``, its
warnings and the checkpoint notes straight to the hub (``direct``), so the
technician's figures never wait behind a registration or a target; the
corrected volumes go on to the connectivity stage, which acknowledges each
(``pipeline.passed``). The hub counts a volume done when both its ``qc`` and
that acknowledgement are in (so ``drain`` still waits for every stage), and
publishes a series' ``series-end`` once both paths have delivered it.

The analysis stages run as threads over ``inproc://`` (``mode="thread"``) or
as processes over ``ipc://`` (``mode="process"``, the default of ``serve``).
In process mode a supervisor thread watches the stage processes; one that
dies is started again on the same addresses, rebuilds its series from their
checkpoints (:mod:`boldstream.pipeline.checkpoint`), and the hub re-sends its
journal (:mod:`boldstream.pipeline.journal`): every volume not yet published
or not yet covered by a checkpoint. Every accepted volume then appears once
in the published results.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import zmq

from boldstream.config.settings import Settings
from boldstream.errors import StreamError
from boldstream.logs import get_logger
from boldstream.pipeline.checkpoint import CheckpointStore
from boldstream.pipeline.connectivity_stage import connectivity_options
from boldstream.pipeline.guidance_stage import GuidanceStage, guidance_options
from boldstream.pipeline.journal import Journal
from boldstream.pipeline.snapshot import SeriesView, Snapshot
from boldstream.pipeline.stages import (
    CHECKPOINT,
    CORRECTED,
    INTERNAL_PREFIX,
    PASSED,
    SKIPPED,
    stage_options,
)
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.sinks import topics
from boldstream.stream.codec import MessageError, decode, encode
from boldstream.stream.curve import CurveClient, CurveServer
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
from boldstream.stream.runner import StageProcess, StageThread, start_chain
from boldstream.stream.stage import StageConfig

__all__ = ["Pipeline"]

Mode = Literal["thread", "process"]
Runner = StageThread | StageProcess
Key = tuple[str, str]
Submitted = Volume | VolumeIncomplete | SeriesEnd
#: An in-process consumer of the hub's messages (:meth:`Pipeline.add_consumer`).
Consumer = Callable[[Message], None]

_STAGES = ("motion", "qc", "connectivity")
#: What the QC stage sends straight to the hub when the connectivity stage follows it.
_DIRECT_TOPICS = (topics.MOTION, topics.QC, topics.WARNING, CHECKPOINT)
_FACTORIES = {
    "connectivity": "boldstream.pipeline.connectivity_stage:ConnectivityStage",
    "motion": "boldstream.pipeline.stages:MotionStage",
    "qc": "boldstream.pipeline.stages:QCStage",
}


@dataclass(eq=False)
class _Series:
    """The hub's bookkeeping for one series."""

    info: SeriesInfo
    view: SeriesView
    last_submit: float
    received: set[int] = field(default_factory=set)
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


class Pipeline:
    """Motion and QC for every series the receiver hands over; see the module docstring.

    ``start()``, then ``submit(event)`` for every receiver event (from one
    thread at a time), subscribers on :attr:`pub_endpoint`, ``stop()``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        mode: Mode | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.settings = settings
        self.mode: Mode = mode or settings.pipeline.mode
        self._own_context = context is None
        self.context: zmq.Context[Any] = context or zmq.Context()
        self.log = get_logger("pipeline")
        self._tag = uuid.uuid4().hex[:10]
        self._submit_address = f"inproc://pipeline-{self._tag}-submit"
        self._local = threading.local()
        self._submit_sockets: list[zmq.Socket[Any]] = []
        self._submit_lock = threading.Lock()
        self._submitted = 0
        self._runners: list[Runner] = []
        self._runner_lock = threading.Lock()
        self._restarts = dict.fromkeys(_STAGES, 0)
        self._dead: set[str] = set()
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._hub: _Hub | None = None
        self._consumers: list[Consumer] = []
        #: CurveZMQ server of ``pub``/``snapshot`` (``pipeline.curve_secret_key``), set by start().
        self.curve: CurveServer | None = None
        self._hub_thread: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ipc_dir: Path | None = None
        self._own_ipc_dir = False
        self._run_dir: Path | None = None
        self.pub_endpoint = ""
        self.snapshot_endpoint = ""
        self.started = False

    # ------------------------------------------------------------------ start / stop

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the stages (last first), bind the result and snapshot endpoints."""
        if self.started:
            raise StreamError("the pipeline is already started")
        p = self.settings.pipeline
        process = self.mode == "process"
        checkpoint_dir: str | None = None
        if process:
            threads = str(p.blas_threads)
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, threads)
            if p.ipc_dir is not None:
                self._ipc_dir = Path(p.ipc_dir)
                self._ipc_dir.mkdir(parents=True, exist_ok=True)
            else:
                self._ipc_dir = Path(tempfile.mkdtemp(prefix="bs-"))
                self._own_ipc_dir = True
            root = p.checkpoint_dir or (self.settings.receiver.spool_dir / "pipeline-state")
            self._run_dir = Path(root) / f"run-{os.getpid()}-{self._tag}"
            _remove_stale_runs(Path(root))
            self._run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint_dir = str(self._run_dir)
            results = f"ipc://{self._ipc_dir}/results"
            direct = f"ipc://{self._ipc_dir}/direct"
        else:
            results = f"inproc://pipeline-{self._tag}-results"
            direct = f"inproc://pipeline-{self._tag}-direct"
        options = stage_options(self.settings, checkpoint_dir=checkpoint_dir)
        if self._consumers:  # they get the corrected volumes too
            options["qc"]["forward_corrected"] = True
        names = [n for n in _STAGES if n != "connectivity" or self.settings.connectivity.enabled]
        split = "connectivity" in names
        if split:
            options["qc"]["forward_corrected"] = True
            options["connectivity"] = connectivity_options(
                self.settings, checkpoint_dir=checkpoint_dir
            )
            options["connectivity"]["forward_corrected"] = bool(self._consumers)
        configs = []
        for name in names:
            pull = f"ipc://{self._ipc_dir}/{name}-in" if process else None
            control = f"ipc://{self._ipc_dir}/{name}-control" if process else None
            side: dict[str, Any] = {}
            if split and name == "qc":
                # motion and qc results go straight to the hub, not through
                # the connectivity stage (whose registration takes seconds).
                side = {"side": direct, "side_topics": _DIRECT_TOPICS}
            configs.append(
                StageConfig(
                    name=name,
                    factory=_FACTORIES[name],
                    options=options[name],
                    hwm=p.hwm,
                    pull=pull,
                    control=control,
                    **side,
                )
            )
        self._start_curve()
        try:
            # Every stage checkpoints in process mode: the journal waits for all.
            hub = _Hub(
                self,
                results_address=results,
                direct_address=direct if split else None,
                stateful=tuple(names) if process else (),
            )
        except BaseException:
            self._stop_curve()
            raise
        try:
            chain = start_chain(
                configs, output=results, mode=self.mode, context=self.context, timeout=timeout
            )
        except BaseException:
            hub.close()
            self._stop_curve()
            self._cleanup_dirs()
            raise
        self._runners = list(chain.stages)
        hub.connect_chain(chain.input)
        self._hub = hub
        self.pub_endpoint = hub.pub_endpoint
        self.snapshot_endpoint = hub.snapshot_endpoint
        self._hub_thread = threading.Thread(target=hub.run, name="pipeline-hub", daemon=True)
        self._hub_thread.start()
        if process:
            self._supervisor = threading.Thread(
                target=self._supervise, name="pipeline-supervisor", daemon=True
            )
            self._supervisor.start()
        self.started = True
        self.log.info(
            "pipeline started",
            mode=self.mode,
            pub=self.pub_endpoint,
            snapshot=self.snapshot_endpoint or None,
            stages=[r.config.name for r in self._runners],
        )

    def stop(self, *, timeout: float = 10.0) -> None:
        """Flush what is held, wait up to ``timeout`` for its results, stop everything."""
        if not self.started:
            return
        self.started = False
        self._commands.put(("flush", None))
        drained = self.drain(timeout)
        if not drained:
            self.log.warning("pipeline stopped before every volume was published")
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout)
        self._commands.put(("exit", None))
        if self._hub_thread is not None:
            self._hub_thread.join(timeout)
        with self._runner_lock:
            for runner in self._runners:
                try:
                    runner.stop(timeout=5.0)
                except StreamError as exc:
                    self.log.warning("stage did not stop cleanly", error=str(exc))
        if self._hub is not None:
            self._hub.close()
        self._stop_curve()
        with self._submit_lock:
            for s in self._submit_sockets:
                s.close(linger=0)
            self._submit_sockets.clear()
        if self._own_context:
            self.context.term()
        self._cleanup_dirs()
        self.log.info("pipeline stopped", drained=drained)

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_curve(self) -> None:
        p = self.settings.pipeline
        if p.curve_secret_key is None:
            return
        self.curve = CurveServer(p.curve_secret_key, authorized=p.curve_authorized_keys)
        self.curve.start(self.context)

    def _stop_curve(self) -> None:
        if self.curve is not None:
            self.curve.stop()

    def subscriber_curve(self) -> CurveClient | None:
        """CURVE keys for a subscriber in this process (the dashboard); None without CURVE."""
        return None if self.curve is None else self.curve.client()

    def _cleanup_dirs(self) -> None:
        if self._own_ipc_dir and self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ in-process consumers

    def add_consumer(self, consumer: Consumer) -> None:
        """Hand ``consumer`` every message the hub publishes, and the internal results.

        Call before :meth:`start`. Besides each published message, the consumer
        gets each corrected volume (``pipeline.corrected``: array ``data``,
        affine ``vox2ras``) and each volume not analysed (``pipeline.skipped``)
        once, in the order the hub sees them. It is called on the hub thread:
        it must only hand the message over (to a queue) and return, and must
        not change it. An exception in it is logged and does not stop the hub.
        """
        if self.started:
            raise StreamError("add consumers before the pipeline starts")
        self._consumers.append(consumer)

    # ------------------------------------------------------------------ the receiver side

    def submit(self, event: Submitted) -> None:
        """Hand one receiver event over; returns at once (never waits on analysis).

        Meant for the receiver's ingest thread; any one thread at a time may call
        it. ``SeriesEnd`` ends a series (its trailing gaps are flushed).
        """
        socket: zmq.Socket[Any] | None = getattr(self._local, "socket", None)
        if socket is None:
            socket = self.context.socket(zmq.PUSH)
            socket.linger = 0
            socket.sndhwm = 0  # unbounded: the receiver must never block here
            socket.connect(self._submit_address)
            self._local.socket = socket
            with self._submit_lock:
                self._submit_sockets.append(socket)
        message = Message(event)
        message.stamp("submitted", time.time())
        self._submitted += 1
        socket.send_multipart(encode(message), copy=False)

    def end_series(self, series: SeriesInfo, *, n_volumes: int | None = None) -> None:
        """No more volumes of ``series`` will come (replays, demos, tests)."""
        self.submit(SeriesEnd(series, ended=time.time(), n_volumes=n_volumes, reason="complete"))

    def drain(self, timeout: float) -> bool:
        """Wait until everything submitted so far has been published; True if it was."""
        hub = self._hub
        if hub is None:
            return True
        deadline = time.monotonic() + timeout
        with hub.idle:
            while not hub.is_idle(self._submitted):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                hub.idle.wait(min(remaining, 0.2))
        return True

    # ------------------------------------------------------------------ health

    def health(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """Per stage: heartbeat, state, last volume, lag; and the hub's counters."""
        stages: list[dict[str, Any]] = []
        with self._runner_lock:
            for runner in self._runners:
                name = runner.config.name
                entry: dict[str, Any] = {"name": name, "restarts": self._restarts.get(name, 0)}
                try:
                    reply = runner.health(timeout=timeout)
                except StreamError as exc:
                    entry.update(alive=runner.is_alive(), heartbeat=None, error=str(exc))
                else:
                    entry.update(reply)
                    entry.update(alive=True, heartbeat=time.time())
                if name in self._dead:
                    entry["alive"] = False
                    entry["error"] = "gave up after too many restarts"
                stages.append(entry)
        hub = self._hub
        return {
            "mode": self.mode,
            "pub": self.pub_endpoint,
            "snapshot": self.snapshot_endpoint,
            "stages": stages,
            "hub": {} if hub is None else dict(hub.stats),
        }

    # ------------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        interval = 0.2
        while not self._stopping.wait(interval):
            with self._runner_lock:
                dead = [
                    (i, r)
                    for i, r in enumerate(self._runners)
                    if not r.is_alive() and r.config.name not in self._dead
                ]
            for i, runner in dead:
                if self._stopping.is_set():
                    return
                self._restart(i, runner)

    def _restart(self, position: int, old: Runner) -> None:
        name = old.config.name
        code = old.exitcode if isinstance(old, StageProcess) else None
        if code == -signal.SIGTERM:
            # Someone stopped it on purpose (a service manager stopping the
            # whole group): not a crash, and the pipeline is about to stop too.
            self._dead.add(name)
            self.log.warning("stage process terminated (SIGTERM); not restarted", stage=name)
            return
        if self._restarts[name] >= self.settings.pipeline.max_restarts:
            self._dead.add(name)
            self.log.error("stage process died too often; giving up on it", stage=name)
            self._commands.put(("warn", (f"stage {name} is down", "stage-dead")))
            return
        self._restarts[name] += 1
        self.log.error("stage process died; restarting", stage=name, exit_code=code)
        with contextlib.suppress(StreamError):
            old.stop(timeout=1.0)
        runner: Runner
        if isinstance(old, StageProcess):
            runner = StageProcess(replace(old.config), context=self.context)
        else:
            runner = StageThread(replace(old.config), context=self.context)
        try:
            runner.start(timeout=60.0)
        except StreamError as exc:
            self.log.error("stage restart failed", stage=name, error=str(exc))
            return
        with self._runner_lock:
            self._runners[position] = runner
        self.log.info("stage restarted", stage=name, restarts=self._restarts[name])
        self._commands.put(("resend", name))

    def stage_pid(self, name: str) -> int | None:
        """The process id of stage ``name`` (process mode), for tools and tests."""
        with self._runner_lock:
            for runner in self._runners:
                if runner.config.name == name and isinstance(runner, StageProcess):
                    return runner.pid
        return None


def _remove_stale_runs(root: Path) -> None:
    """Checkpoint folders of pipelines whose process is gone (their state is useless)."""
    if not root.is_dir():
        return
    for folder in root.glob("run-*"):
        try:
            pid = int(folder.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue


# --------------------------------------------------------------------------- the hub


class _Hub:
    """The thread that owns the pipeline's own sockets; see the module docstring."""

    def __init__(
        self,
        owner: Pipeline,
        *,
        results_address: str,
        direct_address: str | None,
        stateful: tuple[str, ...],
    ):
        self.owner = owner
        self.log = owner.log
        p = owner.settings.pipeline
        self.order = OrderingStage(
            "order", timeout_s=p.order_timeout_s, max_pending=p.order_max_pending
        )
        self.journal = Journal(stateful=stateful)
        self.snapshot = Snapshot()
        self.series: dict[Key, _Series] = {}
        self.outbox: deque[Message] = deque()
        self.idle = threading.Condition()
        self.taken = 0
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
        s = owner.settings
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
            self.submit_pull.bind(owner._submit_address)
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
            if owner.curve is not None:
                owner.curve.apply(xpub)
            self.publisher = Publisher(xpub, name="pipeline", sndhwm=1000)
            xpub.bind(p.pub)
            self.pub_endpoint = _last_endpoint(xpub)
            self.router: zmq.Socket[Any] | None = None
            self.snapshot_endpoint = ""
            if p.snapshot:
                self.router = self._socket(zmq.ROUTER)
                if owner.curve is not None:
                    owner.curve.apply(self.router)
                self.router.bind(p.snapshot)
                self.snapshot_endpoint = _last_endpoint(self.router)
        except zmq.ZMQError as exc:
            self.close()
            raise StreamError(f"pipeline: cannot bind its endpoints: {exc}") from exc
        self.chain: zmq.Socket[Any] | None = None

    def _socket(self, kind: int) -> zmq.Socket[Any]:
        s: zmq.Socket[Any] = self.owner.context.socket(kind)
        s.linger = 0
        self._sockets.append(s)
        return s

    def connect_chain(self, address: str) -> None:
        self.chain = self._socket(zmq.PUSH)
        self.chain.sndhwm = self.owner.settings.pipeline.hwm
        self.chain.connect(address)

    def close(self) -> None:
        for s in self._sockets:
            s.close(linger=0)
        self._sockets.clear()

    def is_idle(self, submitted: int) -> bool:
        return (
            self.taken >= submitted
            and not self.outbox
            and self.journal.unfinished() == 0
            and self.order.orderer.stats()["pending"] == 0
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
                command, arg = self.owner._commands.get_nowait()
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
        state.view.ended = message.payload.ended
        self.journal.ended(key)
        if self.owner._run_dir is not None:
            CheckpointStore.forget(self.owner._run_dir, state.info)
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
        for consumer in self.owner._consumers:
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
