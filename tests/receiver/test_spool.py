"""The durable spool: atomic, de-duplicating, recoverable."""

from __future__ import annotations

import errno
import gc
import os
import threading
from pathlib import Path

import pytest

import boldstream.receiver.spool as spool_module
from boldstream.errors import DicomInputError, ReceiverError
from boldstream.receiver.spool import Spool, SpoolFullError, check_uid

STUDY, SERIES = "1.2.3", "1.2.3.4"


def test_store_writes_final_file_and_no_partials(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    stored = spool.store(STUDY, SERIES, "1.2.3.4.5", b"abc")
    assert not stored.duplicate
    assert stored.path == tmp_path / STUDY / SERIES / "1.2.3.4.5.dcm"
    assert stored.path.read_bytes() == b"abc"
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_resent_instance_is_stored_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.store(STUDY, SERIES, "1.5", b"first")
    again = spool.store(STUDY, SERIES, "1.5", b"second")
    assert again.duplicate and again.path == first.path
    assert first.path.read_bytes() == b"first"


def test_concurrent_duplicates_have_exactly_one_winner(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    results: list[bool] = []
    lock = threading.Lock()

    def store(i: int) -> None:
        r = spool.store(STUDY, SERIES, "9.9", f"copy{i}".encode())
        with lock:
            results.append(r.duplicate)

    threads = [threading.Thread(target=store, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(False) == 1 and len(results) == 16
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_stale_partials_are_removed_on_open(tmp_path: Path) -> None:
    (tmp_path / ".incoming").mkdir(parents=True)
    (tmp_path / ".incoming" / "1.2.abc.part").write_bytes(b"half")
    Spool(tmp_path)
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_pending_skips_closed_series_and_is_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    a = spool.store(STUDY, SERIES, "1.1", b"a").path
    b = spool.store(STUDY, SERIES, "1.2", b"b").path
    os.utime(a, ns=(2_000_000_000, 2_000_000_000))
    os.utime(b, ns=(1_000_000_000, 1_000_000_000))
    spool.store(STUDY, "1.2.3.5", "1.3", b"c")
    spool.close_series(STUDY, "1.2.3.5")
    assert list(spool.pending()) == [b, a]


def test_disk_full_raises_spool_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SpoolFullError, match="full"):
        spool.store(STUDY, SERIES, "1.7", b"x")
    assert not spool.path_for(STUDY, SERIES, "1.7").exists()
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_free_space_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_mb=1e12)
    with pytest.raises(SpoolFullError):
        spool.store(STUDY, SERIES, "1.8", b"x")


def test_unwritable_spool_is_a_receiver_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ReceiverError, match="cannot create spool"):
        Spool(blocker / "spool")


@pytest.mark.parametrize("bad", ["", None, "1.2.a", "../../etc", "1." * 40])
def test_bad_uids_are_refused(bad: object) -> None:
    with pytest.raises(DicomInputError):
        check_uid(bad, "SeriesInstanceUID")


# ---- the early write: an instance written as it arrives ----------------------

PREFIX = b"\0" * 128 + b"DICM" + b"meta"


def _incoming_files(spool: Spool) -> list[Path]:
    return sorted((spool.root / ".incoming").iterdir())


def test_an_early_write_is_the_stored_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hints: list[tuple[int, int]] = []

    def hint(fd: int, offset: int, length: int, flags: int) -> int:
        hints.append((offset, length))
        return 0

    monkeypatch.setattr(spool_module, "_sync_file_range", hint)
    spool = Spool(tmp_path)
    incoming = spool.begin(PREFIX)
    incoming.write(b"first part, ")
    incoming.write(memoryview(b"xxsecond part").cast("B")[2:])
    (part,) = _incoming_files(spool)
    data = PREFIX + b"first part, second part"
    stored = spool.store(STUDY, SERIES, "1.9", data, incoming=incoming)
    assert stored.path.read_bytes() == data and not stored.duplicate
    assert _incoming_files(spool) == [] and not part.exists()
    # Each part was handed to the kernel's writeback as it came, at its offset.
    assert hints == [(0, len(PREFIX)), (len(PREFIX), 12), (len(PREFIX) + 12, 11)]
    incoming.write(b"late")  # after the store: ignored, nothing reappears
    incoming.discard()
    assert _incoming_files(spool) == [] and stored.path.read_bytes() == data


def test_an_early_write_without_fsync_gives_no_writeback_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hints: list[int] = []
    monkeypatch.setattr(spool_module, "_sync_file_range", lambda *a: hints.append(1) or 0)
    spool = Spool(tmp_path, fsync=False)
    incoming = spool.begin(PREFIX)
    incoming.write(b"body")
    assert spool.store(STUDY, SERIES, "1.9", PREFIX + b"body", incoming=incoming).path.exists()
    assert hints == []


@pytest.mark.parametrize("case", ["shorter", "longer", "other prefix"])
def test_an_early_write_that_differs_is_replaced_by_the_whole_instance(
    tmp_path: Path, case: str
) -> None:
    spool = Spool(tmp_path)
    incoming = spool.begin(PREFIX)
    incoming.write(b"body")
    data = {
        "shorter": PREFIX + b"body and more",
        "longer": PREFIX + b"bod",
        "other prefix": b"\0" * 128 + b"DICM" + b"META" + b"body",
    }[case]
    stored = spool.store(STUDY, SERIES, "1.9", data, incoming=incoming)
    assert stored.path.read_bytes() == data
    assert _incoming_files(spool) == []


def test_a_failed_early_write_is_kept_quiet_and_the_instance_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    incoming = spool.begin(PREFIX)
    real_write = os.write

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    incoming.write(b"body")  # in the network thread: must not raise
    monkeypatch.setattr(os, "write", real_write)
    assert incoming.error is not None and incoming.error.errno == errno.ENOSPC
    assert _incoming_files(spool) == []  # dropped at once
    incoming.write(b"more")  # nothing is written after a failure
    assert _incoming_files(spool) == []
    stored = spool.store(STUDY, SERIES, "1.9", PREFIX + b"body", incoming=incoming)
    assert stored.path.read_bytes() == PREFIX + b"body"


def test_an_early_write_of_a_duplicate_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.store(STUDY, SERIES, "1.5", PREFIX + b"first")
    incoming = spool.begin(PREFIX)
    incoming.write(b"again")
    again = spool.store(STUDY, SERIES, "1.5", PREFIX + b"again", incoming=incoming)
    assert again.duplicate and first.path.read_bytes() == PREFIX + b"first"
    assert _incoming_files(spool) == []


def test_an_early_write_below_the_free_space_floor_is_refused_and_removed(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, min_free_mb=1e12)
    incoming = spool.begin(PREFIX)
    with pytest.raises(SpoolFullError):
        spool.store(STUDY, SERIES, "1.8", PREFIX, incoming=incoming)
    assert _incoming_files(spool) == []
    assert not spool.path_for(STUDY, SERIES, "1.8").exists()


def test_a_failed_fsync_of_an_early_write_is_spool_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    incoming = spool.begin(PREFIX)

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SpoolFullError, match="full"):
        spool.store(STUDY, SERIES, "1.7", PREFIX, incoming=incoming)
    assert _incoming_files(spool) == []
    assert not spool.path_for(STUDY, SERIES, "1.7").exists()


def test_an_abandoned_early_write_is_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    discarded = spool.begin(PREFIX)
    discarded.discard()
    discarded.discard()
    forgotten = spool.begin(PREFIX)
    forgotten.write(b"half an instance")
    assert len(_incoming_files(spool)) == 1
    del forgotten  # an association that ended mid-instance, collected
    gc.collect()
    assert _incoming_files(spool) == []


def test_early_writes_from_a_network_thread_and_a_discard_do_not_race(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    for _ in range(20):
        incoming = spool.begin(PREFIX)
        writer = threading.Thread(
            target=lambda i=incoming: [i.write(b"x" * 512) for _ in range(200)]
        )
        writer.start()
        incoming.discard()
        writer.join()
        assert _incoming_files(spool) == []
    # The descriptor was not reused for another file behind the discard's back.
    other = spool.store(STUDY, SERIES, "2.1", b"other")
    assert other.path.read_bytes() == b"other"
