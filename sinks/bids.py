"""Files written as the scan goes, fMRIPrep / BIDS-derivatives style, crash-safe.

Layout under the output folder (``<prefix>`` is ``sub-<label>_task-<task>``
plus ``_run-<series number>`` when the series has a number)::

    dataset_description.json                       BIDS derivatives, GeneratedBy boldstream
    sub-<label>/func/<prefix>_desc-confounds_timeseries.tsv   + .json (units, descriptions)
    sub-<label>/func/<prefix>_desc-preproc_bold.nii[.gz]      + .json (RepetitionTime...)
    sub-<label>/func/<prefix>_desc-tsnr_boldmap.nii.gz        + .json (at series end)
    sub-<label>/func/<prefix>_desc-connectivity_boldmap.nii.gz + .json (latest target)
    sub-<label>/func/<prefix>_desc-target_coordinates.json    (latest target)
    sub-<label>/func/<prefix>_desc-target_guidance.json       (last guidance, at series end)
    sub-<label>/func/<prefix>_desc-target_brainsight.txt / _localite.xml (exports)

``<label>`` comes from the pseudonymous ``session_key`` (its letters and
digits), or from the ``subject`` option; never from a patient identifier.

Confounds (fMRIPrep names): ``trans_x`` ... ``rot_z`` (mm, rad),
``framewise_displacement``, ``dvars``, ``std_dvars``, ``global_signal``,
``white_matter``, ``csf`` (``n/a`` while the pipeline does not publish them),
then one-hot ``non_steady_state_outlierXX`` (dummy scans) and
``motion_outlierXX`` columns (QC outliers, and volumes that are missing or
could not be analysed: their rows are ``n/a`` and their BOLD volume is zeros,
so that row ``i`` and volume ``i`` stay the ``i``-th TR).

Crash safety: at every moment each file on disk is complete and valid for the
volumes done so far.

- The TSV grows by one appended row per volume, flushed and fsynced. When a
  row needs a new one-hot column (an outlier: rare), the whole table is
  rewritten to a temporary file, fsynced and renamed over the old one.
- JSON sidecars and small NIfTI maps are always written whole, the same way.
- The BOLD series is an uncompressed ``.nii`` whose volumes are written in
  place at their offset (fsynced), after which the header's ``dim[4]`` is
  updated (one 352-byte write, fsynced). At series end it is gzipped to
  ``.nii.gz`` (temporary file + rename) and the ``.nii`` removed; a crash
  during that step leaves the valid ``.nii``.

:class:`BidsSink` takes decoded messages (series start and end, ``motion``,
``qc``, ``target``, gaps, missing volumes and, when the caller has them, the
pipeline's internal corrected-volume results) from a SUB socket
(:meth:`BidsSink.follow`) or by direct calls (:meth:`BidsSink.handle`). The
confounds table is also available as pure functions over rows
(:func:`confounds_row`, :func:`confounds_tsv`) and as a streaming writer
(:class:`ConfoundsWriter`) for code that has the numbers without messages.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nibabel as nib
import numpy as np
import numpy.typing as npt
import zmq

from boldstream import __version__
from boldstream.analysis.motion import PARAM_NAMES
from boldstream.errors import SinkError
from boldstream.logs import get_logger
from boldstream.receiver.volume import SeriesInfo, VolumeIncomplete
from boldstream.sinks import navigation, topics
from boldstream.stream.codec import MessageError
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart, series_key
from boldstream.stream.pubsub import Subscriber

__all__ = [
    "BASE_COLUMNS",
    "BIDS_VERSION",
    "FILE_TOPICS",
    "BidsError",
    "BidsSink",
    "ConfoundsRow",
    "ConfoundsWriter",
    "NiftiSeriesWriter",
    "SeriesFiles",
    "bids_label",
    "confounds_columns",
    "confounds_row",
    "confounds_sidecar",
    "confounds_tsv",
    "dataset_description",
    "write_json_atomic",
    "write_nifti_atomic",
    "write_text_atomic",
]

log = get_logger("sinks.bids")

BIDS_VERSION: Final = "1.9.0"

#: The columns every confounds table has, in order.
BASE_COLUMNS: Final = (
    *PARAM_NAMES,
    "framewise_displacement",
    "dvars",
    "std_dvars",
    "global_signal",
    "white_matter",
    "csf",
)

#: Topics :meth:`BidsSink.follow` subscribes to.
FILE_TOPICS: Final = (
    topics.SERIES_START,
    topics.MOTION,
    topics.QC,
    topics.TARGET,
    topics.GUIDANCE,
    topics.VOLUME_MISSING,
    topics.GAP,
    topics.SERIES_END,
)

#: The pipeline's internal results (``boldstream.pipeline.stages``): a
#: corrected volume (array ``data``, affine ``vox2ras``, values ``flagged``)
#: and a volume that was not analysed (values ``reason``).
CORRECTED_TOPIC: Final = "pipeline.corrected"
SKIPPED_TOPIC: Final = "pipeline.skipped"

_QC_COLUMNS: Final = {
    "framewise_displacement": "fd_mm",
    "dvars": "dvars",
    "std_dvars": "std_dvars",
    "global_signal": "global_signal",
    "white_matter": "white_matter",
    "csf": "csf",
}

_COLUMN_META: Final[dict[str, dict[str, str]]] = {
    "trans_x": {"Description": "Translation along x (RAS+, left to right)", "Units": "mm"},
    "trans_y": {"Description": "Translation along y (RAS+, posterior to anterior)", "Units": "mm"},
    "trans_z": {"Description": "Translation along z (RAS+, inferior to superior)", "Units": "mm"},
    "rot_x": {"Description": "Rotation about x, about the volume centre", "Units": "rad"},
    "rot_y": {"Description": "Rotation about y, about the volume centre", "Units": "rad"},
    "rot_z": {"Description": "Rotation about z, about the volume centre", "Units": "rad"},
    "framewise_displacement": {
        "Description": "Framewise displacement (Power et al. 2012), 50 mm sphere; "
        "n/a for the first volume",
        "Units": "mm",
    },
    "dvars": {
        "Description": "RMS of the volume-to-volume intensity change in the brain mask",
        "Units": "arbitrary",
    },
    "std_dvars": {
        "Description": "DVARS standardised by its expected value under the null "
        "(Nichols 2013); n/a during the warm-up",
        "Units": "arbitrary",
    },
    "global_signal": {"Description": "Mean signal in the brain mask", "Units": "arbitrary"},
    "white_matter": {"Description": "Mean signal in white matter", "Units": "arbitrary"},
    "csf": {"Description": "Mean signal in cerebrospinal fluid", "Units": "arbitrary"},
}


class BidsError(SinkError, ValueError):
    """Bad input to the file writers: a label that is no BIDS label, rows out of order."""


# nibabel's classes are untyped; mypy --strict sees them as Any through these.
_Nifti1Image: Any = nib.Nifti1Image
_Nifti1Header: Any = nib.Nifti1Header

_LABEL_RE = re.compile(r"[^A-Za-z0-9]")


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path, *, durable: bool) -> None:
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _write_bytes_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
    _replace(tmp, path, durable=durable)


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Write UTF-8 ``text`` through a temporary file, fsync and a rename."""
    _write_bytes_atomic(Path(path), text.encode(), durable=durable)


