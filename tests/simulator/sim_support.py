"""A live boldstream Receiver for the simulated-scanner tests.

Imported as ``simulator.sim_support`` (``tests`` is on pytest's pythonpath).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from boldstream.config import load_settings
from boldstream.receiver.service import Receiver
from boldstream.receiver.volume import Volume, VolumeIncomplete

__all__ = ["WAIT_S", "LiveReceiver"]

#: Bound on every wait for the receiver (never a sleep to let it settle).
WAIT_S = 15.0

Event: TypeAlias = Volume | VolumeIncomplete


class LiveReceiver:
    """A running boldstream Receiver and everything it emitted."""

    def __init__(self, spool: Path, **sections: dict[str, Any]) -> None:
        receiver = {"port": 0, "spool_dir": str(spool), "fsync": False}
        receiver.update(sections.pop("receiver", {}))
        settings = load_settings(overrides=[{"receiver": receiver, **sections}], environ={})
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self.receiver = Receiver(settings, self._emit)
        self.receiver.start()
        self._stopped = False

    def _emit(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def scp_stats(self) -> dict[str, int]:
        return self.receiver.scp.stats.snapshot()

    def wait_for(self, done: Callable[[list[Event]], bool], timeout: float = WAIT_S) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: done(self.events), timeout=timeout)
            assert ok, f"receiver did not get there in {timeout} s: {self.events}"

    def wait_volumes(self, n: int) -> dict[int, Volume]:
        self.wait_for(lambda events: sum(isinstance(e, Volume) for e in events) >= n)
        return self.volumes()

    def volumes(self) -> dict[int, Volume]:
        out: dict[int, Volume] = {}
        with self._cond:
            for e in self.events:
                if isinstance(e, Volume):
                    assert e.index not in out, f"volume {e.index} delivered twice"
                    out[e.index] = e
        return out

    def incomplete(self) -> list[VolumeIncomplete]:
        with self._cond:
            return [e for e in self.events if isinstance(e, VolumeIncomplete)]

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.receiver.stop()
