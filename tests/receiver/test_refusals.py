"""RefusalReport: a refused instance is told to the technician, throttled."""

from __future__ import annotations

import pytest

from boldstream.receiver.refusals import RefusalReport


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_refusal_is_told_at_once_with_what_it_means() -> None:
    told: list[str] = []
    report = RefusalReport(told.append, assemble="after_write", clock=Clock())
    report.refused("spool /data/spool is full: No space left on device")
    assert told == [
        "the spool refused an instance: spool /data/spool is full: No space left on "
        "device. The scanner was told the store failed (0xA700) and may resend; it is "
        "not in the live analysis; resend it from the console once the spool is fixed."
    ]


def test_on_arrival_says_the_instance_is_analysed_but_not_stored() -> None:
    told: list[str] = []
    RefusalReport(told.append, assemble="on_arrival", clock=Clock()).refused("full")
    assert "already in the live analysis, but not stored on this computer" in told[0]


def test_a_run_of_refusals_is_told_once_per_interval_with_counts() -> None:
    clock = Clock()
    told: list[str] = []
    report = RefusalReport(told.append, assemble="after_write", interval_s=30.0, clock=clock)
    report.refused("full")
    for _ in range(4):  # a full disk refuses every instance that follows
        clock.now += 5.0
        report.refused("full")
    assert len(told) == 1
    clock.now += 12.0  # 32 s after the first sentence
    report.refused("full")
    assert len(told) == 2
    assert told[1].startswith("the spool refused 5 instances in the last 32 s (6 in all): full.")
    assert report.total == 6
    clock.now += 31.0
    report.refused("full")
    assert told[2].startswith("the spool refused 1 instance in the last 31 s (7 in all)")


def test_a_failing_listener_never_reaches_the_handler() -> None:
    def broken(text: str) -> None:
        raise RuntimeError("pipeline gone")

    report = RefusalReport(broken, assemble="after_write", clock=Clock())
    report.refused("full")  # logged, not raised
    assert report.total == 1


def test_no_listener_still_counts() -> None:
    report = RefusalReport(None, assemble="on_arrival")
    report.refused("full")
    assert report.total == 1


def test_unknown_assemble_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="assemble must be one of"):
        RefusalReport(None, assemble="sometimes")
