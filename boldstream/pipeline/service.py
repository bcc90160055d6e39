"""The pipeline service: receiver events in, results out on one XPUB endpoint.

::

    receiver ingest --submit()--> [hub thread] --PUSH--> motion --PUSH--> qc --PUSH--> connectivity
                                     ^  |  ^                               |               |
                                     |  |  +------------- PULL (direct) ---+               |
                                     |  +--XPUB (pub_endpoint) <---------------------PULL--+
                                     +--ROUTER (snapshot_endpoint)

The hub (:mod:`boldstream.pipeline.hub`) is one thread of the calling
process that owns every socket of the pipeline's own: it takes submitted
events (``submit`` only encodes the event and hands it over an ``inproc://``
socket, so the receiver never waits), runs
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
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import zmq

from boldstream.config.settings import Settings
from boldstream.errors import StreamError
from boldstream.logs import get_logger
from boldstream.pipeline.connectivity_stage import connectivity_options
from boldstream.pipeline.hub import Consumer, Hub
from boldstream.pipeline.series_stage import CHECKPOINT
from boldstream.pipeline.stages import stage_options
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.sinks import topics
from boldstream.stream.codec import encode
from boldstream.stream.curve import CurveClient, CurveServer
from boldstream.stream.messages import (
    Message,
    SeriesEnd,
)
from boldstream.stream.runner import StageProcess, StageThread, start_chain
from boldstream.stream.stage import StageConfig

__all__ = ["Pipeline"]

Mode = Literal["thread", "process"]
Runner = StageThread | StageProcess
Key = tuple[str, str]
Submitted = Volume | VolumeIncomplete | SeriesEnd

_STAGES = ("motion", "qc", "connectivity")
#: What the QC stage sends straight to the hub when the connectivity stage follows it.
_DIRECT_TOPICS = (topics.MOTION, topics.QC, topics.WARNING, CHECKPOINT)
_FACTORIES = {
    "connectivity": "boldstream.pipeline.connectivity_stage:ConnectivityStage",
    "motion": "boldstream.pipeline.stages:MotionStage",
    "qc": "boldstream.pipeline.stages:QCStage",
}


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
        self._hub: Hub | None = None
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
            hub = Hub(
                self.settings,
                self.context,
                self.log,
                submit_address=self._submit_address,
                results_address=results,
                direct_address=direct if split else None,
                stateful=tuple(names) if process else (),
                commands=self._commands,
                consumers=self._consumers,
                run_dir=self._run_dir,
                curve=self.curve,
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

        Meant for the receiver's ingest (its thread, or the thread that takes the
        ingest process' volumes); any one thread at a time may call it.
        ``SeriesEnd`` ends a series (its trailing gaps are flushed).
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

    def warn(self, text: str, code: str) -> None:
        """Publish a ``warning`` for the technician that belongs to no series."""
        self._commands.put(("warn", (text, code)))

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
        # Under the lock: health() may be polling this runner's control socket,
        # which stop() closes.
        with self._runner_lock, contextlib.suppress(StreamError):
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
