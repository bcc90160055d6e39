"""boldstream/outputs.py: the pipeline's in-process consumers, the files and the PACS export.

The PACS export is tested here against DCMTK's storescp (started by the test
on a free port) with the target results fed straight to it: no stage
publishes ``target`` yet, so serve-as-a-process cannot trigger it. The source
study comes from an instance in a spool folder laid out as the receiver's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from peers import free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from boldstream.config import load_settings
from boldstream.config.settings import OutputsSettings, PacsSettings
from boldstream.errors import StreamError
from boldstream.outputs import FilesOutput, PacsExport, outputs_dir, source_study
from boldstream.pipeline.series_stage import CORRECTED
from boldstream.pipeline.service import Pipeline
from boldstream.receiver.volume import SeriesInfo, Volume
from boldstream.simulator.phantom import make_phantom_run
from boldstream.sinks import topics
from boldstream.stream.messages import Message, Result, SeriesEnd

pytestmark = pytest.mark.timeout(120)

STUDY_UID = "1.2.826.0.1.3680043.10.543.91"
SERIES_UID = f"{STUDY_UID}.7"
SHAPE = (12, 14, 10)


def series() -> SeriesInfo:
    return SeriesInfo(
        series_uid=SERIES_UID,
        study_uid=STUDY_UID,
        description="rest_bold",
        session_key="sess-91",
        series_number=7,
        tr_s=1.0,
    )


def spool_source(spool: Path) -> Path:
    """One instance of the source series where the receiver's spool keeps it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"{SERIES_UID}.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = f"{SERIES_UID}.1"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0091"
    ds.PatientBirthDate = "19800101"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "91"
    ds.AccessionNumber = "ACC91"
    ds.FrameOfReferenceUID = f"{STUDY_UID}.99"
    path = spool / STUDY_UID / SERIES_UID / f"{SERIES_UID}.1.dcm"
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def target(status: str, index: int) -> Message:
    vox2ras = np.diag([3.0, 3.0, 3.5, 1.0])
    vox2ras[:3, 3] = [-18.0, -21.0, -17.5]
    rng = np.random.default_rng(index)
    corr = rng.uniform(-0.6, 0.6, SHAPE).astype(np.float32)
    ras = (vox2ras @ np.array([5.0, 6.0, 4.0, 1.0]))[:3]
    return Message(
        topics.target_result(
            series(),
            index,
            {"status": status, "ras_mm": ras.tolist(), "mni_mm": [-38.0, 40.0, 30.0]},
            correlation_map=corr,
            vox2ras=vox2ras,
        )
    )


