"""The durable spool: atomic, de-duplicating, recoverable."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

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
