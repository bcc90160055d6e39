"""The pipeline's stages run offline, as fast as they go: ``boldstream replay``.

The very same :class:`~boldstream.pipeline.stages.MotionStage`,
:class:`~boldstream.pipeline.stages.QCStage` and
:class:`~boldstream.pipeline.connectivity_stage.ConnectivityStage` (unless
``[connectivity] enabled = false``; its ``target`` results reach the sink,
which writes the target JSON and map) are called directly, one message
after another in this thread, behind the same reorder buffer
(:class:`~boldstream.stream.ordering.Orderer`) the live pipeline uses; no
sockets, no encoding. Volumes come from a 4D NIfTI or a folder of DICOM files
(decoded and assembled by the receiver's own code). With a
:class:`~boldstream.sinks.bids.BidsSink`, every result (and every corrected
volume) goes into it, so a replay writes the very files ``serve`` writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom

from boldstream.config.settings import Settings
from boldstream.errors import BoldstreamError, DicomInputError
from boldstream.pipeline.connectivity_stage import ConnectivityStage, connectivity_options
from boldstream.pipeline.guidance_stage import GuidanceStage, guidance_options
from boldstream.pipeline.series_stage import SKIPPED
from boldstream.pipeline.stages import MotionStage, QCStage, stage_options
from boldstream.receiver.assembly import Assembler
from boldstream.receiver.decode import decode_instance
from boldstream.receiver.selector import SeriesSelector
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.sinks import topics
from boldstream.sinks.bids import BidsSink, SeriesFiles
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, series_key
from boldstream.stream.ordering import Orderer

__all__ = [
    "ReplayError",
    "SeriesReplay",
    "array_volumes",
    "dicom_volumes",
    "nifti_volumes",
    "replay",
    "through",
]

Event = Volume | VolumeIncomplete


class ReplayError(BoldstreamError, ValueError):
    """The run to replay cannot be read; the text says which file and why."""


@dataclass
class SeriesReplay:
    """What one series produced (the files, when a sink was given, say the rest)."""

    info: SeriesInfo
    volumes: int = 0
    #: ``qc`` values per volume index.
    qc: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: Volumes left out of the analysis (dummy scans, failures): index -> reason.
    skipped: dict[int, str] = field(default_factory=dict)
    #: Volumes that never came (gaps in the series).
    gaps: set[int] = field(default_factory=set)
    #: Where the sink wrote this series' files (None without a sink).
    files: SeriesFiles | None = None
    #: Every ``target`` and ``guidance`` result as (topic, values), in the order made.
    timeline: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def target(self) -> dict[str, Any] | None:
        """The last ``target`` values (None: no target, or ``[connectivity]`` off)."""
        targets = self.targets
        return targets[-1] if targets else None

    @property
    def targets(self) -> list[dict[str, Any]]:
        return [v for topic, v in self.timeline if topic == topics.TARGET]

    @property
    def guidance(self) -> list[dict[str, Any]]:
        return [v for topic, v in self.timeline if topic == topics.GUIDANCE]

    def outliers(self) -> list[int]:
        """Volumes the QC called outliers (FD, std_DVARS, untrusted motion)."""
        return sorted(i for i, v in self.qc.items() if v.get("outlier"))


def nifti_volumes(path: Path, *, tr_s: float | None = None) -> tuple[SeriesInfo, Iterator[Volume]]:
    """The volumes of a 4D NIfTI (its affine is vox2ras), read one at a time."""
    try:
        # keep_file_open: volumes are read in order through one open (gzip)
        # stream; reopening it per volume would decompress from the start
        # each time (0.9 s per volume late in a 300-volume .nii.gz).
        loaded = nib.load(str(path), keep_file_open=True)
    except Exception as exc:
        raise ReplayError(f"{path}: not a readable NIfTI image ({exc})") from None
    if not isinstance(loaded, nib.Nifti1Image | nib.Nifti2Image):
        raise ReplayError(f"{path}: not a NIfTI image ({type(loaded).__name__})")
    img = loaded
    if len(img.shape) != 4:
        raise ReplayError(f"{path}: expected a 4D image, got shape {tuple(img.shape)}")
    tr = tr_s
    if tr is None:
        header: Any = img.header
        zooms = header.get_zooms()
        tr = float(zooms[3]) if len(zooms) > 3 else 0.0
        if header.get_xyzt_units()[1] == "msec":
            tr /= 1000.0
    if not tr or tr <= 0:
        raise ReplayError(f"{path}: the header states no repetition time; pass --tr")
    proxy = img.dataobj
    frames = (proxy[..., t] for t in range(int(img.shape[3])))
    return array_volumes(path.name, img.affine, float(tr), frames, encoding="nifti")


def array_volumes(
    name: str,
    vox2ras: npt.ArrayLike,
    tr_s: float,
    frames: Iterable[npt.ArrayLike],
    *,
    encoding: str = "array",
) -> tuple[SeriesInfo, Iterator[Volume]]:
    """Volumes of one series from 3-D arrays on one grid (a NIfTI, a simulated run)."""
    series = SeriesInfo(
        series_uid=f"file:{name}",
        study_uid="",
        description=name,
        session_key="replay",
        encoding=encoding,
        tr_s=float(tr_s),
    )
    affine = np.asarray(vox2ras, dtype=np.float64)

    def generate() -> Iterator[Volume]:
        for t, frame in enumerate(frames):
            now = time.time()
            yield Volume(
                data=np.ascontiguousarray(frame, dtype=np.float32),
                vox2ras=affine,
                series=series,
                index=t,
                acquisition_time=t * float(tr_s),
                first_received=now,
                last_received=now,
                assembled=now,
            )

    return series, generate()


def dicom_volumes(folder: Path, settings: Settings) -> Iterator[Event]:
    """Volumes assembled from the DICOM files under ``folder``, read in sorted order.

    Series are chosen as ``serve`` chooses them (the ``[selector]`` settings).
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assembler = Assembler(settings.assembly)
    selector = SeriesSelector(settings.selector)
    chosen: dict[str, bool] = {}
    decoded = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue  # not DICOM (a README, a DICOMDIR index...)
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid not in chosen:
            meta = getattr(ds, "file_meta", None)
            sop_class = str(
                getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "")
            )
            chosen[uid] = selector.decide(ds, sop_class).analyse
        if not chosen[uid]:
            continue  # the same series [selector] leaves out when live
        try:
            fragments = decode_instance(ds, assembly=settings.assembly)
            events = assembler.add(fragments, received=time.time())
        except DicomInputError:
            continue
        decoded += 1
        yield from events
    if decoded == 0:
        raise ReplayError(f"{folder}: no DICOM image that can be assembled into volumes")
    yield from assembler.expire(time.time() + 1e6)