def received(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def pacs_settings(port: int, **extra: object) -> PacsSettings:
    return PacsSettings(host="127.0.0.1", port=port, called_ae="TESTPACS", timeout_s=10.0, **extra)


def test_series_end_sends_the_last_target_once_with_the_spooled_patient(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    port, folder = storescp
    spool = tmp_path / "spool"
    spool_source(spool)
    export = PacsExport(pacs_settings(port), spool)
    export.start()
    for message in (target("provisional", 30), target("settling", 60)):
        export.consumer(message)
    end = Message(SeriesEnd(series(), ended=time.time(), reason="complete"))
    export.consumer(end)
    export.consumer(target("stable", 90))  # after the end: nothing more is sent
    export.consumer(end)
    assert export.stop()

    datasets = received(folder)
    assert len(datasets) == 2 * SHAPE[2]  # the map and the marker, one slice per instance
    descriptions = Counter(str(ds.SeriesDescription) for ds in datasets)
    assert descriptions == {
        "boldstream sgACC connectivity (settling)": SHAPE[2],
        "boldstream TMS target marker (settling)": SHAPE[2],
    }
    for ds in datasets:
        assert ds.StudyInstanceUID == STUDY_UID
        assert ds.PatientID == "PID-0091"
        assert str(ds.PatientName) == "Doe^Jane"
        assert ds.AccessionNumber == "ACC91"
        assert ds.FrameOfReferenceUID == f"{STUDY_UID}.99"
    assert export.sent == {(series().session_key, SERIES_UID): "settling"}


def test_when_stable_sends_the_first_stable_target_at_once(
    tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    port, folder = storescp
    spool = tmp_path / "spool"
    spool_source(spool)
    export = PacsExport(pacs_settings(port, when="stable"), spool)
    export.start()
    export.consumer(target("settling", 60))
    export.consumer(target("stable", 90))
    export.consumer(target("stable", 120))
    export.consumer(Message(SeriesEnd(series(), ended=time.time())))
    assert export.stop()
    descriptions = Counter(str(ds.SeriesDescription) for ds in received(folder))
    assert descriptions == {
        "boldstream sgACC connectivity (stable)": SHAPE[2],
        "boldstream TMS target marker (stable)": SHAPE[2],
    }


def test_an_unreachable_pacs_is_logged_and_the_export_goes_on(tmp_path: Path) -> None:
    export = PacsExport(
        PacsSettings(host="127.0.0.1", port=free_port(), called_ae="NOBODY", timeout_s=2.0),
        tmp_path / "spool",
    )
    export.start()
    export.consumer(target("settling", 60))
    export.consumer(Message(SeriesEnd(series(), ended=time.time())))
    assert export.stop(timeout=30.0)
    assert export.sent == {(series().session_key, SERIES_UID): "failed"}


def test_source_study_reads_the_spool_and_is_none_without_an_instance(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    assert source_study(spool, series()) is None
    spool_source(spool)
    study = source_study(spool, series())
    assert study is not None
    assert study.study_uid == STUDY_UID
    assert study.attributes["PatientID"] == "PID-0091"
    odd = SeriesInfo(series_uid="../x", study_uid="..", description="", session_key="s")
    assert source_study(spool, odd) is None


def test_outputs_dir_defaults_beside_the_spool(tmp_path: Path) -> None:
    settings = load_settings(overrides=[f"receiver.spool_dir='{tmp_path / 'spool'}'"])
    assert outputs_dir(settings) == tmp_path / "derivatives"
    chosen = load_settings(overrides=[f"outputs.dir='{tmp_path / 'elsewhere'}'"])
    assert outputs_dir(chosen) == tmp_path / "elsewhere"


# --------------------------------------------------------------------------- the hub's consumers


N = 6


def _volumes(info: SeriesInfo) -> list[Volume]:
    run = make_phantom_run(n_volumes=N, shape=(24, 24, 16), voxel_mm=6.0, tr_s=1.0, seed=3)
    now = time.time()
    return [
        Volume(
            data=run.volume(t).astype(np.float32),
            vox2ras=run.vox2ras,
            series=info,
            index=t,
            acquisition_time=None,
            first_received=now,
            last_received=now,
            assembled=now,
        )
        for t in range(N)
    ]


def test_consumers_get_every_published_message_and_each_corrected_volume_once(
    tmp_path: Path,
) -> None:
    settings = load_settings(
        overrides=[
            {"pipeline": {"mode": "thread", "pub": "tcp://127.0.0.1:*", "snapshot": ""}},
            {"receiver": {"spool_dir": str(tmp_path / "spool")}},
        ]
    )
    info = series()
    seen: list[Message] = []
    lock = threading.Lock()

    def consumer(message: Message) -> None:
        with lock:
            seen.append(message)

    def failing(message: Message) -> None:
        raise RuntimeError("a consumer bug must not stop the hub")

    files = FilesOutput(tmp_path / "derivatives", OutputsSettings(subject="x1"), durable=False)
    pipeline = Pipeline(settings)
    pipeline.add_consumer(consumer)
    pipeline.add_consumer(failing)
    pipeline.add_consumer(files.consumer)
    files.start()
    pipeline.start()
    try:
        with pytest.raises(StreamError):
            pipeline.add_consumer(consumer)
        for volume in _volumes(info):
            pipeline.submit(volume)
        assert pipeline.drain(60.0)
    finally:
        pipeline.stop()
        assert files.stop(timeout=60.0)  # the series never ended: stop finishes it
    counts = Counter(m.topic for m in seen)
    assert counts[topics.QC] == counts[topics.MOTION] == counts[CORRECTED] == N
    assert counts[topics.SERIES_START] == 1
    corrected = [m.payload for m in seen if m.topic == CORRECTED]
    assert all(isinstance(p, Result) for p in corrected)
    assert sorted(p.index for p in corrected if isinstance(p, Result)) == list(range(N))

    func = tmp_path / "derivatives" / "sub-x1" / "func"
    bold = nib.load(func / "sub-x1_task-rest_run-7_desc-preproc_bold.nii.gz")
    assert bold.shape == (24, 24, 16, N)
    stack = np.asarray(bold.dataobj)
    for p in corrected:
        assert isinstance(p, Result) and p.index is not None
        np.testing.assert_array_equal(stack[..., p.index], p.arrays["data"])
    rows = (func / "sub-x1_task-rest_run-7_desc-confounds_timeseries.tsv").read_text()
    assert len(rows.splitlines()) == N + 1
