"""sinks/bids.py: confounds TSV, BOLD NIfTI, maps and sidecars, written as the scan goes.

Messages are built with sinks/topics.py's builders and passed through the real
codec (encode + decode) before the sink sees them; one test takes them from a
live publisher over tcp. A crash is a child process killed with SIGKILL in
the middle of a series.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import zmq

from boldstream.analysis.qc import QCFrame
from boldstream.analysis.usable import UsableData
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import bids, topics
from boldstream.sinks.bids import BidsSink, ConfoundsWriter, confounds_row, confounds_tsv
from boldstream.stream.codec import decode, encode
from boldstream.stream.messages import Gap, Message, Payload, Result, SeriesEnd, SeriesStart

SHAPE = (12, 14, 10)
TR = 0.8
N = 12
DUMMY = 0  # volume 0 is a dummy scan
MISSING = 5  # never arrived
OUTLIER = 7  # QC outlier
TARGET_AT = 9


def series(number: int = 7) -> SeriesInfo:
    return SeriesInfo(
        series_uid=f"1.2.826.0.1.3680043.10.543.99.{number}",
        study_uid="1.2.826.0.1.3680043.10.543.99",
        description="rest_bold",
        session_key="sess-7f3a",
        manufacturer="SIEMENS",
        series_number=number,
        encoding="mosaic",
        tr_s=TR,
        slice_timing=tuple(float(t) for t in np.linspace(0.0, 0.7, SHAPE[2])),
    )


def oblique_vox2ras() -> np.ndarray:
    """3 mm voxels, rotated 12 degrees about x, shifted: a real scanner grid."""
    a = np.radians(12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([3.0, 3.0, 3.5])
    affine[:3, 3] = [-17.0, -21.5, -12.0]
    return affine


def wire(payload: Payload) -> Message:
    """The message as a subscriber gets it: through the real codec."""
    return decode(encode(Message(payload)))


def volume_data(index: int) -> np.ndarray:
    rng = np.random.default_rng(index)
    base = np.linspace(100.0, 900.0, int(np.prod(SHAPE))).reshape(SHAPE)
    return (base + 10.0 * rng.standard_normal(SHAPE)).astype(np.float32)


def scan(info: SeriesInfo, *, until: int = N) -> Iterator[Message]:
    """What the pipeline hands to the sink for volumes 0..until-1 (no series end)."""
    usable = UsableData(tr_s=TR, goal_minutes=10.0)
    rng = np.random.default_rng(3)
    yield wire(SeriesStart(info, time.time()))
    prev: np.ndarray | None = None
    for i in range(until):
        if i == DUMMY:
            yield wire(Result("pipeline.skipped", info, i, values={"reason": "dummy scan"}))
            continue
        if i == MISSING:
            yield wire(Gap(info, i, "timeout"))
            continue
        params = rng.normal(0.0, [0.1, 0.1, 0.1, 0.001, 0.001, 0.001])
        yield wire(
            topics.motion_result(
                info, i, params.tolist(), flagged=False, reason=None, iterations=3, correlation=0.99
            )
        )
        yield wire(
            Result(
                "pipeline.corrected",
                info,
                i,
                values={"params": params.tolist(), "flagged": False},
                arrays={"data": volume_data(i)},
                affines={"vox2ras": oblique_vox2ras()},
            )
        )
        fd = None if prev is None else float(np.abs(params - prev)[:3].sum())
        prev = params
        frame = QCFrame(
            index=i,
            fd_mm=fd,
            dvars=None if fd is None else float(20.0 + i),
            std_dvars=None if i < 4 else 1.0 + i / 100.0,
            global_signal=500.0 + i / 3.0,
            tsnr_median=None,
            outlier=i == OUTLIER,
            outlier_reasons=("fd",) if i == OUTLIER else (),
            usable=usable.add(fd),
        )
        yield wire(topics.qc_result(info, i, frame, latency_ms=120.0))
        if i == TARGET_AT:
            yield wire(target_result(info, i))


def target_result(info: SeriesInfo, index: int) -> Result:
    corr = np.linspace(-0.6, 0.4, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    corr[0, 0, 0] = np.nan
    ras = (oblique_vox2ras() @ np.array([4.3, 6.6, 5.2, 1.0]))[:3]
    return topics.target_result(
        info,
        index,
        {
            "status": "provisional",
            "ras_mm": ras.tolist(),
            "mni_mm": [-38.0, 40.0, 30.0],
            "split_half_mm": 9.5,
            "drift_mm": 3.0,
            "good_minutes": 1.2,
        },
        correlation_map=corr,
        vox2ras=oblique_vox2ras(),
    )


def read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def published(messages: list[Message], topic: str) -> dict[int, dict[str, Any]]:
    return {
        m.index: dict(m.payload.values)
        for m in messages
        if isinstance(m.payload, Result) and m.payload.topic == topic and m.index is not None
    }


def cell(value: Any) -> str:
    return "n/a" if value is None else repr(float(value))


# --------------------------------------------------------------------------- a whole series


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, list[Message], BidsSink]:
    info = series()
    messages = list(scan(info))
    sink = BidsSink(tmp_path / "derivatives", durable=False)
    for m in messages:
        sink.handle(m)
    end = wire(SeriesEnd(info, time.time(), n_volumes=N, reason="complete"))
    sink.handle(end)
    assert sink.finished(info)
    return tmp_path / "derivatives", messages, sink


def test_layout_and_dataset_description(finished: tuple[Path, list[Message], BidsSink]) -> None:
    out, _, _ = finished
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "boldstream"
    assert description["GeneratedBy"][0]["Version"]
    func = out / "sub-sess7f3a" / "func"
    names = sorted(p.name for p in func.iterdir())
    prefix = "sub-sess7f3a_task-rest_run-7"
    assert names == sorted(
        f"{prefix}_{s}"
        for s in (
            "desc-confounds_timeseries.tsv",
            "desc-confounds_timeseries.json",
            "desc-preproc_bold.nii.gz",
            "desc-preproc_bold.json",
            "desc-tsnr_boldmap.nii.gz",
            "desc-tsnr_boldmap.json",
            "desc-connectivity_boldmap.nii.gz",
            "desc-connectivity_boldmap.json",
            "desc-target_coordinates.json",
            "desc-target_brainsight.txt",
            "desc-target_localite.xml",
        )
    ), "no temporary or partial file may remain after the series end"


def test_confounds_match_the_published_numbers(
    finished: tuple[Path, list[Message], BidsSink],
) -> None:
    out, messages, _ = finished
    path = out / "sub-sess7f3a/func/sub-sess7f3a_task-rest_run-7_desc-confounds_timeseries.tsv"
    columns, rows = read_tsv(path)
    assert columns == [
        *bids.BASE_COLUMNS,
        "non_steady_state_outlier00",
        "motion_outlier00",
        "motion_outlier01",
    ]
    assert len(rows) == N
    motion, qc = published(messages, "motion"), published(messages, "qc")
    for i, row in enumerate(rows):
        if i in (DUMMY, MISSING):
            assert all(row[c] == "n/a" for c in bids.BASE_COLUMNS), i
            continue
        for name in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"):
            assert row[name] == cell(motion[i][name])
        assert row["framewise_displacement"] == cell(qc[i]["fd_mm"])
        assert row["dvars"] == cell(qc[i]["dvars"])
        assert row["std_dvars"] == cell(qc[i]["std_dvars"])
        assert row["global_signal"] == cell(qc[i]["global_signal"])
        assert row["white_matter"] == row["csf"] == "n/a"
    assert rows[1]["framewise_displacement"] == "n/a"  # the first analysed volume
    one_hot = {
        c: [i for i, r in enumerate(rows) if r[c] == "1"] for c in columns[len(bids.BASE_COLUMNS) :]
    }
    assert one_hot == {
        "non_steady_state_outlier00": [DUMMY],
        "motion_outlier00": [MISSING],
        "motion_outlier01": [OUTLIER],
    }
    assert all(r[c] in ("0", "1") for r in rows for c in one_hot)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert set(sidecar) == set(columns)
    assert sidecar["trans_x"]["Units"] == "mm" and sidecar["rot_x"]["Units"] == "rad"
    assert sidecar["framewise_displacement"]["Units"] == "mm"


def test_bold_series_geometry_data_and_sidecar(
    finished: tuple[Path, list[Message], BidsSink],
) -> None:
    out, _, _ = finished
    func = out / "sub-sess7f3a" / "func"
    image: Any = nib.load(func / "sub-sess7f3a_task-rest_run-7_desc-preproc_bold.nii.gz")
    assert image.shape == (*SHAPE, N)
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, oblique_vox2ras(), atol=1e-5)
    sform, sform_code = image.header.get_sform(coded=True)
    np.testing.assert_allclose(sform, oblique_vox2ras(), atol=1e-5)
    qform, qform_code = image.header.get_qform(coded=True)
    assert int(sform_code) == int(qform_code) == 1  # scanner anatomical
    np.testing.assert_allclose(qform, oblique_vox2ras(), atol=1e-4)
    assert image.header.get_zooms()[3] == pytest.approx(TR)
    assert image.header.get_xyzt_units() == ("mm", "sec")
    data = np.asarray(image.dataobj)
    for i in range(N):
        if i in (DUMMY, MISSING):
            assert not data[..., i].any(), f"volume {i} must be zeros"
        else:
            np.testing.assert_array_equal(data[..., i], volume_data(i))
    sidecar = json.loads((func / "sub-sess7f3a_task-rest_run-7_desc-preproc_bold.json").read_text())
    assert sidecar["RepetitionTime"] == TR
    assert sidecar["SliceTiming"] == pytest.approx(list(series().slice_timing or ()))
    assert sidecar["SkullStripped"] is False
    assert sidecar["TaskName"] == "rest"
    assert sidecar["NumberOfVolumes"] == N
    text = json.dumps(sidecar)
    assert "1.2.826" not in text, "no UIDs in the files"


def test_tsnr_map(finished: tuple[Path, list[Message], BidsSink]) -> None:
    out, _, _ = finished
    func = out / "sub-sess7f3a" / "func"
    image: Any = nib.load(func / "sub-sess7f3a_task-rest_run-7_desc-tsnr_boldmap.nii.gz")
    used = np.stack([volume_data(i) for i in range(N) if i not in (DUMMY, MISSING)]).astype(
        np.float64
    )
    expected = used.mean(axis=0) / used.std(axis=0, ddof=1)
    np.testing.assert_allclose(np.asarray(image.dataobj), expected, rtol=1e-5)
    np.testing.assert_allclose(image.affine, oblique_vox2ras(), atol=1e-5)


def test_target_and_connectivity_map(finished: tuple[Path, list[Message], BidsSink]) -> None:
    out, messages, _ = finished
    func = out / "sub-sess7f3a" / "func"
    target = next(m.payload for m in messages if m.topic == "target")
    assert isinstance(target, Result)
    saved = json.loads(
        (func / "sub-sess7f3a_task-rest_run-7_desc-target_coordinates.json").read_text()
    )
    ras = np.array(target.values["ras_mm"])
    assert saved["Coordinates"]["scanner_ras_mm"] == pytest.approx(ras.tolist())
    assert saved["Coordinates"]["dicom_lps_mm"] == pytest.approx([-ras[0], -ras[1], ras[2]])
    assert saved["Coordinates"]["voxel_ijk"] == pytest.approx([4.3, 6.6, 5.2])
    assert saved["Status"] == "provisional" and saved["Provisional"] is True
    assert "scanner RAS+" in saved["CoordinateFrames"]["scanner_ras_mm"]
    image: Any = nib.load(func / "sub-sess7f3a_task-rest_run-7_desc-connectivity_boldmap.nii.gz")
    expected = np.nan_to_num(np.asarray(target.arrays["map"]), nan=0.0)
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected)
    np.testing.assert_allclose(image.affine, oblique_vox2ras(), atol=1e-5)


def test_subject_label_is_configurable_and_never_a_patient_id(tmp_path: Path) -> None:
    info = series()
    fixed = BidsSink(tmp_path / "a", subject="pilot01", durable=False)
    assert fixed.files_for(info).folder == tmp_path / "a" / "sub-pilot01" / "func"
    mapped = BidsSink(tmp_path / "b", subject=lambda s: f"x{s.series_number}", durable=False)
    assert mapped.files_for(info).prefix == "sub-x7_task-rest_run-7"
    with pytest.raises(ValueError, match="BIDS label"):
        BidsSink(tmp_path / "c", subject="--", durable=False).files_for(info)


# --------------------------------------------------------------------------- streaming


def test_streaming_writer_equals_the_pure_function(tmp_path: Path) -> None:
    rows = [
        confounds_row(0, non_steady_state=True),
        confounds_row(1, motion=dict.fromkeys(bids.BASE_COLUMNS[:6], 0.25), qc={"fd_mm": None}),
        confounds_row(2, motion={"trans_x": 1e-7}, qc={"fd_mm": 0.7, "outlier": True}),
        confounds_row(3, missing=True),
        confounds_row(4, motion={"trans_x": -3.0}, qc={"fd_mm": 0.1, "dvars": float("nan")}),
    ]
    writer = ConfoundsWriter(tmp_path / "x_desc-confounds_timeseries.tsv", durable=False)
    for row in rows:
        writer.append(row)
        on_disk = writer.path.read_text()
        assert on_disk == confounds_tsv(rows[: row.index + 1]), "valid after every row"
    writer.close()
    columns, parsed = read_tsv(writer.path)
    assert columns[-3:] == ["non_steady_state_outlier00", "motion_outlier00", "motion_outlier01"]
    assert parsed[4]["dvars"] == "n/a"  # NaN is written as n/a
    with pytest.raises(ValueError, match="volume order"):
        writer.append(confounds_row(9))


def test_a_lost_qc_message_still_leaves_a_row(tmp_path: Path) -> None:
    info = series()
    sink = BidsSink(tmp_path, durable=False)
    for m in scan(info, until=5):
        if m.topic == "qc" and m.index == 3:
            continue  # dropped on the way
        sink.handle(m)
    path = sink.files_for(info).confounds
    _, rows = read_tsv(path)
    assert len(rows) == 5
    assert rows[3]["trans_x"] != "n/a"  # its motion arrived
    assert rows[3]["framewise_displacement"] == "n/a"
    assert rows[3]["motion_outlier00"] == "1"  # nothing vouches for it


# --------------------------------------------------------------------------- crash


CRASH_AFTER = 8


def _crash_child(out: str) -> None:
    """Run in a child process: half a series, then SIGKILL (no close, no finish)."""
    sink = BidsSink(Path(out))  # durable: the default
    for m in scan(series(), until=CRASH_AFTER):
        sink.handle(m)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_crash_mid_series_leaves_valid_files(tmp_path: Path) -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('files_test', {str(Path(__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"mod._crash_child({str(tmp_path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    func = tmp_path / "sub-sess7f3a" / "func"
    prefix = "sub-sess7f3a_task-rest_run-7"
    columns, rows = read_tsv(func / f"{prefix}_desc-confounds_timeseries.tsv")
    assert len(rows) == CRASH_AFTER
    assert columns[-3:] == ["non_steady_state_outlier00", "motion_outlier00", "motion_outlier01"]
    assert rows[OUTLIER]["motion_outlier01"] == "1"
    assert all(len(r) == len(columns) and None not in r.values() for r in rows)
    sidecar = json.loads((func / f"{prefix}_desc-confounds_timeseries.json").read_text())
    assert set(sidecar) == set(columns)
    image: Any = nib.load(func / f"{prefix}_desc-preproc_bold.nii")
    assert image.shape == (*SHAPE, CRASH_AFTER)
    data = np.asarray(image.dataobj)
    for i in range(1, CRASH_AFTER):
        if i != MISSING:
            np.testing.assert_array_equal(data[..., i], volume_data(i))
    json.loads((func / f"{prefix}_desc-preproc_bold.json").read_text())
    assert not [p.name for p in func.iterdir() if p.name.startswith(".")], "no temporaries"
    assert not (func / f"{prefix}_desc-preproc_bold.nii.gz").exists()


# --------------------------------------------------------------------------- over a socket


def test_follow_a_live_publisher(tmp_path: Path, zctx: zmq.Context[Any], publisher: Any) -> None:
    sink = BidsSink(tmp_path, durable=False)
    stop = threading.Event()
    thread = threading.Thread(
        target=sink.follow, args=(publisher.endpoint, stop), kwargs={"context": zctx}
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10.0
        while publisher.publisher.subscriptions < len(bids.FILE_TOPICS):
            assert time.monotonic() < deadline, "the sink never subscribed"
            if publisher.publisher.socket.poll(100):
                publisher.publisher.drain_subscriptions()
        publisher.start_series()
        publisher.scan(12, target_every=10)
        publisher.end_series(12)
        deadline = time.monotonic() + 10.0
        while not sink.finished(publisher.series):
            assert time.monotonic() < deadline, "the series end never reached the sink"
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5.0)
    assert not thread.is_alive()
    files = sink.files_for(publisher.series)
    _, rows = read_tsv(files.confounds)
    assert len(rows) == 12
    # fake publisher: 7 missing, 9 late (see conftest)
    assert rows[7]["motion_outlier00"] == "1" and rows[9]["motion_outlier01"] == "1"
    assert rows[8]["trans_x"] != "n/a"
    saved = json.loads(files.target.read_text())
    assert saved["Coordinates"]["scanner_ras_mm"] == pytest.approx([-36.0, 30.0, 28.0])
    assert files.connectivity.exists()
    assert not files.bold.exists(), "no corrected volumes are published"
