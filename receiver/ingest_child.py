"""The ingest process' own side: what runs in the child of :mod:`ingest_process`.

It connects to the two sockets its parent bound, says ``hello`` and waits for
``sync`` (from then on the parent's socket is attached to it), queues the
recovery of every series the spool has not closed, and then feeds the
instances and verdicts it is sent to an :class:`~boldstream.receiver.ingest.Ingest`
whose volumes it pushes back. It reports its progress every tick and exits
when told to stop or when its parent is gone. The protocol is described in
:mod:`boldstream.receiver.ingest_process`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import zmq

from boldstream.config.settings import Settings
from boldstream.logs import configure_logging, get_logger
from boldstream.receiver.ingest import Emitted, Ingest
from boldstream.receiver.scp import Durability, Received
from boldstream.receiver.spool import Spool
from boldstream.stream import codec
from boldstream.stream.messages import Message

__all__ = ["HWM", "TICK_S", "child_main"]

#: Queued instances either side holds for a busy peer (like Ingest's queue).
HWM = 20000
#: How often the child reports and the parent checks on it (s).
TICK_S = 0.1


class _Child:
    """The child's side: sockets, an :class:`Ingest`, and its reports."""

    def __init__(self, settings: Settings, instances: str, results: str, generation: int) -> None:
        self.generation = generation
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pull: zmq.Socket[Any] = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, HWM)
        self.pull.connect(instances)
        self.push: zmq.Socket[Any] = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 30000)
        self.push.connect(results)
        self.lock = threading.Lock()
        self.consumed = 0
        self.orphaned = False
        #: Instances sent before their durable write, waiting for its verdict.
        self.pending: dict[int, Durability] = {}
        # The parent's handlers write into .incoming right now: leave it alone.
        spool = Spool(
            settings.receiver.spool_dir, fsync=settings.receiver.fsync, clean_incoming=False
        )
        self.ingest = Ingest(settings, spool, self.emit)
        self.log = get_logger("ingest", pid=os.getpid())

    def emit(self, event: Emitted) -> None:
        frames = codec.encode(Message(payload=event))
        with self.lock:
            self.push.send_multipart([b"event", *frames], copy=False)

    def report(self, kind: bytes) -> None:
        body = {
            "generation": self.generation,
            "stats": asdict(self.ingest.stats),
            "consumed": self.consumed,
            "idle": self.ingest.wait_idle(0.0),
        }
        with self.lock:
            self.push.send_multipart([kind, json.dumps(body).encode()])

    def take(self, frames: list[bytes]) -> None:
        """An instance or a verdict on one."""
        if frames[0] == b"durable":
            token = self.pending.pop(int(frames[1]), None)
            if token is not None:
                token.resolve(frames[2] == b"1")
            return
        header = json.loads(frames[1])
        durable = Durability() if header["pending"] else Durability(stored=True)
        if header["pending"]:
            self.pending[int(header["token"])] = durable
        self.ingest.submit(
            Received(  # parsed on the ingest thread, which reports an unreadable one
                path=Path(header["path"]),
                sop_class_uid=header["sop_class_uid"],
                sop_instance_uid=header["sop_instance_uid"],
                received=float(header["received"]),
                calling_aet=header["calling_aet"],
                durable=durable,
                encoded=frames[2],
            )
        )
        self.consumed += 1

    def run(self) -> None:
        parent = os.getppid()
        with self.lock:
            self.push.send(b"hello")
        early: list[list[bytes]] = []
        while True:  # until the parent's socket is attached to this child
            frames = self.pull.recv_multipart()
            if frames[0] == b"sync":
                break
            if frames[0] == b"stop":
                self.report(b"bye")
                return
            early.append(frames)
        self.ingest.recover()  # counted in its stats
        self.ingest.start()
        for frames in early:
            self.take(frames)
        with self.lock:
            self.push.send(b"ready")
        next_report = time.monotonic() + TICK_S
        while True:
            if self.pull.poll(int(TICK_S * 1000)):
                frames = self.pull.recv_multipart()
                if frames[0] in (b"instance", b"durable"):
                    self.take(frames)
                elif frames[0] == b"stop":
                    break
            if time.monotonic() >= next_report:
                self.report(b"progress")
                next_report = time.monotonic() + TICK_S
                if os.getppid() != parent:
                    # Nothing to drain to: what it holds is in the spool, for the
                    # next service's recovery.
                    self.log.error("receiver process gone; ingest process exits")
                    self.orphaned = True
                    return
        self.ingest.stop()
        self.report(b"bye")

    def close(self) -> None:
        self.pull.close(0)
        self.push.close(0 if self.orphaned else None)
        self.ctx.term()


def child_main(settings_json: str, instances: str, results: str, generation: int) -> None:
    # Ctrl-C reaches the whole process group; the receiver decides when this stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings.model_validate_json(settings_json)
    configure_logging(level=settings.logging.level, json=settings.logging.json_output)
    child = _Child(settings, instances, results, generation)
    try:
        child.run()
    finally:
        child.close()
