"""The durable spool: every accepted instance is on disk before we say so.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
An instance is written to ``<root>/.incoming/``, fsync'd, then hard-linked
into place (``os.link`` fails if the name exists, so two associations
delivering the same instance at once cannot both win), and the directory is
fsync'd. Only then does the C-STORE handler answer success. A resent instance
(same SOP Instance UID) finds its name taken and is reported as a duplicate:
stored once, processed once.

The write may start before the instance is whole: :meth:`Spool.begin` opens
an :class:`Incoming` file that takes the bytes as the network delivers them
and asks the kernel to start writing each part to disk at once
(``sync_file_range(SYNC_FILE_RANGE_WRITE)`` on Linux, as PostgreSQL does for
its WAL), so that the fsync before the answer waits only for the tail. Such a
file is a ``.part`` like any other until :meth:`Spool.store` has checked it
against the instance and linked it into place; an instance whose early write
failed is written again whole.

A series directory holding a ``.closed`` marker has been finalised; every
other series is re-read by :meth:`Spool.pending` when the service restarts, so
nothing that got a success status is lost to a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import sys
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from boldstream.errors import DicomInputError, ReceiverError

__all__ = ["Incoming", "Spool", "SpoolFullError", "StoredInstance", "check_uid"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CLOSED = ".closed"


class SpoolFullError(ReceiverError):
    """The spool cannot take more data (disk full or below the free-space floor)."""


def check_uid(value: object, name: str) -> str:
    """A DICOM UID usable as a file name: digits and dots, at most 64 characters."""
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text:
        raise DicomInputError(f"{name} is missing")
    if len(text) > 64 or not _UID_RE.match(text):
        raise DicomInputError(f"{name} {text[:80]!r} is not a valid DICOM UID")
    return text


@dataclass(frozen=True, slots=True)
class StoredInstance:
    path: Path
    duplicate: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux only; :mod:`os` does not expose it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def _abandon(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()


class Incoming:
    """One instance's ``.part`` file, written as its bytes arrive (see the module doc).

    :meth:`write` is called from the network thread and never raises: a
    failed write is kept in :attr:`error`, the file is dropped, and
    :meth:`Spool.store` writes the instance whole instead. A file that is
    neither stored nor discarded is closed and removed when the object is
    garbage collected, so an association that ends mid-instance leaves
    nothing behind.
    """

    def __init__(self, folder: Path, prefix: bytes, *, writeback: bool) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.part"
        self.prefix = prefix
        self.size = 0
        self.error: OSError | None = None
        self._writeback = writeback and _sync_file_range is not None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._open = weakref.finalize(self, _abandon, self._fd, self.path)
        self._lock = threading.Lock()
        self.write(prefix)

    def write(self, chunk: bytes | memoryview) -> None:
        """Append ``chunk`` and start its writeback; a failure is kept, not raised."""
        with self._lock:
            if not self._open.alive:
                return
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._fd, view) :]
                if self._writeback:
                    assert _sync_file_range is not None
                    # A hint: the fsync in Spool.store is what makes the file durable.
                    _sync_file_range(self._fd, self.size, len(chunk), _SYNC_FILE_RANGE_WRITE)
                self.size += len(chunk)
            except OSError as exc:
                self.error = exc
                self._open()

    def discard(self) -> None:
        """Close and remove the file (a no-op once stored or discarded)."""
        with self._lock:
            self._open()

    def _take(self, data: bytes) -> int | None:
        """The open descriptor if the file holds exactly ``data``; else discard it."""
        with self._lock:
            if (
                self._open.alive
                and self.size == len(data)
                and data.startswith(self.prefix)
                and self._open.detach() is not None
            ):
                return self._fd
            self._open()
            return None


class Spool:
    """Durable, de-duplicating instance store (thread-safe: no shared state)."""

    def __init__(
        self,
        root: Path,
        *,
        fsync: bool = True,
        min_free_mb: float = 0.0,
        clean_incoming: bool = True,
    ) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self._incoming = self.root / ".incoming"
        try:
            self._incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReceiverError(f"cannot create spool folder {self.root}: {exc}") from exc
        if not clean_incoming:  # a reader beside a live writer (the ingest process)
            return
        for stale in self._incoming.glob("*.part"):  # left by a crash mid-write
            with contextlib.suppress(OSError):
                stale.unlink()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def begin(self, prefix: bytes) -> Incoming:
        """Open a ``.part`` file for an instance still arriving, starting with ``prefix``.

        Raises :class:`OSError` if the file cannot be created (the caller then
        leaves the whole write to :meth:`store`).
        """
        return Incoming(self._incoming, prefix, writeback=self.fsync)

    def store(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        data: bytes,
        *,
        incoming: Incoming | None = None,
    ) -> StoredInstance:
        """Write one encoded instance durably; see the module docstring.

        ``incoming``, when given, is this instance's early write: it is used if
        it holds exactly ``data`` (same length, same prefix: the rest came
        from the same network fragments), and discarded otherwise.

        Raises :class:`SpoolFullError` when the disk is full or below the floor,
        :class:`ReceiverError` on any other I/O failure. Never leaves a
        partial file under a final name.
        """
        final = self.path_for(study_uid, series_uid, sop_uid)
        fd = None if incoming is None else incoming._take(data)
        if fd is None:
            tmp = self._incoming / f"{sop_uid}.{uuid.uuid4().hex}.part"
        else:
            assert incoming is not None
            tmp = incoming.path
        try:
            if final.exists():
                return StoredInstance(final, duplicate=True)
            if self.min_free_bytes:
                st = os.statvfs(self._incoming)
                if st.f_bavail * st.f_frsize - len(data) < self.min_free_bytes:
                    raise SpoolFullError(f"spool {self.root} is below its free-space floor")
            return self._finish(fd, tmp, final, data)
        finally:
            if fd is not None:  # the early write's file: closed here, unlinked in any case
                with contextlib.suppress(OSError):
                    os.close(fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _finish(self, fd: int | None, tmp: Path, final: Path, data: bytes) -> StoredInstance:
        """fsync ``fd`` (or write ``data`` to ``tmp`` first), link into place."""
        try:
            if fd is None:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    if self.fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
            elif self.fsync:
                os.fsync(fd)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(tmp, final)
                duplicate = False
            except FileExistsError:
                duplicate = True
            if self.fsync and not duplicate:
                _fsync_dir(final.parent)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool {self.root} is full: {exc.strerror}") from exc
            raise ReceiverError(f"cannot write {final}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return StoredInstance(final, duplicate=duplicate)

    def close_series(self, study_uid: str, series_uid: str) -> None:
        """Mark a series finalised: it is not re-read after a restart."""
        folder = self.root / study_uid / series_uid
        if folder.is_dir():
            (folder / _CLOSED).touch()

    def pending(self) -> Iterator[Path]:
        """Instances of series not yet closed, oldest first (for recovery)."""
        for study in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self._incoming):
            for series in sorted(p for p in study.iterdir() if p.is_dir()):
                if (series / _CLOSED).exists():
                    continue
                files = [(f.stat().st_mtime_ns, f) for f in series.glob("*.dcm")]
                for _, f in sorted(files):
                    yield f
