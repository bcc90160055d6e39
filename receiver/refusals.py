"""Telling the technician that the spool is refusing instances.

When the spool cannot store an instance (disk full, folder not writable) the
handler answers the scanner 0xA700 and logs why. The console may show the
failure only in its network queue, out of the technician's sight, so the
receiver also says it where the technician looks: a sentence handed to
``tell`` (``serve`` publishes it as a ``warning`` with code
``spool-refused``, shown on the dashboard and sent to subscribers).

A full disk refuses every instance that follows, so the sentence is not
repeated for each: the first refusal is told at once, later ones at most once
per ``interval_s``, with the count since the last sentence and in all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from boldstream.logs import get_logger

__all__ = ["RefusalReport"]

#: What happened to a refused instance's analysis, by ``receiver.assemble``.
_CONSEQUENCE = {
    "on_arrival": (
        "it is already in the live analysis, but not stored on this computer; "
        "resend it from the console once the spool is fixed"
    ),
    "after_write": (
        "it is not in the live analysis; resend it from the console once the spool is fixed"
    ),
}


class RefusalReport:
    """Counts refused instances and tells ``tell`` about them, throttled.

    Thread-safe: every association's handler thread calls :meth:`refused`.
    ``tell`` runs in that thread, outside the lock; an exception from it is
    logged and never changes the status the scanner gets.
    """

    def __init__(
        self,
        tell: Callable[[str], None] | None,
        *,
        assemble: str,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if assemble not in _CONSEQUENCE:
            raise ValueError(f"assemble must be one of {sorted(_CONSEQUENCE)}, got {assemble!r}")
        self._tell = tell
        self._consequence = _CONSEQUENCE[assemble]
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._total = 0
        self._since = 0  # refused since the last sentence
        self._last: float | None = None  # when the last sentence was told
        self._log: Any = get_logger("scp")

    @property
    def total(self) -> int:
        with self._lock:
            return self._total

    def refused(self, reason: str) -> None:
        """One instance refused for ``reason`` (the log line has the rest)."""
        with self._lock:
            self._total += 1
            self._since += 1
            now = self._clock()
            if self._last is not None and now - self._last < self._interval_s:
                return
            text = self._sentence(reason, now)
            self._last, self._since = now, 0
        if self._tell is None:
            return
        try:
            self._tell(text)
        except Exception:
            self._log.exception("could not report a refused instance")

    def _sentence(self, reason: str, now: float) -> str:
        if self._total == 1:
            what = "the spool refused an instance"
        else:
            assert self._last is not None
            window = now - self._last
            what = (
                f"the spool refused {self._since} instance{'s' if self._since != 1 else ''} "
                f"in the last {window:.0f} s ({self._total} in all)"
            )
        return (
            f"{what}: {reason}. The scanner was told the store failed (0xA700) and may "
            f"resend; {self._consequence}."
        )
