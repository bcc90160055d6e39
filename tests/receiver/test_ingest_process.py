"""Decode and assembly in their own process (``receiver.ingest = "process"``).

The receiver's default. Every other receiver test that builds a Receiver
without naming the mode runs through the child too (the simulator's
loopback tests check voxel for voxel in all encodings); these tests cover
what only the child has: it is sent an instance only after its durable
write, it is restarted when it dies and assembles from the spool what it
lost, and it does not outlive the receiver.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from peers import require_tool
from structlog.testing import capture_logs

from boldstream.config import load_settings
from boldstream.errors import ReceiverError
from boldstream.receiver.ingest_process import IngestProcess
from boldstream.receiver.scp import Durability, Received
from boldstream.receiver.service import Receiver
from boldstream.receiver.spool import Spool
from boldstream.receiver.volume import Volume, VolumeIncomplete
from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, write_run

pytestmark = pytest.mark.timeout(120)

N_VOLUMES, N_SLICES = 8, 12


class Collected:
    """Volumes by index, however many times each came (a restart repeats them)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.volumes: dict[int, Volume] = {}
        self.deliveries = 0
        self.incomplete: list[VolumeIncomplete] = []

    def __call__(self, event: Volume | VolumeIncomplete) -> None:
        with self.cond:
            if isinstance(event, Volume):
                self.volumes[event.index] = event
                self.deliveries += 1
            else:
                self.incomplete.append(event)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 30.0) -> dict[int, Volume]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.volumes) >= n, timeout), sorted(self.volumes)
            return dict(self.volumes)


def _settings(spool: Path, **receiver: Any) -> Any:
    section = {"port": 0, "spool_dir": str(spool), "ingest": "process", **receiver}
    return load_settings(overrides=[{"receiver": section}], environ={})


@contextlib.contextmanager
def _running(
    tmp_path: Path, *, assemble: str = "on_arrival", **options: Any
) -> Iterator[tuple[IngestProcess, Collected, Spool]]:
    """A started IngestProcess on a spool under ``tmp_path``; stopped afterwards."""
    settings = _settings(tmp_path / "spool", assemble=assemble)
    collected = Collected()
    spool = Spool(settings.receiver.spool_dir)
    ingest = IngestProcess(settings, spool, collected, **options)
    ingest.start()
    try:
        yield ingest, collected, spool
    finally:
        ingest.stop()