def write_json_atomic(path: Path, value: Any, *, durable: bool = True) -> None:
    """Write ``value`` as indented JSON through a temporary file and a rename."""
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    _write_bytes_atomic(path, text.encode(), durable=durable)


def write_nifti_atomic(
    path: Path,
    data: npt.ArrayLike,
    vox2ras: npt.ArrayLike,
    *,
    durable: bool = True,
) -> None:
    """A 3-D float32 NIfTI-1 with ``vox2ras`` as sform and qform (scanner frame)."""
    image = _nifti(np.asarray(data, dtype=np.float32), np.asarray(vox2ras, dtype=np.float64))
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    nib.save(image, tmp)
    if durable:
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    _replace(tmp, path, durable=durable)


def _nifti(data: npt.NDArray[np.float32], vox2ras: npt.NDArray[np.float64]) -> Any:
    image = _Nifti1Image(data, vox2ras)
    image.header.set_sform(vox2ras, code=1)  # NIFTI_XFORM_SCANNER_ANAT
    image.header.set_qform(vox2ras, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


# --------------------------------------------------------------------------- confounds


@dataclass(frozen=True, slots=True)
class ConfoundsRow:
    """One volume's confounds: :data:`BASE_COLUMNS` values (None = n/a) and flags."""

    index: int
    values: Mapping[str, float | None]
    #: Gets a ``motion_outlierXX`` column: QC outlier, missing or not analysed.
    outlier: bool = False
    #: Gets a ``non_steady_state_outlierXX`` column (dummy scan).
    non_steady_state: bool = False


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def confounds_row(
    index: int,
    *,
    motion: Mapping[str, Any] | None = None,
    qc: Mapping[str, Any] | None = None,
    missing: bool = False,
    non_steady_state: bool = False,
) -> ConfoundsRow:
    """A row from the ``values`` of a volume's ``motion`` and ``qc`` results.

    A volume without QC (missing, not analysed, or its QC never arrived) is an
    outlier: nothing vouches for it. Dummy scans are non-steady-state instead.
    """
    values: dict[str, float | None] = dict.fromkeys(BASE_COLUMNS)
    if motion is not None:
        for name in PARAM_NAMES:
            values[name] = _number(motion.get(name))
    if qc is not None:
        for column, key in _QC_COLUMNS.items():
            values[column] = _number(qc.get(key))
    if non_steady_state:
        return ConfoundsRow(index, values, outlier=False, non_steady_state=True)
    outlier = missing or qc is None or bool(qc.get("outlier"))
    return ConfoundsRow(index, values, outlier=outlier)


def _outlier_names(rows: Iterable[ConfoundsRow]) -> tuple[list[str], list[str]]:
    rows = list(rows)
    nss = [r for r in rows if r.non_steady_state]
    mot = [r for r in rows if r.outlier]
    return (
        [f"non_steady_state_outlier{i:02d}" for i in range(len(nss))],
        [f"motion_outlier{i:02d}" for i in range(len(mot))],
    )


def confounds_columns(rows: Iterable[ConfoundsRow]) -> list[str]:
    """The header of a table of ``rows``: base columns, then the one-hot columns."""
    nss, mot = _outlier_names(rows)
    return [*BASE_COLUMNS, *nss, *mot]


def _format(value: float | None) -> str:
    return "n/a" if value is None else repr(float(value))


def _row_line(row: ConfoundsRow, nss_at: Sequence[int], mot_at: Sequence[int]) -> str:
    cells = [_format(row.values.get(c)) for c in BASE_COLUMNS]
    cells += ["1" if row.index == i else "0" for i in nss_at]
    cells += ["1" if row.index == i else "0" for i in mot_at]
    return "\t".join(cells) + "\n"


def confounds_tsv(rows: Sequence[ConfoundsRow]) -> str:
    """The whole confounds table for ``rows`` (in volume order) as TSV text."""
    nss_at = [r.index for r in rows if r.non_steady_state]
    mot_at = [r.index for r in rows if r.outlier]
    lines = ["\t".join(confounds_columns(rows)) + "\n"]
    lines += [_row_line(r, nss_at, mot_at) for r in rows]
    return "".join(lines)


def confounds_sidecar(rows: Sequence[ConfoundsRow]) -> dict[str, Any]:
    """The JSON sidecar of :func:`confounds_tsv`: per column a description and units."""
    out: dict[str, Any] = {c: dict(_COLUMN_META[c]) for c in BASE_COLUMNS}
    nss_at = [r.index for r in rows if r.non_steady_state]
    mot_at = [r.index for r in rows if r.outlier]
    nss, mot = _outlier_names(rows)
    for name, index in zip(nss, nss_at, strict=True):
        out[name] = {
            "Description": f"Non-steady-state (dummy scan) indicator for volume {index}",
            "Units": "arbitrary",
        }
    for name, index in zip(mot, mot_at, strict=True):
        out[name] = {
            "Description": f"Spike regressor for volume {index}: QC outlier "
            "(FD > 0.5 mm or std_DVARS > 1.5 by default), or missing or not analysed",
            "Units": "arbitrary",
        }
    return out


class ConfoundsWriter:
    """Streams a confounds TSV (and its sidecar) row by row, valid after every row.

    Rows must come in volume order (``index`` 0, 1, 2...). Each plain row is
    appended, flushed and fsynced; a row that adds a one-hot column rewrites
    the table and the sidecar atomically. ``durable=False`` skips the fsyncs
    (tests, replays into a scratch folder).
    """

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.sidecar = self.path.with_name(self.path.name.removesuffix(".tsv") + ".json")
        self.durable = durable
        self.rows: list[ConfoundsRow] = []
        self._fh: Any = None
        self._rewrite()

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def append(self, row: ConfoundsRow) -> None:
        if row.index != len(self.rows):
            raise BidsError(
                f"{self.path.name}: row for volume {row.index} but {len(self.rows)} "
                "rows written (rows must come in volume order)"
            )
        self.rows.append(row)
        if row.outlier or row.non_steady_state:
            self._rewrite()
            return
        nss_at = [r.index for r in self.rows if r.non_steady_state]
        mot_at = [r.index for r in self.rows if r.outlier]
        fh = self._open()
        fh.write(_row_line(row, nss_at, mot_at))
        fh.flush()
        if self.durable:
            os.fsync(fh.fileno())

    def _open(self) -> Any:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
        return self._fh

    def _rewrite(self) -> None:
        self.close()
        _write_bytes_atomic(self.path, confounds_tsv(self.rows).encode(), durable=self.durable)
        write_json_atomic(self.sidecar, confounds_sidecar(self.rows), durable=self.durable)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------- BOLD series


class NiftiSeriesWriter:
    """Appends volumes to an uncompressed 4-D NIfTI-1, valid after every volume.

    The header is fixed by the first volume (shape, ``vox2ras`` as sform and
    qform, scanner frame); each volume is written at its own offset, so they
    may come in any order and volumes never written read as zeros. ``dim[4]``
    counts up to the highest volume written. :meth:`finish` gzips the file.
    """

    _VOX_OFFSET = 352

    def __init__(
        self,
        path: Path,
        *,
        shape: Sequence[int],
        vox2ras: npt.ArrayLike,
        tr_s: float | None,
        durable: bool = True,
    ) -> None:
        if not str(path).endswith(".nii"):
            raise SinkError(f"{path}: the streaming BOLD file must be an uncompressed .nii")
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3:
            raise SinkError(f"{self.path.name}: volumes must be 3-D, got shape {self.shape}")
        self.vox2ras = np.asarray(vox2ras, dtype=np.float64)
        self.tr_s = tr_s
        self.durable = durable
        self.n_volumes = 0
        self._volume_bytes = math.prod(self.shape) * 4
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._write_header()

    def _header(self) -> bytes:
        header = _Nifti1Header()
        header.set_data_dtype(np.float32)
        header.set_data_shape((*self.shape, max(self.n_volumes, 1)))
        header.set_sform(self.vox2ras, code=1)
        header.set_qform(self.vox2ras, code=1)
        header.set_xyzt_units("mm", "sec")
        header.set_dim_info(slice=2)
        zooms = list(header.get_zooms())
        zooms[3] = float(self.tr_s) if self.tr_s else 0.0
        header.set_zooms(zooms)
        header["vox_offset"] = self._VOX_OFFSET
        header["descrip"] = b"boldstream motion-corrected"
        raw: bytes = header.binaryblock
        return raw + b"\x00" * (self._VOX_OFFSET - len(raw))

    def _write_header(self) -> None:
        os.pwrite(self._fd, self._header(), 0)
        if self.durable:
            os.fsync(self._fd)

    def write(self, index: int, volume: npt.ArrayLike) -> None:
        """Write volume ``index`` (3-D, converted to float32) in place."""
        data = np.asarray(volume, dtype="<f4")
        if data.shape != self.shape:
            raise SinkError(
                f"{self.path.name}: volume {index} has shape {data.shape}, the series {self.shape}"
            )
        if index < 0:
            raise SinkError(f"{self.path.name}: negative volume index {index}")
        offset = self._VOX_OFFSET + index * self._volume_bytes
        os.pwrite(self._fd, data.tobytes(order="F"), offset)
        if self.durable:
            os.fsync(self._fd)
        if index + 1 > self.n_volumes:
            self.pad_to(index + 1)

    def pad_to(self, n_volumes: int) -> None:
        """Make the series at least ``n_volumes`` long (zeros where never written)."""
        if n_volumes <= self.n_volumes:
            return
        end = self._VOX_OFFSET + n_volumes * self._volume_bytes
        if os.fstat(self._fd).st_size < end:
            os.ftruncate(self._fd, end)
        self.n_volumes = n_volumes
        self._write_header()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self, gz_path: Path, *, compresslevel: int = 1) -> Path:
        """Close, gzip to ``gz_path`` (temporary file + rename), remove the ``.nii``."""
        self.close()
        tmp = gz_path.with_name(f".{gz_path.name}.tmp")
        with open(self.path, "rb") as src, open(tmp, "wb") as raw:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
            ) as gz:
                shutil.copyfileobj(src, gz, length=1 << 22)
            raw.flush()
            if self.durable:
                os.fsync(raw.fileno())
        _replace(tmp, gz_path, durable=self.durable)
        self.path.unlink()
        return gz_path


