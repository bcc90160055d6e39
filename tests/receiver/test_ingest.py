"""The ingest thread decodes while the handler writes, and assembles only what is stored.

The Storage SCP hands an instance over before its durable write, with an
unresolved :class:`Durability`, so decoding overlaps the fsync. These tests
drive :class:`Ingest` directly with tokens resolved by hand: nothing becomes
part of a volume before its write succeeded, an instance the scanner was
refused (or a duplicate) is never assembled, its resend is, and a write that
takes long is logged while assembly waits for it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from structlog.testing import capture_logs

from boldstream.config import load_settings
from boldstream.receiver.ingest import Ingest
from boldstream.receiver.scp import Durability, Received
from boldstream.receiver.spool import Spool
from boldstream.receiver.volume import Volume, VolumeIncomplete

pytestmark = pytest.mark.timeout(60)


class Run:
    def __init__(self, tmp_path: Path, assemble: str = "after_write", **ingest: Any) -> None:
        receiver = {"port": 0, "spool_dir": str(tmp_path / "spool"), "assemble": assemble}
        settings = load_settings(overrides=[{"receiver": receiver}], environ={})
        self.events: list[Volume | VolumeIncomplete] = []
        self.cond = threading.Condition()
        self.ingest = Ingest(settings, Spool(settings.receiver.spool_dir), self._emit, **ingest)
        self.ingest.start()

    def _emit(self, event: Volume | VolumeIncomplete) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def submit(self, ds: Any, durable: Durability) -> None:
        self.ingest.submit(
            Received(
                decoded=ds,
                path=Path("/nowhere") / f"{ds.SOPInstanceUID}.dcm",
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                received=time.time(),
                durable=durable,
            )
        )

    def volumes(self) -> list[Volume]:
        with self.cond:
            return [e for e in self.events if isinstance(e, Volume)]


def test_volume_waits_for_the_write_of_its_last_instance(
    tmp_path: Path, builders: ModuleType
) -> None:
    run = Run(tmp_path)
    try:
        volumes, _ = builders.build_series(2, 3, images_in_acquisition=3)
        tokens = [Durability() for _ in range(6)]
        for ds, token in zip([*volumes[0], *volumes[1]], tokens, strict=True):
            run.submit(ds, token)
        for token in tokens[:2]:
            token.resolve(True)
        # The third instance is decoded, but its write has not returned yet.
        time.sleep(0.3)
        assert run.volumes() == []
        assert run.ingest.stats.instances == 2
        tokens[2].resolve(True)
        with run.cond:
            assert run.cond.wait_for(lambda: len(run.events) == 1, timeout=10)
        assert [v.index for v in run.volumes()] == [0]
        for token in tokens[3:]:
            token.resolve(True)
        with run.cond:
            assert run.cond.wait_for(lambda: len(run.events) == 2, timeout=10)
        assert [v.index for v in run.volumes()] == [0, 1]
    finally:
        run.ingest.stop()


def test_refused_instance_is_not_assembled_and_its_resend_is(
    tmp_path: Path, builders: ModuleType
) -> None:
    run = Run(tmp_path)
    try:
        (slices,), _ = builders.build_series(1, 3, images_in_acquisition=3)
        run.submit(slices[0], Durability(stored=True))
        run.submit(slices[1], Durability(stored=False))  # spool full: 0xA700 sent
        run.submit(slices[2], Durability(stored=True))
        assert run.ingest.wait_idle(10)
        assert run.volumes() == []
        assert run.ingest.stats.instances == 2
        run.submit(slices[1], Durability(stored=True))  # the scanner sends it again
        with run.cond:
            assert run.cond.wait_for(lambda: len(run.events) == 1, timeout=10)
        (volume,) = run.volumes()
        assert volume.index == 0 and volume.shape[2] == 3
        assert run.ingest.stats.instances == 3
    finally:
        run.ingest.stop()


def test_duplicate_is_not_counted_twice(tmp_path: Path, builders: ModuleType) -> None:
    run = Run(tmp_path)
    try:
        (slices,), _ = builders.build_series(1, 2, images_in_acquisition=2)
        run.submit(slices[0], Durability(stored=True))
        run.submit(slices[0], Durability(stored=False))  # already in the spool
        run.submit(slices[1], Durability(stored=True))
        with run.cond:
            assert run.cond.wait_for(lambda: len(run.events) == 1, timeout=10)
        assert run.ingest.wait_idle(10)
        assert run.ingest.stats.instances == 2
    finally:
        run.ingest.stop()


def test_slow_write_is_logged_while_assembly_waits(tmp_path: Path, builders: ModuleType) -> None:
    run = Run(tmp_path, slow_write_s=0.1)
    try:
        (slices,), _ = builders.build_series(1, 1, images_in_acquisition=1)
        token = Durability()
        with capture_logs() as logs:
            run.submit(slices[0], token)
            deadline = time.monotonic() + 10
            while not any(e["event"].startswith("spool write still under way") for e in logs):
                assert time.monotonic() < deadline, logs
                time.sleep(0.02)
            assert run.volumes() == []
            token.resolve(True)
            with run.cond:
                assert run.cond.wait_for(lambda: len(run.events) == 1, timeout=10)
        line = next(e for e in logs if e["event"].startswith("spool write still under way"))
        assert line["log_level"] == "warning" and line["waited_s"] >= 0.1
    finally:
        run.ingest.stop()


def test_on_arrival_a_volume_does_not_wait_for_writes_and_a_failed_one_is_logged(
    tmp_path: Path, builders: ModuleType
) -> None:
    run = Run(tmp_path, assemble="on_arrival")
    try:
        (slices,), _ = builders.build_series(1, 3, images_in_acquisition=3)
        tokens = [Durability() for _ in slices]
        with capture_logs() as logs:
            for ds, token in zip(slices, tokens, strict=True):
                run.submit(ds, token)
            with run.cond:  # no write has returned yet
                assert run.cond.wait_for(lambda: len(run.events) == 1, timeout=10)
            assert [v.index for v in run.volumes()] == [0]
            tokens[0].resolve(True)
            tokens[1].resolve(False)  # spool full: the scanner was refused this one
            tokens[2].resolve(True)
            assert run.ingest.wait_idle(10)
        failed = [e for e in logs if "its spool write did not store it" in e["event"]]
        assert len(failed) == 1 and failed[0]["path"].endswith(f"{slices[1].SOPInstanceUID}.dcm")
    finally:
        run.ingest.stop()
