"""The ingest in a process of its own (``receiver.ingest = "process"``).

The receiver process keeps the network and the durable write: pynetdicom's
threads, the C-STORE handler and the spool. Decoding and assembly (about a
millisecond of Python per instance, the largest single part of the
receiver's work) run in a child process with an interpreter of their own, so
they no longer compete with the associations for one interpreter lock.

Protocol (ZeroMQ over loopback TCP; both sockets bound by the parent, no
pickle):

- parent PUSH -> child PULL, instances: ``[b"instance", header JSON]`` with
  the instance's bytes in shared memory (:mod:`boldstream.receiver.ring`,
  its place in the header), or ``[b"instance", header JSON, encoded
  instance]`` when they do not fit there, sent by the handler while its
  durable write runs (the child decodes meanwhile). By default
  (``receiver.assemble = "on_arrival"``) the child assembles it at once and
  nothing more is sent about it: a write that did not store it is logged by
  the handler's thread. With ``"after_write"``, ``[b"durable", token, b"1" |
  b"0"]`` follows once the write has ended, and the child assembles the
  instance only after a ``1``, so nothing the scanner was not told is safe
  becomes part of a volume. An instance that could not be sent early, or
  went to a child that has since been replaced, is sent whole after its
  write instead. ``[b"sync"]`` answers a child's ``hello``; ``[b"stop"]``
  follows the last instance.
- child PUSH -> parent PULL: ``[b"hello"]``, ``[b"ready"]`` once it has
  listed the spooled instances it recovers (it assembles them before anything
  sent live), ``[b"event", *codec frames]`` per assembled volume or
  incomplete-volume report, ``[b"progress", JSON]`` every tick and
  ``[b"bye", JSON]`` (the same report) when it stops.

Nothing accepted is lost when the child dies: every instance it was sent is
in the spool, in a series the spool has not closed, and a new child re-reads
all of those before it takes live instances (its ``hello``/``sync`` handshake
makes sure the parent's socket is attached to it first, so an instance is
either sent to the new child or already on disk when it scans). Volumes come
out again after a restart; downstream keys them by (series, index).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import zmq

from boldstream.config.settings import Settings
from boldstream.errors import ReceiverError
from boldstream.logs import get_logger
from boldstream.receiver.ingest import Emitted, IngestStats, warn_not_stored_after_all
from boldstream.receiver.ingest_child import HWM, TICK_S, child_main
from boldstream.receiver.ring import Ring
from boldstream.receiver.scp import Received
from boldstream.receiver.spool import Spool
from boldstream.stream import codec

__all__ = ["IngestProcess"]

#: How long a handler waits for the child to take an instance before handing
#: it to the next child's recovery instead (the child is then restarted).
SEND_TIMEOUT_S = 10.0


class IngestProcess:
    """Decode + assembly in a child process, with :class:`Ingest`'s face.

    ``emit`` is called on this object's receiving thread with every
    :class:`Volume` / :class:`VolumeIncomplete`. A child that dies is
    restarted (it recovers from the spool) up to ``max_restarts`` times;
    after that ``on_down`` gets a sentence for the technician.
    """

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        emit: Callable[[Emitted], None],
        *,
        context: zmq.Context[Any] | None = None,
        max_restarts: int = 10,
        start_timeout_s: float = 60.0,
        on_down: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self._on_arrival = settings.receiver.assemble == "on_arrival"
        self.restarts = 0
        self._emit = emit
        self._on_down = on_down
        self._max_restarts = max_restarts
        self._start_timeout_s = start_timeout_s
        self._ctx = context or zmq.Context.instance()
        self._log = get_logger("ingest")
        self._send_lock = threading.Lock()
        self._life_lock = threading.Lock()  # a restart and stop() do not interleave
        self._sent = 0  # instances handed to the current child
        self._stats = IngestStats()  # the current child's, as last reported
        self._before = IngestStats()  # summed over earlier children
        self._consumed = 0
        self._idle = False
        self._ready = threading.Event()
        self._started = False  # a child has been ready once
        self._stopping = False
        self._rescan = False  # an instance could not be sent: restart to recover it
        self._generation = 0  # bumped with each new child's socket
        self._tokens = 0  # numbers instances so that their verdicts find them
        self._process: Any = None
        self._thread: threading.Thread | None = None
        self._bye = threading.Event()
        self._pull: zmq.Socket[Any] = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        port = self._pull.bind_to_random_port("tcp://127.0.0.1")
        self._results_endpoint = f"tcp://127.0.0.1:{port}"
        self._push: zmq.Socket[Any] = self._new_push()
        self._ring: Ring | None = None  # the current child's, from start()

    # -- Ingest's face ------------------------------------------------------
    @property
    def stats(self) -> IngestStats:
        now, before = self._stats, self._before
        return IngestStats(
            **{f.name: getattr(now, f.name) + getattr(before, f.name) for f in fields(now)}
        )

    def recover(self) -> int:
        """The child recovers the spool itself when it starts; see :meth:`start`."""
        return 0

    def submit(self, item: Received) -> None:
        """Hand ``item`` over while its durable write runs.

        The child starts decoding at once. With ``receiver.assemble =
        "after_write"`` it assembles the instance only when the verdict that
        follows says it is safely in the spool (as the ingest thread does with
        the :class:`Durability` token itself); by default it assembles it on
        arrival and no verdict is sent (see :meth:`_verdict`).
        """
        self._tokens += 1
        token = self._tokens
        sent = self._try_send(item, token)
        if not item.durable.when_resolved(lambda stored: self._verdict(item, token, sent, stored)):
            self._verdict(item, token, sent, item.durable.wait(0) is True)

    def _verdict(self, item: Received, token: int, sent: int | None, stored: bool) -> None:
        """After the write: tell the child, or send the whole instance if it never got it.

        With ``receiver.assemble = "on_arrival"`` the child has no use for the
        verdict (it assembles the instance on arrival): a write that did not
        store an instance handed over early (to this child or to one since
        replaced) is logged here, and nothing is sent.
        """
        if self._on_arrival and sent is not None and not stored:
            warn_not_stored_after_all(self._log, item.path)
        if sent is not None and sent == self._generation:
            if not self._on_arrival:
                self._send([b"durable", str(token).encode(), b"1" if stored else b"0"], item)
        elif stored:
            # Not sent before, or sent to a child that has since been replaced
            # (whose recovery scan may have run before this write ended).
            self._send(self._frames(item, token, pending=False), item)

    def start(self) -> None:
        """Start the child; returns once it has listed what it recovers."""
        self._ring = self._new_ring()
        self._thread = threading.Thread(target=self._run, name="boldstream-ingest-rx", daemon=True)
        self._thread.start()
        self._spawn()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._ready.wait(0.05):
            process = self._process
            if not process.is_alive():
                # Not restarted: a child that cannot start will not start next time.
                self._stopping = True
                raise ReceiverError(
                    f"the ingest process exited while starting (exit code {process.exitcode}); "
                    "see its log lines above"
                )
            if time.monotonic() > deadline:
                self._stopping = True
                raise ReceiverError(
                    f"the ingest process did not start within {self._start_timeout_s:.0f} s"
                )

    def stop(self, *, timeout: float = 30.0) -> None:
        """Let the child finish what it was sent, then stop it."""
        with self._life_lock:  # not in the middle of a restart
            self._stopping = True
            with self._send_lock, contextlib.suppress(zmq.ZMQError):
                self._push.send(b"stop", flags=zmq.NOBLOCK)
            process = self._process
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                self._log.error("ingest process did not stop; terminating it")
                process.terminate()
                process.join(5.0)
        if process is not None and process.exitcode == 0:
            self._bye.wait(2.0)  # sent before it exited; the receiving thread may not have it yet
        if self._thread is not None:
            self._thread.join(5.0)
        self._push.close(0)
        self._pull.close(0)
        with self._send_lock:
            if self._ring is not None:
                self._ring.close()
                self._ring = None  # a late handler sends whole (and finds the socket closed)

    def wait_idle(self, timeout: float) -> bool:
        """True once the child has processed everything sent to it so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.is_set() and self._idle and self._consumed >= self._sent:
                return True
            time.sleep(0.01)
        return False

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    # -- sending (handler threads) -----------------------------------------
    def _new_push(self) -> zmq.Socket[Any]:
        push: zmq.Socket[Any] = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, HWM)
        push.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT_S * 1000))
        port = push.bind_to_random_port("tcp://127.0.0.1")
        self._instances_endpoint = f"tcp://127.0.0.1:{port}"
        return push

    @staticmethod
    def _frames(
        item: Received, token: int, *, pending: bool, ring: tuple[int, int] | None = None
    ) -> list[Any]:
        """The instance message: its bytes inline, or a notice of where they are in the ring."""
        header = {
            "token": token,
            "pending": pending,
            "path": str(item.path),
            "sop_class_uid": item.sop_class_uid,
            "sop_instance_uid": item.sop_instance_uid,
            "received": item.received,
            "calling_aet": item.calling_aet,
        }
        if ring is not None:
            header["ring"] = list(ring)
            return [b"instance", json.dumps(header).encode()]
        return [b"instance", json.dumps(header).encode(), item.encoded]

    def _try_send(self, item: Received, token: int) -> int | None:
        """One attempt to send ``item`` before its write; the generation it went to."""
        with self._send_lock:
            place = None if self._ring is None else self._ring.put(item.encoded)
            try:
                self._push.send_multipart(
                    self._frames(item, token, pending=True, ring=place),
                    flags=zmq.NOBLOCK,
                    copy=False,
                )
            except zmq.ZMQError:
                if place is not None and self._ring is not None:
                    self._ring.take_back()
                return None
            self._sent += 1
            return self._generation

    def _send(self, frames: list[Any], item: Received) -> None:
        """Send after the durable write, waiting up to SEND_TIMEOUT_S for the child."""
        generation = self._generation
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while True:
            with self._send_lock:
                if self._generation != generation:
                    # A new child started after this instance was written: its
                    # recovery scan reads it from the spool.
                    return
                try:
                    self._push.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    pass
                except zmq.ZMQError as exc:  # closed: the receiver is stopping
                    self._log.warning(
                        "instance spooled but not handed to the ingest process; "
                        "it is assembled at the next start",
                        path=str(item.path),
                        error=str(exc),
                    )
                    return
                else:
                    if frames[0] == b"instance":
                        self._sent += 1
                    return
            if time.monotonic() > deadline:
                self._rescan = True
                self._log.error(
                    "ingest process not taking instances; it will be restarted and "
                    "assemble this one from the spool",
                    path=str(item.path),
                    waited_s=SEND_TIMEOUT_S,
                )
                return
            time.sleep(0.001)

    # -- the child's lifecycle (receiving thread) ----------------------------
    def _new_ring(self) -> Ring | None:
        """Shared memory for the next child; None (every instance sent whole) if
        the system has none to give."""
        try:
            return Ring.create()
        except OSError as exc:
            self._log.warning(
                "no shared memory for the ingest process; instances go through its "
                "socket instead (slower)",
                error=str(exc),
            )
            return None

    def _spawn(self) -> None:
        mp: Any = multiprocessing.get_context("spawn")
        ring = self._ring
        self._ready.clear()
        self._idle = False
        process = mp.Process(
            target=child_main,
            args=(
                self.settings.model_dump_json(by_alias=True),
                self._instances_endpoint,
                self._results_endpoint,
                self._generation,
                None if ring is None else ring.name,
                None if ring is None else ring.read_to,
            ),
            name="boldstream-ingest",
            daemon=True,
        )
        process.start()
        self._process = process  # only ever a started process: stop() may join it
        self._log.info("ingest process started", pid=process.pid)

    def _restart(self, why: str) -> None:
        with self._life_lock:
            if not self._stopping:
                self._restart_locked(why)

    def _restart_locked(self, why: str) -> None:
        if self.restarts >= self._max_restarts:
            self._log.critical(
                "ingest process gave up after too many restarts; instances are still "
                "spooled and are assembled when the service restarts",
                restarts=self.restarts,
                reason=why,
            )
            self._stopping = True
            if self._on_down is not None:
                try:
                    self._on_down(
                        f"the receiver's ingest process is down ({why}, "
                        f"{self.restarts} restarts): instances are stored but not "
                        "analysed until boldstream restarts"
                    )
                except Exception:
                    self._log.exception("could not report the ingest process down")
            return
        self.restarts += 1
        self._log.error("ingest process restarting", reason=why, restarts=self.restarts)
        old = self._process
        if old is not None and old.is_alive():
            old.kill()
            old.join(5.0)
        with self._send_lock:
            # A fresh socket: nothing may go to the dead child's queue after the
            # new child has scanned the spool.
            self._push.close(0)
            self._push = self._new_push()
            # A new ring too: the dead child may have left notices unread.
            if self._ring is not None:
                self._ring.close()
            self._ring = self._new_ring()
            self._generation += 1
            self._rescan = False
            self._sent = 0
        self._before = self.stats
        self._stats = IngestStats()
        self._consumed = 0
        self._spawn()

    def _run(self) -> None:
        next_check = time.monotonic() + TICK_S
        while True:
            if self._pull.poll(int(TICK_S * 1000)):
                frames = self._pull.recv_multipart(copy=False)
                try:
                    if self._handle(frames):
                        return
                except Exception:
                    self._log.exception("message from the ingest process not understood")
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + TICK_S
            process = self._process
            if self._stopping:
                if process is None or not process.is_alive():
                    return
            elif process is not None and not process.is_alive():
                if not self._started:
                    continue  # start() reports a child that dies before it is ready
                if process.exitcode == -signal.SIGTERM:
                    # Asked to stop (a service manager stopping everything):
                    # what it was sent is in the spool for the next start.
                    self._log.warning(
                        "ingest process terminated (SIGTERM); not restarted, "
                        "instances are spooled and assembled at the next start"
                    )
                    self._stopping = True
                    continue
                self._restart(f"exit code {process.exitcode}")
            elif self._rescan:
                self._restart("an instance could not be handed over")

    def _handle(self, frames: list[Any]) -> bool:
        """Act on one message from the child; True when the child said goodbye."""
        kind = bytes(frames[0].buffer)
        if kind == b"event":
            message = codec.decode(frames[1:])
            try:
                self._emit(message.payload)  # type: ignore[arg-type]
            except Exception:
                self._log.exception("volume consumer failed")
        elif kind == b"progress" or kind == b"bye":
            report = json.loads(bytes(frames[1].buffer))
            if report["generation"] != self._generation:
                return False  # queued by a child since replaced
            self._stats = IngestStats(**report["stats"])
            self._consumed = int(report["consumed"])
            self._idle = bool(report["idle"])
            if kind == b"bye":
                self._bye.set()
                return True
        elif kind == b"hello":
            with self._send_lock:
                self._push.send(b"sync")
        elif kind == b"ready":
            self._started = True
            self._ready.set()
        return False