def _storescu(port: int, files: list[Path]) -> None:
    done = subprocess.run(
        [require_tool("storescu"), "-aet", "SCANNER", "-aec", "BOLDSTREAM", "127.0.0.1",
         str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    run = make_phantom_run(n_volumes=N_VOLUMES, tr_s=1.0, shape=(20, 18, N_SLICES), voxel_mm=6.0)
    out = tmp_path_factory.mktemp("dicom")
    return write_run(run, out, SendOptions(encoding="slice"), truth=False)


def test_killed_ingest_process_is_restarted_and_every_volume_comes(
    tmp_path: Path, files: list[Path]
) -> None:
    collected = Collected()
    receiver = Receiver(_settings(tmp_path / "spool"), collected)
    receiver.start()
    try:
        ingest = receiver.ingest
        assert isinstance(ingest, IngestProcess)
        half = len(files) // 2
        _storescu(receiver.port, files[:half])
        collected.wait(half // N_SLICES)
        first = ingest.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # The rest arrives while the child is dead or starting again: every
        # instance is acknowledged (it is in the spool), and the new child
        # assembles them from there or from its socket.
        _storescu(receiver.port, files[half:])
        volumes = collected.wait(N_VOLUMES)
        assert sorted(volumes) == list(range(N_VOLUMES))
        assert all(v.data.shape == (20, 18, N_SLICES) for v in volumes.values())
        assert ingest.restarts == 1
        assert ingest.pid not in (None, first)
        assert receiver.scp.stats.snapshot()["accepted"] == len(files)
        assert collected.incomplete == []
    finally:
        receiver.stop()


def test_instance_refused_by_the_spool_never_reaches_the_child(
    tmp_path: Path, files: list[Path]
) -> None:
    with _running(tmp_path, assemble="after_write") as (ingest, collected, spool):
        for k, path in enumerate(files[:N_SLICES]):
            item, _ = _received(path, Durability(), spool)
            ingest.submit(item)
            # The last slice "failed to write": volume 0 must not be assembled.
            item.durable.resolve(k < N_SLICES - 1)
        assert ingest.wait_idle(20)
        assert ingest.stats.instances == N_SLICES - 1
        assert collected.volumes == {}


def test_when_resolved_runs_once_in_the_resolving_thread() -> None:
    seen: list[tuple[bool, str]] = []
    token = Durability()
    assert token.when_resolved(lambda ok: seen.append((ok, threading.current_thread().name)))
    worker = threading.Thread(target=token.resolve, args=(True,), name="handler")
    worker.start()
    worker.join()
    token.resolve(True)
    assert seen == [(True, "handler")]
    assert not Durability(stored=False).when_resolved(lambda ok: seen.append((ok, "late")))
    assert len(seen) == 1


def _received(path: Path, durable: Durability, spool: Spool) -> tuple[Received, Any]:
    ds = pydicom.dcmread(path)
    item = Received(
        decoded=ds,
        path=spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        received=time.time(),
        durable=durable,
        encoded=path.read_bytes(),
    )
    return item, ds


def _deliver(ingest: IngestProcess, spool: Spool, paths: list[Path]) -> None:
    """What the handler does with each instance: hand it over, write it, resolve it."""
    for path in paths:
        item, ds = _received(path, Durability(), spool)
        ingest.submit(item)
        spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, item.encoded)
        item.durable.resolve(True)


def _kill_and_wait_for_the_restart(ingest: IngestProcess) -> None:
    pid = ingest.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (ingest.restarts == 1 and ingest.wait_idle(0.1)):
        assert time.monotonic() < deadline, "the ingest process was not restarted"


def test_instance_whose_write_ends_after_a_child_restart_is_still_assembled(
    tmp_path: Path, files: list[Path]
) -> None:
    """Sent before its write to a child that then dies: the verdict goes to no one,
    and the new child may have scanned the spool before the write ended. The
    whole instance must then go to the new child. (With "on_arrival" the first
    child may assemble it before it dies, which is also right; the verdict's
    path is what this test is about.)"""
    with _running(tmp_path, assemble="after_write") as (ingest, collected, spool):
        _deliver(ingest, spool, files[: N_SLICES - 1])
        last, ds = _received(files[N_SLICES - 1], Durability(), spool)
        ingest.submit(last)  # its write is "still under way"
        _kill_and_wait_for_the_restart(ingest)
        assert collected.volumes == {}  # the new child recovered 11 of 12 slices
        spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, last.encoded)
        last.durable.resolve(True)
        volumes = collected.wait(1)
        assert sorted(volumes) == [0]
        assert volumes[0].data.shape == (20, 18, N_SLICES)


def test_decoding_starts_before_the_write_has_ended(tmp_path: Path, files: list[Path]) -> None:
    """The child is sent an instance before its verdict and holds it until then
    (``receiver.assemble = "after_write"``)."""
    with _running(tmp_path, assemble="after_write") as (ingest, collected, spool):
        tokens = []
        for path in files[:N_SLICES]:
            item, _ = _received(path, Durability(), spool)
            ingest.submit(item)
            tokens.append(item.durable)
        # Every slice reached the child (counted as consumed) but none is assembled.
        deadline = time.monotonic() + 20
        while ingest._consumed < N_SLICES:
            assert time.monotonic() < deadline, ingest._consumed
            time.sleep(0.01)
        assert not ingest.wait_idle(0.3)  # the child waits for the verdicts
        assert collected.volumes == {}
        for token in tokens:
            token.resolve(True)
        assert sorted(collected.wait(1)) == [0]


def test_ingest_process_that_cannot_start_fails_the_start_at_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "spool")
    # A spool the child cannot open (a file where its folder should be).
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    broken = settings.model_copy(
        update={"receiver": settings.receiver.model_copy(update={"spool_dir": blocker})}
    )
    ingest = IngestProcess(broken, Spool(tmp_path / "spool"), Collected())
    started = time.monotonic()
    with pytest.raises(ReceiverError, match="exited while starting"):
        ingest.start()
    assert time.monotonic() - started < 30
    assert ingest.restarts == 0
    ingest.stop()


def test_ingest_process_that_keeps_dying_is_reported_down(tmp_path: Path) -> None:
    reports: list[str] = []
    with _running(tmp_path, max_restarts=1, on_down=reports.append) as (ingest, _, _):
        for _ in range(2):  # the first death is restarted, the second is the last
            pid = ingest.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while ingest.pid == pid and not reports:
                assert time.monotonic() < deadline, "the death was not noticed"
                time.sleep(0.02)
            assert ingest.wait_idle(30) or reports
        deadline = time.monotonic() + 10
        while not reports:
            assert time.monotonic() < deadline, "never reported down"
            time.sleep(0.02)
        assert ingest.restarts == 1
        assert len(reports) == 1 and "not analysed" in reports[0], reports


