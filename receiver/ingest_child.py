"""The ingest process' own side: what runs in the child of :mod:`ingest_process`.

It connects to the two sockets its parent bound, says ``hello`` and waits for
``sync`` (from then on the parent's socket is attached to it), lists every
instance of every series the spool has not closed, reports ready, assembles
those first and then the instances and verdicts it is sent, in order, on one
thread (see :class:`_Child`), pushing the volumes back. It reports its
progress every tick and exits when told to stop (after everything sent
before) or when its parent is gone. The protocol is described in
:mod:`boldstream.receiver.ingest_process`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq

from boldstream.config.settings import Settings
from boldstream.errors import ReceiverError
from boldstream.logs import configure_logging, get_logger
from boldstream.receiver.ingest import Begun, Emitted, Ingest
from boldstream.receiver.ring import Ring
from boldstream.receiver.scp import Received
from boldstream.receiver.spool import Spool
from boldstream.stream import codec
from boldstream.stream.messages import Message

__all__ = ["HWM", "TICK_S", "child_main"]

#: Queued instances either side holds for a busy peer (like Ingest's queue).
HWM = 20000
#: How often the child reports and the parent checks on it (s).
TICK_S = 0.1


class _Child:
    """The child's side: sockets, an :class:`Ingest` driven from one thread, reports.

    Everything runs on the child's main thread: an instance is read and
    decoded as soon as it arrives (:meth:`Ingest.begin`, while the parent's
    durable write of it is under way). By default (``receiver.assemble =
    "on_arrival"``) it is completed (:meth:`Ingest.finish`) at once, and no
    verdict follows (the parent logs a write that failed). With
    ``"after_write"`` it is parked under its token and its verdict completes
    it as soon as that arrives; no hand-over to a second thread sits between
    the verdict and the volume.
    """

    def __init__(
        self,
        settings: Settings,
        instances: str,
        results: str,
        generation: int,
        ring: Ring | None = None,
    ) -> None:
        self.generation = generation
        #: Where the receiver puts instance bytes (None: all come inline).
        self.ring = ring
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pull: zmq.Socket[Any] = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, HWM)
        self.pull.connect(instances)
        self.push: zmq.Socket[Any] = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 30000)
        self.push.connect(results)
        self.consumed = 0
        self.orphaned = False
        #: Instances sent before their durable write, begun, waiting for its verdict.
        self.pending: dict[int, _Parked] = {}
        #: Spooled files to assemble before anything sent live (oldest first).
        self.backlog: deque[Path] = deque()
        self.early: deque[list[bytes]] = deque()
        # The parent's handlers write into .incoming right now: leave it alone.
        spool = Spool(
            settings.receiver.spool_dir, fsync=settings.receiver.fsync, clean_incoming=False
        )
        self.ingest = Ingest(settings, spool, self.emit)
        #: After this long without its verdict, a parked instance is logged (s),
        #: as the ingest thread logs a write it waits for.
        self.slow_write_s = self.ingest.slow_write_s
        self.log = get_logger("ingest", pid=os.getpid())

    def emit(self, event: Emitted) -> None:
        frames = codec.encode(Message(payload=event))
        self.push.send_multipart([b"event", *frames], copy=False)

    @property
    def idle(self) -> bool:
        """Everything received so far is assembled (or reported)."""
        return not (self.backlog or self.early or self.pending)

    def report(self, kind: bytes) -> None:
        body = {
            "generation": self.generation,
            "stats": asdict(self.ingest.stats),
            "consumed": self.consumed,
            "idle": self.idle,
        }
        self.push.send_multipart([kind, json.dumps(body).encode()])

    def take(self, frames: list[bytes]) -> None:
        """An instance or a verdict on one."""
        if frames[0] == b"durable":  # only with receiver.assemble = "after_write"
            parked = self.pending.pop(int(frames[1]), None)
            if parked is not None:
                self.ingest.finish(parked.begun, frames[2] == b"1")
            return
        header = json.loads(frames[1])
        place = header.get("ring")
        if place is not None:
            if self.ring is None:
                raise ReceiverError("an instance in shared memory, and no ring to read it from")
            encoded = self.ring.get(int(place[0]), int(place[1]))
        else:
            encoded = frames[2]
        self.consumed += 1
        begun = self.ingest.begin(
            Received(  # read in begin(), which keeps an unreadable one for finish() to report
                path=Path(header["path"]),
                sop_class_uid=header["sop_class_uid"],
                sop_instance_uid=header["sop_instance_uid"],
                received=float(header["received"]),
                calling_aet=header["calling_aet"],
                encoded=encoded,
            )
        )
        if header["pending"] and not self.ingest.on_arrival:
            self.pending[int(header["token"])] = _Parked(begun, time.monotonic())
            return
        self.ingest.finish(begun, True)  # on arrival: the parent logs a write that fails

    def recover_one(self, path: Path) -> None:
        item = self.ingest.read_recovered(path)
        if item is not None:
            self.ingest.finish(self.ingest.begin(item), True)

    def step(self) -> bool:
        """Do the next thing: the recovery first, then what was sent, in order.

        False once the parent has said stop (after everything before it).
        """
        try:
            if self.backlog:
                self.recover_one(self.backlog.popleft())
            elif self.early:
                self.take(self.early.popleft())
            elif self.pull.poll(int(TICK_S * 1000)):
                frames = self.pull.recv_multipart()
                if frames[0] == b"stop":
                    return False
                if frames[0] in (b"instance", b"durable"):
                    self.take(frames)
        except zmq.ZMQError:
            raise
        except Exception:
            self.log.exception("ingest step failed; continuing")
        return True

    def tick(self) -> None:
        self.ingest.tick(time.time())
        now = time.monotonic()
        for parked in self.pending.values():
            if not parked.warned and now - parked.since > self.slow_write_s:
                parked.warned = True
                self.log.warning(
                    "spool write still under way; assembly waits for it",
                    path=str(parked.begun.item.path),
                    waited_s=round(now - parked.since, 1),
                )

    def run(self) -> None:
        parent = os.getppid()
        self.push.send(b"hello")
        while True:  # until the parent's socket is attached to this child
            frames = self.pull.recv_multipart()
            if frames[0] == b"sync":
                break
            if frames[0] == b"stop":
                self.report(b"bye")
                return
            self.early.append(frames)
        # Listed now: an instance written after this is sent to this child.
        self.backlog.extend(self.ingest.recovery())
        self.push.send(b"ready")
        next_tick = time.monotonic() + TICK_S
        while self.step():
            if time.monotonic() < next_tick:
                continue
            next_tick = time.monotonic() + TICK_S
            self.tick()
            self.report(b"progress")
            if os.getppid() != parent:
                # Nothing to drain to: what it holds is in the spool, for the
                # next service's recovery.
                self.log.error("receiver process gone; ingest process exits")
                self.orphaned = True
                return
        self.ingest.tick(time.time())
        if self.pending:
            self.log.warning(
                "ingest process stopped with instances whose spool write had no verdict; "
                "they are assembled from the spool at the next start",
                instances=len(self.pending),
            )
        self.report(b"bye")

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.pull.close(0)
        self.push.close(0 if self.orphaned else None)
        self.ctx.term()


@dataclass
class _Parked:
    """An instance begun before its durable write, and since when it waits."""

    begun: Begun
    since: float
    warned: bool = False


def child_main(
    settings_json: str,
    instances: str,
    results: str,
    generation: int,
    ring_name: str | None,
    ring_read_to: Any,
) -> None:
    # Ctrl-C reaches the whole process group; the receiver decides when this stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings.model_validate_json(settings_json)
    configure_logging(level=settings.logging.level, json=settings.logging.json_output)
    # The receiver made the ring for this child: not reaching it is fatal here
    # (start() reports the exit), or every notice would name bytes it cannot read.
    ring = None if ring_name is None else Ring.attach(ring_name, ring_read_to)
    child = _Child(settings, instances, results, generation, ring)
    try:
        child.run()
    finally:
        child.close()
