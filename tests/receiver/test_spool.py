"""The durable spool: atomic, de-duplicating, recoverable."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

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


@pytest.mark.skipif(sys.platform != "linux", reason="nameless files are Linux's O_TMPFILE")
def test_nothing_is_named_before_the_write_is_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    assert spool.nameless
    seen: list[list[str]] = []
    real_fsync = os.fsync

    def looking(fd: int) -> None:  # what a crash at this moment would leave
        seen.append(
            sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
        )
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", looking)
    stored = spool.store(STUDY, SERIES, "1.2.3.4.6", b"pixels")
    assert stored.path.read_bytes() == b"pixels" and not stored.duplicate
    # The new study's and series' names, then the instance's data: no file
    # anywhere (no .part, no final name) until the last, the folder's fsync.
    assert seen == [[], [], [], [f"{STUDY}/{SERIES}/1.2.3.4.6.dcm"]]
    assert spool.store(STUDY, SERIES, "1.2.3.4.6", b"again").duplicate


def test_a_filesystem_without_nameless_files_is_written_through_incoming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    tried: list[int] = []
    real_open = os.open

    def no_tmpfile(path: object, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
            tried.append(flags)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    first = spool.store(STUDY, SERIES, "1.9.1", b"one")
    second = spool.store(STUDY, SERIES, "1.9.2", b"two")
    assert (first.path.read_bytes(), second.path.read_bytes()) == (b"one", b"two")
    assert not spool.nameless
    assert len(tried) <= 1  # asked once (none where the platform has no O_TMPFILE)
    assert spool.store(STUDY, SERIES, "1.9.2", b"again").duplicate
    assert list((tmp_path / ".incoming").iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="nameless files are Linux's O_TMPFILE")
def test_a_link_that_fails_through_proc_falls_back_to_incoming_and_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    real_link = os.link

    def no_proc(src: Any, dst: Any, **kwargs: Any) -> None:
        if str(src).startswith("/proc/"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", no_proc)
    with capture_logs() as logs:
        first = spool.store(STUDY, SERIES, "1.8.1", b"one")
        second = spool.store(STUDY, SERIES, "1.8.2", b"two")
    assert (first.path.read_bytes(), second.path.read_bytes()) == (b"one", b"two")
    assert not spool.nameless
    warned = [e for e in logs if e["event"].startswith("spool: nameless file not usable")]
    assert len(warned) == 1 and "link" in warned[0]["event"]
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_new_folders_are_made_durable_once_per_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(spool_module, "_fsync_dir", synced.append)
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES, "1.1", b"a")
    # The study's name in the root, the series' in the study, the instance's.
    assert synced == [tmp_path, tmp_path / STUDY, tmp_path / STUDY / SERIES]
    synced.clear()
    spool.store(STUDY, SERIES, "1.2", b"b")
    spool.store(STUDY, "1.2.3.9", "1.3", b"c")
    # A new series: both names again (the study's too: another handler may
    # have made the study folder and still be making its name durable).
    assert synced == [
        tmp_path / STUDY / SERIES,
        tmp_path,
        tmp_path / STUDY,
        tmp_path / STUDY / "1.2.3.9",
    ]


def test_a_spool_remembers_a_bounded_number_of_series_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service runs for months: the folders it knows are the latest few; an
    older series' folder is made (and its name made durable) again, and its
    instances are stored as before."""
    synced: list[Path] = []
    monkeypatch.setattr(spool_module, "_fsync_dir", synced.append)
    monkeypatch.setattr(spool_module, "FOLDERS_KEPT", 2)
    spool = Spool(tmp_path)
    for k in range(3):
        spool.store(STUDY, f"1.2.3.{k}", f"1.{k}", b"x")
    assert list(spool._folders) == [tmp_path / STUDY / "1.2.3.1", tmp_path / STUDY / "1.2.3.2"]
    synced.clear()
    again = spool.store(STUDY, "1.2.3.0", "1.9", b"y")
    assert again.path.read_bytes() == b"y" and not again.duplicate
    assert synced == [tmp_path, tmp_path / STUDY, tmp_path / STUDY / "1.2.3.0"]
    assert len(spool._folders) == 2


def test_no_instance_is_stored_in_a_folder_whose_name_is_not_yet_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_root(path: Path) -> None:  # the first handler, making the study's name durable
        if path == tmp_path:
            entered.set()
            assert release.wait(30)

    monkeypatch.setattr(spool_module, "_fsync_dir", slow_root)
    spool = Spool(tmp_path)
    first = threading.Thread(target=spool.store, args=(STUDY, SERIES, "1.1", b"a"))
    first.start()
    assert entered.wait(30)
    done = threading.Event()

    def second() -> None:
        spool.store(STUDY, SERIES, "1.2", b"b")
        done.set()

    other = threading.Thread(target=second)
    other.start()
    # The second handler waits: answering success now would leave its
    # instance in a folder a crash could still lose.
    assert not done.wait(0.3)
    assert not spool.path_for(STUDY, SERIES, "1.2").exists()
    release.set()
    first.join(30)
    other.join(30)
    assert done.is_set() and spool.path_for(STUDY, SERIES, "1.2").read_bytes() == b"b"