@contextlib.contextmanager
def _child_here(tmp_path: Path, **receiver: Any) -> Iterator[tuple[Any, Any, Any]]:
    """The child's loop in this process: (child, socket to it, socket from it);
    ``receiver``: settings of its own."""
    import zmq

    from boldstream.receiver.ingest_child import _Child

    ctx = zmq.Context()
    to_child, from_child = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    sent = to_child.bind_to_random_port("tcp://127.0.0.1")
    back = from_child.bind_to_random_port("tcp://127.0.0.1")
    from_child.setsockopt(zmq.RCVTIMEO, 5000)
    settings = _settings(tmp_path / "spool", **receiver)
    child = _Child(settings, f"tcp://127.0.0.1:{sent}", f"tcp://127.0.0.1:{back}", 0)
    try:
        yield child, to_child, from_child
    finally:
        child.close()
        to_child.close(0)
        from_child.close(0)
        ctx.term()


def _instance_frames(path: Path, token: int, spool: Spool) -> list[bytes]:
    """The message the receiver sends for ``path`` before its durable write."""
    item, _ = _received(path, Durability(), spool)
    frames: list[bytes] = IngestProcess._frames(item, token, pending=True)
    return frames


def test_child_parks_each_instance_until_its_verdict_and_logs_a_slow_one(
    tmp_path: Path, files: list[Path]
) -> None:
    """One thread: an instance is decoded when it arrives and assembled when its
    verdict does (``receiver.assemble = "after_write"``); a verdict that is late is
    logged, a refused one never assembled."""
    from boldstream.stream import codec

    with _child_here(tmp_path, assemble="after_write") as (child, _, from_child):
        spool = Spool(tmp_path / "spool")
        child.slow_write_s = 0.05
        for token, path in enumerate(files[: 2 * N_SLICES]):
            child.take(_instance_frames(path, token, spool))
        assert child.consumed == 2 * N_SLICES and len(child.pending) == 2 * N_SLICES
        assert not child.idle and child.ingest.stats.instances == 0
        time.sleep(0.1)
        with capture_logs() as logs:
            child.tick()
            child.tick()  # once per instance, not per tick
        slow = [e for e in logs if e["event"].startswith("spool write still under way")]
        assert len(slow) == 2 * N_SLICES and all(e["waited_s"] >= 0.05 for e in slow)
        # Volume 0's slices all written; volume 1's last slice refused.
        for token in range(2 * N_SLICES):
            verdict = b"0" if token == 2 * N_SLICES - 1 else b"1"
            child.take([b"durable", str(token).encode(), verdict])
        assert child.idle
        assert child.ingest.stats.instances == 2 * N_SLICES - 1
        frames = from_child.recv_multipart(copy=False)
        assert bytes(frames[0].buffer) == b"event"
        volume = codec.decode(frames[1:]).payload
        assert isinstance(volume, Volume) and volume.index == 0
        assert child.ingest.stats.volumes == 1


def test_child_assembles_the_spool_before_anything_sent_live(
    tmp_path: Path, files: list[Path]
) -> None:
    """What a new child recovers comes first, even when live instances are waiting."""
    from boldstream.stream import codec

    spool = Spool(tmp_path / "spool")
    for path in files[:N_SLICES]:  # volume 0, in the spool from before
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes())
    with _child_here(tmp_path) as (child, to_child, from_child):
        runner = threading.Thread(target=child.run)
        runner.start()
        assert bytes(from_child.recv()) == b"hello"
        for token, path in enumerate(files[N_SLICES : 2 * N_SLICES]):  # volume 1, live
            frames = _instance_frames(path, token, spool)
            to_child.send_multipart(frames)
            to_child.send_multipart([b"durable", str(token).encode(), b"1"])
        to_child.send(b"sync")  # as the parent answers hello, after the early sends
        to_child.send(b"stop")
        runner.join(30)
        assert not runner.is_alive()
        kinds, order = [], []
        while True:
            frames = from_child.recv_multipart()
            kinds.append(frames[0])
            if frames[0] == b"event":
                order.append(codec.decode(frames[1:]).payload.index)
            if frames[0] == b"bye":
                break
        assert kinds.index(b"ready") < kinds.index(b"event")
        assert order == [0, 1]
        assert child.ingest.stats.recovered == N_SLICES