def through(stages: Sequence[Any], message: Message) -> list[Message]:
    """``message`` through each stage in turn, in this thread, as the pipeline chains them."""
    batch = [message]
    for stage in stages:
        batch = [out for item in batch for out in stage.process(item)]
    return batch


def replay(
    events: Iterable[Event], settings: Settings, *, sink: BidsSink | None = None
) -> dict[tuple[str, str], SeriesReplay]:
    """Run ``events`` through the orderer, motion, QC and connectivity; results per series.

    With ``sink``, every message goes into it as ``serve`` feeds it: results,
    gaps, the corrected volumes and each series' end (which finishes its files).
    """
    options = stage_options(settings, checkpoint_dir=None)
    motion = MotionStage(**options["motion"])
    with_connectivity = settings.connectivity.enabled
    qc = QCStage(**options["qc"], forward_corrected=sink is not None or with_connectivity)
    chain: list[Any] = [qc]
    if with_connectivity:
        conn_options = connectivity_options(settings, checkpoint_dir=None)
        chain.append(ConnectivityStage(**conn_options, forward_corrected=sink is not None))
        if settings.guidance.enabled:
            # The same guidance serve's hub publishes, from the qc and target results.
            chain.append(GuidanceStage(**guidance_options(settings)))
    p = settings.pipeline
    orderer = Orderer(timeout_s=p.order_timeout_s, max_pending=p.order_max_pending)
    out: dict[tuple[str, str], SeriesReplay] = {}

    def run(message: Message) -> None:
        series = message.series
        if series is None:
            return
        key = series_key(series)
        entry = out.get(key)
        if entry is None:
            files = None if sink is None else sink.files_for(series)
            entry = out[key] = SeriesReplay(series, files=files)
        if isinstance(message.payload, Volume):
            entry.volumes += 1
        for m in motion.process(message):
            for r in through(chain, m):
                payload = r.payload
                if isinstance(payload, Result) and payload.index is not None:
                    if payload.topic == topics.QC:
                        entry.qc[payload.index] = dict(payload.values)
                    elif payload.topic in (topics.TARGET, topics.GUIDANCE):
                        entry.timeline.append((payload.topic, dict(payload.values)))
                    elif payload.topic == SKIPPED:
                        entry.skipped[payload.index] = str(payload.values.get("reason", ""))
                elif isinstance(payload, Gap):
                    entry.gaps.add(payload.index)
                if sink is not None:
                    sink.handle(r)

    last: dict[tuple[str, str], SeriesInfo] = {}
    for event in events:
        last[series_key(event.series)] = event.series
        for message in orderer.push(Message(event), 0.0):
            run(message)
    for info in last.values():
        for message in orderer.push(Message(SeriesEnd(info, ended=time.time())), 0.0):
            run(message)
    return out