# --------------------------------------------------------------------------- the sink


def bids_label(text: str) -> str:
    """A BIDS label from ``text``: its letters and digits (``sess-7f3a`` -> ``sess7f3a``)."""
    label = _LABEL_RE.sub("", text)
    if not label:
        raise BidsError(f"cannot make a BIDS label from {text!r}: no letters or digits")
    return label


def dataset_description() -> dict[str, Any]:
    """``dataset_description.json`` of the derivatives folder."""
    return {
        "Name": "boldstream real-time derivatives",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "boldstream",
                "Version": __version__,
                "Description": "Real-time motion correction, QC and provisional TMS "
                "target (sgACC anticorrelation), written during the scan",
            }
        ],
    }


@dataclass(frozen=True, slots=True)
class SeriesFiles:
    """Where one series' files go."""

    folder: Path
    prefix: str

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.prefix}_{suffix}"

    @property
    def confounds(self) -> Path:
        return self.path("desc-confounds_timeseries.tsv")

    @property
    def bold(self) -> Path:
        """The finished, gzipped BOLD series."""
        return self.path("desc-preproc_bold.nii.gz")

    @property
    def bold_partial(self) -> Path:
        """The BOLD series while the scan goes (uncompressed, valid after each volume)."""
        return self.path("desc-preproc_bold.nii")

    @property
    def bold_sidecar(self) -> Path:
        return self.path("desc-preproc_bold.json")

    @property
    def tsnr(self) -> Path:
        return self.path("desc-tsnr_boldmap.nii.gz")

    @property
    def connectivity(self) -> Path:
        return self.path("desc-connectivity_boldmap.nii.gz")

    @property
    def target(self) -> Path:
        return self.path("desc-target_coordinates.json")

    @property
    def guidance(self) -> Path:
        return self.path("desc-target_guidance.json")

    @property
    def brainsight(self) -> Path:
        return self.path("desc-target_brainsight.txt")

    @property
    def localite(self) -> Path:
        return self.path("desc-target_localite.xml")