def test_instances_go_through_shared_memory_and_a_new_child_gets_a_new_ring(
    tmp_path: Path, files: list[Path]
) -> None:
    """The handler puts an instance's bytes in the ring and sends a notice; a
    restarted child gets a fresh ring and the dead child's is removed."""
    with _running(tmp_path) as (ingest, collected, spool):
        _deliver(ingest, spool, files[:N_SLICES])
        assert sorted(collected.wait(1)) == [0]
        first = ingest._ring
        assert first.read_to.value >= sum(p.stat().st_size for p in files[:N_SLICES])
        shm = Path("/dev/shm") / first.name.lstrip("/")
        _kill_and_wait_for_the_restart(ingest)
        assert ingest._ring is not first and ingest._ring.read_to.value == 0
        if shm.parent.is_dir():
            assert not shm.exists()
        _deliver(ingest, spool, files[N_SLICES : 2 * N_SLICES])
        assert sorted(collected.wait(2)) == [0, 1]
        assert ingest._ring.read_to.value > 0


def test_a_receiver_that_cannot_listen_leaves_nothing_running(tmp_path: Path) -> None:
    """The port is taken: start() fails, and the ingest process and its shared
    memory are gone with it (no orphan, no leaked segment)."""
    import socket

    shm = Path("/dev/shm")
    before = set(shm.iterdir()) if shm.is_dir() else set()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = _settings(tmp_path / "spool")
        settings = settings.model_copy(
            update={
                "receiver": settings.receiver.model_copy(update={"port": taken.getsockname()[1]})
            }
        )
        receiver = Receiver(settings, Collected())
        with pytest.raises(ReceiverError, match="cannot listen"):
            receiver.start()
    ingest = receiver.ingest
    assert isinstance(ingest, IngestProcess)
    assert ingest._process is not None and not ingest._process.is_alive()
    assert ingest._ring is None
    if shm.is_dir():
        assert set(shm.iterdir()) <= before


def test_without_shared_memory_instances_go_through_the_socket(
    tmp_path: Path, files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from boldstream.receiver.ring import Ring

    def no_room(cls: Any, size: int = 0) -> Ring:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Ring, "create", classmethod(no_room))
    with capture_logs() as logs, _running(tmp_path) as (ingest, collected, spool):
        assert ingest._ring is None
        _deliver(ingest, spool, files[:N_SLICES])
        assert sorted(collected.wait(1)) == [0]
    assert any(e["event"].startswith("no shared memory for the ingest process") for e in logs)


def test_child_assembles_on_arrival_with_no_verdict_to_wait_for(
    tmp_path: Path, files: list[Path]
) -> None:
    """``receiver.assemble = "on_arrival"``: the volume comes as its last slice
    arrives, and the child holds nothing waiting for a verdict."""
    from boldstream.stream import codec

    with _child_here(tmp_path, assemble="on_arrival") as (child, _, from_child):
        spool = Spool(tmp_path / "spool")
        for token, path in enumerate(files[:N_SLICES]):
            child.take(_instance_frames(path, token, spool))
        frames = from_child.recv_multipart(copy=False)
        assert bytes(frames[0].buffer) == b"event"
        assert codec.decode(frames[1:]).payload.index == 0
        assert child.idle and not child.pending
        assert child.ingest.stats.instances == N_SLICES


def _kinds_sent_after_writes(ingest: IngestProcess) -> list[bytes]:
    """The kind of every message the receiver sends the child once a write has
    ended (verdicts, whole instances), as it sends them."""
    sent: list[bytes] = []
    send = ingest._send

    def spy(frames: list[Any], item: Received) -> None:
        sent.append(bytes(frames[0]))
        send(frames, item)

    ingest._send = spy  # type: ignore[method-assign]
    return sent


def test_on_arrival_the_verdict_stays_in_the_receiver_and_a_failed_write_is_logged(
    tmp_path: Path, files: list[Path]
) -> None:
    """By default the child has assembled the instance before its write ends:
    the receiver sends it no verdict (one message per instance, not two) and
    logs, in the handler's thread, a write that did not store the instance."""
    with _running(tmp_path) as (ingest, collected, spool):
        sent = _kinds_sent_after_writes(ingest)
        items = []
        with capture_logs() as logs:
            for k, path in enumerate(files[:N_SLICES]):
                item, _ = _received(path, Durability(), spool)
                ingest.submit(item)
                item.durable.resolve(k != 3)
                items.append(item)
        assert sorted(collected.wait(1)) == [0]
        assert ingest.wait_idle(20)
        assert sent == []
        failed = [e for e in logs if "its spool write did not store it" in e["event"]]
        assert [e["path"] for e in failed] == [str(items[3].path)]


def test_after_write_the_child_is_sent_every_verdict(tmp_path: Path, files: list[Path]) -> None:
    with _running(tmp_path, assemble="after_write") as (ingest, collected, spool):
        sent = _kinds_sent_after_writes(ingest)
        _deliver(ingest, spool, files[:N_SLICES])
        assert sorted(collected.wait(1)) == [0]
        assert sent == [b"durable"] * N_SLICES
