"""The connectivity stage after QC: target results on the phantom, ordering, the live pipeline."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import structlog
import zmq
from pipeline_support import (
    as_volume,
    assert_same_target,
    chain,
    collect,
    make_series,
    pipeline_settings,
    subscribe,
    volumes,
)

from boldstream.analysis import (
    MotionCorrector,
    SeedConnectivity,
    TargetRules,
    TargetTracker,
    native_rois,
    register_to_template,
    template_rois,
)
from boldstream.cli import main as cli_main
from boldstream.config import load_settings
from boldstream.pipeline.connectivity_stage import ConnectivityStage, _ConnSeries
from boldstream.pipeline.offline import nifti_volumes, replay
from boldstream.pipeline.series_stage import CORRECTED
from boldstream.pipeline.service import Pipeline
from boldstream.pipeline.stages import MotionStage, QCStage
from boldstream.simulator.phantom import make_phantom_run
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, series_key


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """replay configures logging onto the (captured) stderr; undo it afterwards."""
    yield
    structlog.reset_defaults()


def test_stage_publishes_the_phantom_target_like_the_analysis() -> None:
    run = make_phantom_run(n_volumes=120, tr_s=2.0, motion="mild", seed=2)
    series = make_series("9.9.9", tr_s=2.0)
    vols = [as_volume(run.volume(t), run.vox2ras, series, t) for t in range(run.n_volumes)]
    stage = ConnectivityStage(every_s=20.0)
    messages = [Message(v) for v in vols] + [Message(SeriesEnd(series, ended=0.0))]
    out = chain([MotionStage(), QCStage(forward_corrected=True), stage], messages)

    targets = [m for m in out if m.topic == topics.TARGET]
    # every 10 volumes (20 s at TR 2 s), from the first with enough good frames
    # for the 15 regressors (at least 18)
    assert [m.index for m in targets][:3] == [19, 29, 39]
    assert targets[-1].index == 119
    qc_at = {m.index: i for i, m in enumerate(out) if m.topic == topics.QC}
    assert sorted(qc_at) == list(range(120))
    for i, m in enumerate(out):
        if m.topic == topics.TARGET:  # qc is never held back for the target
            assert i > qc_at[m.index]
    assert not any(m.topic == CORRECTED for m in out)  # not forwarded by default
    assert out[-1].kind == "series-end"

    last = targets[-1].payload
    assert isinstance(last, Result)
    values = last.values
    assert values["status"] in topics.TARGET_STATUSES
    assert set(topics.TARGET_FIELDS) <= set(values)
    assert last.arrays[topics.TARGET_ARRAY_MAP].shape == run.shape
    np.testing.assert_allclose(last.affines[topics.TARGET_AFFINE], run.vox2ras)
    truth = run.truth["network"]["target"]["scanner_ras_mm"]
    assert np.linalg.norm(np.subtract(values["ras_mm"], truth)) < 6.0
    assert values["status"] != "stable"  # 4 minutes is not enough (SPEC 5)
    assert any("good minutes" in r for r in values["reasons"])

    # the same numbers as the analysis classes called directly
    corrector = MotionCorrector(vols[0].data, run.vox2ras)
    ests = [corrector.register(v.data) for v in vols]
    mean = np.mean([e.corrected for e in ests[:10]], axis=0)
    reg = register_to_template(mean, run.vox2ras)
    conn = SeedConnectivity(native_rois(template_rois(), reg, mean, run.vox2ras), tr_s=2.0)
    tracker = TargetTracker(native2mni=reg.native2mni, rules=TargetRules())
    direct = None
    for i, e in enumerate(ests):
        conn.update(e.corrected, e.params, usable=not e.flagged)
        if (i + 1) % 10 == 0:
            direct = tracker.update(conn)
    assert direct is not None
    np.testing.assert_allclose(values["ras_mm"], direct.values["ras_mm"], atol=1e-6)
    assert values["split_half_mm"] == direct.values["split_half_mm"]


def test_lost_volumes_keep_their_place_in_the_connectivity_buffer() -> None:
    """A gap, while the registration volumes are held and after, is a censored
    frame: the buffer (and its band-pass) keeps the scanner's time axis."""
    run = make_phantom_run(n_volumes=40, tr_s=2.0, motion="mild", seed=3)
    series = make_series("9.9.8", tr_s=2.0)
    vols = [as_volume(run.volume(t), run.vox2ras, series, t) for t in range(run.n_volumes)]
    lost = {4, 25}
    messages = [
        Message(Gap(series, t, "timeout")) if t in lost else Message(v) for t, v in enumerate(vols)
    ]
    stage = ConnectivityStage(every_s=20.0)
    chain([MotionStage(), QCStage(forward_corrected=True), stage], messages)
    (state,) = stage._series.values()
    assert isinstance(state, _ConnSeries) and state.conn is not None

    corrector = MotionCorrector(vols[0].data, run.vox2ras)
    ests = {t: corrector.register(v.data) for t, v in enumerate(vols) if t not in lost}
    good = [ests[t].corrected for t in sorted(ests) if not ests[t].flagged][:10]
    mean = np.mean(good, axis=0)
    reg = register_to_template(mean, run.vox2ras)
    conn = SeedConnectivity(native_rois(template_rois(), reg, mean, run.vox2ras), tr_s=2.0)
    for t in range(run.n_volumes):
        if t in lost:
            conn.missing()
        else:
            conn.update(ests[t].corrected, ests[t].params, usable=not ests[t].flagged)
    assert state.conn.frames == conn.frames == 40
    for got, want in zip(state.conn.buffered(), conn.buffered(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-9)
    assert not conn.buffered()[3][4] and not conn.buffered()[3][25]


def test_corrected_volumes_pass_on_when_asked_and_bad_registration_warns() -> None:
    series = make_series("8.8.8")
    vols = volumes(14, series)
    out = chain(
        [
            MotionStage(),
            QCStage(forward_corrected=True),
            ConnectivityStage(forward_corrected=True),
        ],
        [Message(v) for v in vols],
    )
    corrected = [m.index for m in out if m.topic == CORRECTED]
    assert corrected == list(range(14))
    order = [(m.topic, m.index) for m in out if m.topic in (topics.QC, CORRECTED)]
    assert order[:2] == [(topics.QC, 0), (CORRECTED, 0)]

    # a small textured box (motion correction copes) that holds no brain at all
    other = make_series("7.7.7")
    rng = np.random.default_rng(0)
    box = np.zeros((24, 24, 16), dtype=np.float32)
    box[4:20, 4:20, 3:13] = 1000.0 + 300.0 * rng.random((16, 16, 10))
    blank = [as_volume(box, np.eye(4), other, t) for t in range(12)]
    out = chain(
        [MotionStage(), QCStage(forward_corrected=True), ConnectivityStage()],
        [Message(v) for v in blank],
    )
    codes = [
        m.payload.values["code"]
        for m in out
        if isinstance(m.payload, Result) and m.topic == topics.WARNING
    ]
    assert "registration-failed" in codes
    assert not any(m.topic == topics.TARGET for m in out)
    assert sorted(m.index for m in out if m.topic == topics.QC) == list(range(12))


def test_live_pipeline_publishes_targets(tmp_path: Path, ctx: zmq.Context[Any]) -> None:
    settings = pipeline_settings(tmp_path, "pipeline.mode='thread'", "target.every_s=20")
    series = make_series("6.6.6")
    vols = volumes(40, series)
    with Pipeline(settings, context=ctx) as pipeline:
        sub = subscribe(ctx, pipeline)
        for v in vols:
            pipeline.submit(v)
        pipeline.end_series(series, n_volumes=40)
        out = collect(sub, ends=1, timeout=120.0)
        sub.close()
    targets = [m for m in out if m.topic == topics.TARGET]
    assert [m.index for m in targets] == [19, 29, 39]
    assert sorted(m.index for m in out if m.topic == topics.QC) == list(range(40))
    last = targets[-1].payload
    assert isinstance(last, Result)
    assert last.values["status"] in topics.TARGET_STATUSES
    assert last.arrays[topics.TARGET_ARRAY_MAP].dtype == np.float32


def test_qc_and_motion_do_not_wait_behind_the_registration(
    tmp_path: Path, ctx: zmq.Context[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The technician's figures go from the QC stage straight to the hub."""
    import boldstream.pipeline.connectivity_stage as module

    real = module.register_to_template
    release = threading.Event()
    started = threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "register_to_template", held)
    settings = pipeline_settings(tmp_path, "pipeline.mode='thread'", "target.every_s=20")
    series = make_series("6.6.7")
    n = 30
    vols = volumes(n, series)
    with Pipeline(settings, context=ctx) as pipeline:
        sub = subscribe(ctx, pipeline)
        for v in vols:
            pipeline.submit(v)
        pipeline.end_series(series, n_volumes=n)
        got: list[Message] = []
        # Every qc and motion result is out while the registration (after
        # volume 9) still holds the connectivity stage.
        while sum(m.topic == topics.QC for m in got) < n:
            m = sub.recv(timeout_ms=30_000)
            assert m is not None, [(m.topic, m.index) for m in got][-5:]
            got.append(m)
        assert started.is_set()
        assert sorted(m.index for m in got if m.topic == topics.MOTION) == list(range(n))
        assert not any(m.kind == "series-end" or m.topic == topics.TARGET for m in got)
        # Not done while the connectivity stage has not handled the volumes.
        assert not pipeline.drain(0.5)
        release.set()
        assert pipeline.drain(60)
        got += collect(sub, ends=1)
        sub.close()
    assert [m.index for m in got if m.topic == topics.TARGET] == [19, 29]
    end = next(i for i, m in enumerate(got) if m.kind == "series-end")
    assert all(m.topic != topics.TARGET for m in got[end:])


def test_replay_writes_the_target_json(tmp_path: Path) -> None:
    run = make_phantom_run(n_volumes=60, tr_s=2.0, motion="none", seed=3)
    img = nib.Nifti1Image(run.data, run.vox2ras)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    nifti = tmp_path / "sub-05_bold.nii.gz"
    nib.save(img, nifti)
    out = tmp_path / "out"
    assert cli_main(["replay", str(nifti), "--out", str(out), "--set", "target.every_s=30"]) == 0
    func = out / "sub-05" / "func"
    doc = json.loads((func / "sub-05_task-rest_desc-target_coordinates.json").read_text())
    coords = doc["Coordinates"]
    assert doc["VolumeIndex"] == 59 and doc["Status"] in topics.TARGET_STATUSES
    ras = np.asarray(coords["scanner_ras_mm"])
    np.testing.assert_allclose(coords["dicom_lps_mm"], ras * [-1, -1, 1])
    ijk = np.asarray(coords["voxel_ijk"])
    np.testing.assert_allclose(run.vox2ras[:3, :3] @ ijk + run.vox2ras[:3, 3], ras, atol=1e-6)
    assert coords["mni_mm"] is not None
    assert (func / "sub-05_task-rest_desc-connectivity_boldmap.nii.gz").exists()

    # the same target as the offline API gives
    settings = load_settings(overrides=["target.every_s=30"], environ={})
    series, events = nifti_volumes(nifti)
    result = replay(events, settings)
    target = result[series_key(series)].target
    assert target is not None
    np.testing.assert_allclose(target["ras_mm"], ras, atol=1e-4)


def test_a_restarted_stage_resumes_from_its_checkpoint_like_an_unbroken_run(
    tmp_path: Path,
) -> None:
    series = make_series("5.5.5")
    upstream = chain(
        [MotionStage(), QCStage(forward_corrected=True)], [Message(v) for v in volumes(60, series)]
    )
    corrected = [m for m in upstream if m.topic == CORRECTED]
    assert [m.index for m in corrected] == list(range(60))

    def stage(folder: Path | None) -> ConnectivityStage:
        return ConnectivityStage(every_s=20.0, checkpoint_dir=folder, checkpoint_every=40)

    unbroken = [m for m in chain([stage(None)], corrected) if m.topic == topics.TARGET]
    assert [m.index for m in unbroken] == [19, 29, 39, 49, 59]

    # The first process checkpoints after its targets at 19 and 29, and dies at 34 ...
    first = stage(tmp_path)
    before = [m for m in chain([first], corrected[:35]) if m.topic == topics.TARGET]
    assert [m.index for m in before] == [19, 29]
    # ... before the pipeline heard of the checkpoint at 29, so the journal
    # re-sends everything after 19 to its successor.
    second = stage(tmp_path)
    after = chain([second], corrected[20:])
    assert second.counts["restored"] == 1
    targets = [m for m in after if m.topic == topics.TARGET]
    # 29 again (it may have been lost with the first process), then the rest
    assert [m.index for m in targets] == [29, 39, 49, 59]
    for got, want in zip(targets, unbroken[1:], strict=True):
        assert_same_target(got, want)
    # nothing was worked out twice: 20-29 were repeats for the restored state
    assert second.counts["repeats"] == 10 and second.counts["processed"] == 30


def test_a_restarted_stage_without_a_checkpoint_starts_over_and_says_what_it_said(
    tmp_path: Path,
) -> None:
    series = make_series("5.5.6")
    upstream = chain(
        [MotionStage(), QCStage(forward_corrected=True)], [Message(v) for v in volumes(25, series)]
    )
    corrected = [m for m in upstream if m.topic == CORRECTED]
    first = ConnectivityStage(every_s=20.0, checkpoint_dir=tmp_path, checkpoint_every=40)
    said = [m for m in chain([first], corrected) if m.topic in (topics.TARGET, topics.WARNING)]
    assert [m.index for m in said if m.topic == topics.TARGET] == [19]
    # A successor restored from the checkpoint at 19 sees 0-19 again (nothing
    # of this stage's was acknowledged): it says again what was said for them.
    second = ConnectivityStage(every_s=20.0, checkpoint_dir=tmp_path, checkpoint_every=40)
    again = [
        m for m in chain([second], corrected[:20]) if m.topic in (topics.TARGET, topics.WARNING)
    ]
    assert [(m.topic, m.index) for m in again] == [(m.topic, m.index) for m in said]
    assert_same_target(again[-1], said[-1])
    assert second.counts["processed"] == 0

    # An unreadable checkpoint: the series starts again from the first volume it sees.
    for path in tmp_path.rglob("state.json"):
        path.write_text("{not json")
    third = ConnectivityStage(every_s=20.0, checkpoint_dir=tmp_path, checkpoint_every=40)
    chain([third], corrected[20:])
    assert third.counts["restored"] == 0 and third.counts["processed"] == 5


def test_a_restarted_stage_before_its_first_checkpoint_waits_for_the_series_start(
    tmp_path: Path,
) -> None:
    """Live volumes that overtake the journal's re-send do not make it skip the start.

    The first process dies at volume 8, before any checkpoint (the first
    comes with the target at 19). While its successor starts, the scanner
    goes on: volumes 9-11 reach it before the pipeline re-sends 0-11 from
    its journal, which holds the series from its first volume as long as
    this stage has not checkpointed.
    """
    series = make_series("5.5.7")
    upstream = chain(
        [MotionStage(), QCStage(forward_corrected=True)], [Message(v) for v in volumes(25, series)]
    )
    corrected = [m for m in upstream if m.topic == CORRECTED]

    def stage(folder: Path | None) -> ConnectivityStage:
        return ConnectivityStage(every_s=20.0, checkpoint_dir=folder, checkpoint_every=40)

    unbroken = [m for m in chain([stage(None)], corrected) if m.topic == topics.TARGET]
    assert [m.index for m in unbroken] == [19]
    first = stage(tmp_path)
    chain([first], corrected[:9])
    assert not list(tmp_path.rglob("state.json"))
    second = stage(tmp_path)
    after = chain([second], corrected[9:12] + corrected[:12] + corrected[12:])
    assert second.counts["processed"] == 25 and second.counts["repeats"] == 3
    targets = [m for m in after if m.topic == topics.TARGET]
    assert [m.index for m in targets] == [19]
    assert_same_target(targets[0], unbroken[0])


def test_a_restarted_stage_repeats_its_warnings_and_keeps_a_failed_series_off(
    tmp_path: Path,
) -> None:
    # a small textured box (motion correction copes) that holds no brain at all
    other = make_series("7.7.8")
    rng = np.random.default_rng(0)
    box = np.zeros((24, 24, 16), dtype=np.float32)
    box[4:20, 4:20, 3:13] = 1000.0 + 300.0 * rng.random((16, 16, 10))
    upstream = chain(
        [MotionStage(), QCStage(forward_corrected=True)],
        [Message(as_volume(box, np.eye(4), other, t)) for t in range(14)],
    )
    corrected = [m for m in upstream if m.topic == CORRECTED]

    def warnings(out: list[Message]) -> list[tuple[int | None, str]]:
        return [
            (m.index, m.payload.values["code"])
            for m in out
            if isinstance(m.payload, Result) and m.topic == topics.WARNING
        ]

    first = ConnectivityStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    said = warnings(chain([first], corrected[:12]))
    assert said == [(9, "registration-failed")]
    second = ConnectivityStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    assert warnings(chain([second], corrected)) == said
    assert second.counts["restored"] == 1 and second.counts["processed"] == 4
