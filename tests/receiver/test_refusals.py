"""RefusalReport: a refused instance is told to the technician, throttled."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from boldstream.receiver.refusals import RefusalReport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Timers:
    """One-shot timers that fire when the test says so."""

    def __init__(self) -> None:
        self.started: list[Timer] = []

    def __call__(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(delay_s, callback)
        self.started.append(timer)
        return timer


class Timer:
    def __init__(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.delay_s, self.callback, self.cancelled = delay_s, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        """Run the callback (as a timer that was already running when cancelled would)."""
        self.callback()


def _report(told: list[str], clock: Clock, timers: Timers, **kw: str) -> RefusalReport:
    return RefusalReport(
        told.append,
        assemble=kw.get("assemble", "after_write"),
        interval_s=30.0,
        clock=clock,
        timer=timers,
    )


def test_first_refusal_is_told_at_once_with_what_it_means() -> None:
    told: list[str] = []
    report = _report(told, Clock(), Timers())
    report.refused("spool /data/spool is full: No space left on device")
    assert told == [
        "the spool refused an instance: spool /data/spool is full: No space left on "
        "device. The scanner was told the store failed (0xA700) and may resend; it is "
        "not in the live analysis; resend it from the console once the spool is fixed."
    ]


def test_on_arrival_says_the_instance_is_analysed_but_not_stored() -> None:
    told: list[str] = []
    _report(told, Clock(), Timers(), assemble="on_arrival").refused("full")
    assert "already in the live analysis, but not stored on this computer" in told[0]


def test_a_run_of_refusals_is_told_once_per_interval_with_counts() -> None:
    clock, timers, told = Clock(), Timers(), []
    report = _report(told, clock, timers)
    report.refused("full")
    for _ in range(4):  # a full disk refuses every instance that follows
        clock.now += 5.0
        report.refused("full")
    assert len(told) == 1
    # One timer for the rest of the interval, not one per refusal.
    assert [t.delay_s for t in timers.started] == [30.0 - 5.0]
    clock.now += 12.0  # 32 s after the first sentence, before the timer ran
    report.refused("disk gone")
    assert len(told) == 2
    assert told[1].startswith(
        "the spool refused 5 instances in the last 32 s (6 in all): disk gone."
    )
    assert report.total == 6
    # That sentence told what the timer would have: it is cancelled, and the
    # next refusal within the new interval starts a new one.
    assert timers.started[0].cancelled
    clock.now += 1.0
    report.refused("disk gone")
    assert len(told) == 2
    assert [t.delay_s for t in timers.started] == [25.0, 29.0]
    timers.started[0].fire()  # cancelled too late to stop it: it does nothing
    assert len(told) == 2
    clock.now += 29.0
    timers.started[1].fire()
    assert told[2].startswith("the spool refused 1 instance in the last 30 s (7 in all)")


def test_a_burst_after_a_lone_refusal_is_told_when_the_interval_ends() -> None:
    """No refusal needs to come after the interval for the burst to be told."""
    clock, timers, told = Clock(), Timers(), []
    report = _report(told, clock, timers)
    report.refused("write failed")
    clock.now += 10.0
    for _ in range(40):
        report.refused("full")
    assert len(told) == 1
    (timer,) = timers.started
    assert timer.delay_s == pytest.approx(20.0)
    clock.now += 20.0
    timer.fire()
    assert told[1].startswith("the spool refused 40 instances in the last 30 s (41 in all): full.")


def test_close_cancels_a_pending_sentence() -> None:
    clock, timers, told = Clock(), Timers(), []
    report = _report(told, clock, timers)
    report.refused("full")
    clock.now += 1.0
    report.refused("full")
    report.close()
    assert timers.started[0].cancelled
    report.refused("full")  # after close: counted, no new timer
    assert report.total == 3 and len(timers.started) == 1 and len(told) == 1


def test_a_failing_listener_never_reaches_the_handler() -> None:
    def broken(text: str) -> None:
        raise RuntimeError("pipeline gone")

    report = RefusalReport(broken, assemble="after_write", clock=Clock(), timer=Timers())
    report.refused("full")  # logged, not raised
    assert report.total == 1


def test_no_listener_still_counts() -> None:
    report = RefusalReport(None, assemble="on_arrival")
    report.refused("full")
    report.close()
    assert report.total == 1


def test_the_default_timer_tells_on_its_own() -> None:
    """The real (threading) timer: a second refusal within the interval comes out."""
    import threading

    got = threading.Event()
    told: list[str] = []

    def tell(text: str) -> None:
        told.append(text)
        if len(told) == 2:
            got.set()

    report = RefusalReport(tell, assemble="after_write", interval_s=0.2)
    report.refused("full")
    report.refused("full")
    assert got.wait(5.0), told
    assert told[1].startswith("the spool refused 1 instance in the last 0 s (2 in all)")
    report.close()


def test_unknown_assemble_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="assemble must be one of"):
        RefusalReport(None, assemble="sometimes")
