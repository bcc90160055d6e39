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
Refusals that come within the interval are told when it ends (a timer), even
if no refusal follows, so a burst after a first lone refusal is never hidden.
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
    ``tell`` runs in that thread (or the timer's), outside the lock; an
    exception from it is logged and never changes the status the scanner
    gets. ``timer(delay_s, callback)`` starts a one-shot timer (default: a
    daemon :class:`threading.Timer`); :meth:`close` cancels a pending one.
    """

    def __init__(
        self,
        tell: Callable[[str], None] | None,
        *,
        assemble: str,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[float, Callable[[], None]], Any] | None = None,
    ) -> None:
        if assemble not in _CONSEQUENCE:
            raise ValueError(f"assemble must be one of {sorted(_CONSEQUENCE)}, got {assemble!r}")
        self._tell = tell
        self._consequence = _CONSEQUENCE[assemble]
        self._interval_s = interval_s
        self._clock = clock
        self._timer = timer or _daemon_timer
        self._lock = threading.Lock()
        self._total = 0
        self._since = 0  # refused since the last sentence
        self._reason = ""  # the latest refusal's
        self._last: float | None = None  # when the last sentence was told
        self._pending: Any = None  # the timer that tells what the interval held
        self._armed = 0  # numbers the timers, so a stale one does nothing
        self._closed = False
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
            self._reason = reason
            now = self._clock()
            if self._last is not None and now - self._last < self._interval_s:
                if self._pending is None and not self._closed:
                    self._armed += 1
                    armed = self._armed
                    delay = self._last + self._interval_s - now
                    self._pending = self._timer(delay, lambda: self._due(armed))
                return
            text = self._sentence_locked(now)
            # This sentence tells what a pending timer would have: it starts afresh.
            stale, self._pending = self._pending, None
        if stale is not None:
            stale.cancel()
        self._say(text)

    def close(self) -> None:
        """No more sentences; a pending timer is cancelled (the log has the counts)."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _due(self, armed: int) -> None:
        """The interval after a sentence has ended: tell what it held (unless this
        timer was cancelled, or replaced by a sentence told meanwhile)."""
        with self._lock:
            if armed != self._armed or self._pending is None:
                return
            self._pending = None
            if self._closed or not self._since:
                return
            text = self._sentence_locked(self._clock())
        self._say(text)

    def _say(self, text: str) -> None:
        if self._tell is None:
            return
        try:
            self._tell(text)
        except Exception:
            self._log.exception("could not report a refused instance")

    def _sentence_locked(self, now: float) -> str:
        """The sentence for what was refused since the last; marks it told."""
        if self._last is None:
            what = "the spool refused an instance"
        else:
            window = now - self._last
            what = (
                f"the spool refused {self._since} instance{'s' if self._since != 1 else ''} "
                f"in the last {window:.0f} s ({self._total} in all)"
            )
        reason = self._reason
        self._last, self._since = now, 0
        return (
            f"{what}: {reason}. The scanner was told the store failed (0xA700) and may "
            f"resend; {self._consequence}."
        )


def _daemon_timer(delay_s: float, callback: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(max(0.0, delay_s), callback)
    timer.daemon = True
    timer.start()
    return timer