@dataclass(eq=False)
class _Series:
    info: SeriesInfo
    files: SeriesFiles
    confounds: ConfoundsWriter
    motion: dict[int, Mapping[str, Any]] = field(default_factory=dict)
    bold: NiftiSeriesWriter | None = None
    tsnr_n: int = 0
    tsnr_mean: npt.NDArray[np.float64] | None = None
    tsnr_m2: npt.NDArray[np.float64] | None = None
    #: The latest ``guidance`` values, written at series end.
    guidance: dict[str, Any] | None = None
    finished: bool = False


class BidsSink:
    """Writes each series' files under ``out_dir`` from the messages it is given.

    ``subject`` is the BIDS subject label: a fixed string, a function of the
    :class:`SeriesInfo`, or None for the letters and digits of its
    ``session_key``. ``corrected_topic`` and ``skipped_topic`` name the
    pipeline's internal results that carry corrected volumes and volumes not
    analysed (they are never published; an in-process caller passes them).
    ``exports`` also writes the Brainsight and Localite target files.
    ``durable=False`` skips fsyncs.

    Not thread-safe: one thread calls :meth:`handle` (or runs :meth:`follow`).
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        subject: str | Callable[[SeriesInfo], str] | None = None,
        task: str = "rest",
        exports: bool = True,
        durable: bool = True,
        corrected_topic: str = CORRECTED_TOPIC,
        skipped_topic: str = SKIPPED_TOPIC,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.subject = subject
        self.task = bids_label(task)
        self.exports = exports
        self.durable = durable
        self.corrected_topic = corrected_topic
        self.skipped_topic = skipped_topic
        self._series: dict[tuple[str, str], _Series] = {}

    # -- naming ----------------------------------------------------------------------

    def files_for(self, series: SeriesInfo) -> SeriesFiles:
        """The folder and file-name prefix of ``series``."""
        if callable(self.subject):
            label = bids_label(self.subject(series))
        elif self.subject is not None:
            label = bids_label(self.subject)
        else:
            label = bids_label(series.session_key)
        prefix = f"sub-{label}_task-{self.task}"
        if series.series_number is not None:
            prefix += f"_run-{series.series_number}"
        return SeriesFiles(self.out_dir / f"sub-{label}" / "func", prefix)

    # -- messages --------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        """Take one message; the files reflect it when this returns."""
        p = message.payload
        series = message.series
        if series is None:
            return
        if isinstance(p, SeriesStart):
            self._state(series)
            return
        state = self._state(series)
        if state.finished:
            log.debug("message after series end ignored", topic=message.topic)
            return
        if isinstance(p, SeriesEnd):
            self._finish(state, p.n_volumes)
        elif isinstance(p, Result) and p.topic == topics.GUIDANCE:
            state.guidance = {"index": p.index, **p.values}
        elif isinstance(p, Gap | VolumeIncomplete):
            self._row(state, p.index, missing=True)
        elif isinstance(p, Result) and p.index is not None:
            self._result(state, p, p.index)
        elif isinstance(p, Result) and p.topic == topics.TARGET:
            self._target(state, p)

    def _result(self, state: _Series, p: Result, index: int) -> None:
        if p.topic == topics.MOTION:
            if index >= state.confounds.n_rows:
                state.motion[index] = p.values
        elif p.topic == topics.QC:
            self._row(state, index, qc=p.values)
        elif p.topic == topics.TARGET:
            self._target(state, p)
        elif p.topic == self.corrected_topic:
            self._volume(state, p, index)
        elif p.topic == self.skipped_topic:
            dummy = "dummy" in str(p.values.get("reason", ""))
            self._row(state, index, missing=not dummy, non_steady_state=dummy)

    def finish(self, series: SeriesInfo, *, n_volumes: int | None = None) -> None:
        """Finalise ``series`` as a SeriesEnd would (idempotent)."""
        state = self._series.get(series_key(series))
        if state is not None and not state.finished:
            self._finish(state, n_volumes)

    def finished(self, series: SeriesInfo) -> bool:
        """Whether ``series`` has been finalised (its end seen or :meth:`finish` called)."""
        state = self._series.get(series_key(series))
        return state is not None and state.finished

    def close(self) -> None:
        """Release open files without finalising: what was written stays valid."""
        for state in self._series.values():
            state.confounds.close()
            if state.bold is not None:
                state.bold.close()

    def follow(
        self,
        endpoint: str,
        stop: threading.Event,
        *,
        context: zmq.Context[Any] | None = None,
        poll_ms: int = 200,
    ) -> None:
        """Subscribe to ``endpoint`` and handle messages until ``stop`` is set."""
        ctx = context if context is not None else zmq.Context.instance()
        sub = Subscriber(ctx, endpoint, topics=FILE_TOPICS, rcvhwm=10_000)
        try:
            while not stop.is_set():
                try:
                    message = sub.recv(timeout_ms=poll_ms)
                except MessageError as exc:
                    log.warning("undecodable message", error=str(exc))
                    continue
                if message is not None:
                    self.handle(message)
        finally:
            sub.close()
            self.close()

    # -- per series ------------------------------------------------------------------

    def _state(self, series: SeriesInfo) -> _Series:
        key = series_key(series)
        state = self._series.get(key)
        if state is not None:
            return state
        files = self.files_for(series)
        files.folder.mkdir(parents=True, exist_ok=True)
        description = self.out_dir / "dataset_description.json"
        if not description.exists():
            write_json_atomic(description, dataset_description(), durable=self.durable)
        state = _Series(
            info=series,
            files=files,
            confounds=ConfoundsWriter(files.confounds, durable=self.durable),
        )
        self._series[key] = state
        log.info("writing series files", folder=str(files.folder), prefix=files.prefix)
        return state

    def _bold_sidecar(self, state: _Series) -> dict[str, Any]:
        info = state.info
        out: dict[str, Any] = {"TaskName": self.task}
        if info.tr_s is not None:
            out["RepetitionTime"] = float(info.tr_s)
        if info.slice_timing is not None:
            out["SliceTiming"] = [float(t) for t in info.slice_timing]
        out.update(
            SkullStripped=False,
            Description="Rigid-body motion-corrected BOLD series, resliced to the "
            "reference volume's grid (scanner RAS+ sform/qform), written in real time. "
            "Missing or unanalysed volumes are zeros and flagged in the confounds.",
            Manufacturer=info.manufacturer or None,
            SeriesNumber=info.series_number,
            SeriesDescription=info.description,
            GeneratedBy=dataset_description()["GeneratedBy"],
        )
        if state.bold is not None:
            out["NumberOfVolumes"] = state.bold.n_volumes
        return {k: v for k, v in out.items() if v is not None}

    def _row(
        self,
        state: _Series,
        index: int,
        *,
        qc: Mapping[str, Any] | None = None,
        missing: bool = False,
        non_steady_state: bool = False,
    ) -> None:
        writer = state.confounds
        if index < writer.n_rows:
            log.debug("row already written", volume=index)
            return
        # Results are published in volume order: rows before this one whose
        # QC never came are written now, as they stand.
        for earlier in range(writer.n_rows, index):
            writer.append(confounds_row(earlier, motion=state.motion.pop(earlier, None)))
        writer.append(
            confounds_row(
                index,
                motion=state.motion.pop(index, None),
                qc=qc,
                missing=missing,
                non_steady_state=non_steady_state,
            )
        )

    def _volume(self, state: _Series, p: Result, index: int) -> None:
        data = p.arrays.get("data")
        vox2ras = p.affines.get("vox2ras")
        if data is None or vox2ras is None or data.ndim != 3:
            log.warning("corrected volume without 3-D data or vox2ras", volume=index)
            return
        if state.bold is None:
            state.bold = NiftiSeriesWriter(
                state.files.bold_partial,
                shape=data.shape,
                vox2ras=vox2ras,
                tr_s=state.info.tr_s,
                durable=self.durable,
            )
            write_json_atomic(
                state.files.bold_sidecar, self._bold_sidecar(state), durable=self.durable
            )
        state.bold.write(index, data)
        if p.values.get("flagged"):
            return
        x = np.asarray(data, dtype=np.float64)
        if state.tsnr_mean is None or state.tsnr_m2 is None:
            state.tsnr_mean = np.zeros_like(x)
            state.tsnr_m2 = np.zeros_like(x)
        state.tsnr_n += 1
        delta = x - state.tsnr_mean
        state.tsnr_mean += delta / state.tsnr_n
        state.tsnr_m2 += delta * (x - state.tsnr_mean)

    def _target(self, state: _Series, p: Result) -> None:
        try:
            target = navigation.Target.from_result(p)
        except SinkError as exc:
            log.warning("target not written", error=str(exc))
            return
        files = state.files
        write_json_atomic(files.target, target.as_dict(), durable=self.durable)
        corr = p.arrays.get(topics.TARGET_ARRAY_MAP)
        if corr is not None and corr.ndim == 3 and target.vox2ras is not None:
            write_nifti_atomic(
                files.connectivity,
                np.nan_to_num(corr, nan=0.0),
                target.vox2ras,
                durable=self.durable,
            )
            write_json_atomic(
                files.connectivity.with_name(
                    files.connectivity.name.removesuffix(".nii.gz") + ".json"
                ),
                {
                    "Description": "Pearson correlation of each voxel's BOLD signal with "
                    "the sgACC seed (negative = anticorrelated); 0 outside the brain",
                    "Units": "arbitrary",
                    "Status": target.status,
                    "GoodMinutes": target.values.get("good_minutes"),
                },
                durable=self.durable,
            )
        if self.exports:
            write_text_atomic(
                files.brainsight, navigation.brainsight_text([target]), durable=self.durable
            )
            write_text_atomic(
                files.localite, navigation.localite_xml([target]), durable=self.durable
            )

    def _finish(self, state: _Series, n_volumes: int | None) -> None:
        writer = state.confounds
        n = max(writer.n_rows, n_volumes or 0)
        if state.bold is not None:
            n = max(n, state.bold.n_volumes)
        for index in range(writer.n_rows, n):
            motion = state.motion.pop(index, None)
            writer.append(confounds_row(index, motion=motion, missing=motion is None))
        writer.close()
        files = state.files
        if state.bold is not None:
            state.bold.pad_to(n)
            state.bold.finish(files.bold)
            if state.tsnr_mean is not None and state.tsnr_m2 is not None and state.tsnr_n > 1:
                std = np.sqrt(state.tsnr_m2 / (state.tsnr_n - 1))
                tsnr = np.divide(state.tsnr_mean, std, out=np.zeros_like(std), where=std > 0)
                write_nifti_atomic(files.tsnr, tsnr, state.bold.vox2ras, durable=self.durable)
                write_json_atomic(
                    files.path("desc-tsnr_boldmap.json"),
                    {
                        "Description": "Temporal SNR (mean / standard deviation over time) "
                        "of the motion-corrected series, volumes flagged by motion "
                        "correction left out; 0 where the signal is constant",
                        "Units": "arbitrary",
                        "NumberOfVolumes": state.tsnr_n,
                    },
                    durable=self.durable,
                )
            write_json_atomic(files.bold_sidecar, self._bold_sidecar(state), durable=self.durable)
        if state.guidance is not None:
            write_json_atomic(files.guidance, state.guidance, durable=self.durable)
        state.finished = True
        state.motion.clear()
        state.tsnr_mean = state.tsnr_m2 = None
        log.info("series files finished", prefix=files.prefix, volumes=n)
