"""The durable spool: every accepted instance is on disk before we say so.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
An instance is written to ``<root>/.incoming/``, fsync'd, then hard-linked
into place (``os.link`` fails if the name exists, so two associations
delivering the same instance at once cannot both win), and the directory is
fsync'd. Only then does the C-STORE handler answer success. A resent instance
(same SOP Instance UID) finds its name taken and is reported as a duplicate:
stored once, processed once.

A series directory holding a ``.closed`` marker has been finalised; every
other series is re-read by :meth:`Spool.pending` when the service restarts, so
nothing that got a success status is lost to a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from boldstream.errors import DicomInputError, ReceiverError

__all__ = ["Spool", "SpoolFullError", "StoredInstance", "check_uid"]

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

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredInstance:
        """Write one encoded instance durably; see the module docstring.

        Raises :class:`SpoolFullError` when the disk is full or below the floor,
        :class:`ReceiverError` on any other I/O failure. Never leaves a
        partial file under a final name.
        """
        final = self.path_for(study_uid, series_uid, sop_uid)
        if final.exists():
            return StoredInstance(final, duplicate=True)
        if self.min_free_bytes:
            st = os.statvfs(self._incoming)
            if st.f_bavail * st.f_frsize - len(data) < self.min_free_bytes:
                raise SpoolFullError(f"spool {self.root} is below its free-space floor")
        tmp = self._incoming / f"{sop_uid}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
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
