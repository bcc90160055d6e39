"""Motion and QC stages called directly: same numbers as the analysis, series kept apart."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import as_volume, chain, make_series, phantom, volumes
from structlog.testing import capture_logs

from boldstream.analysis import MotionCorrector, QCAccumulator, foreground_mask
from boldstream.pipeline.checkpoint import CheckpointStore
from boldstream.pipeline.series_stage import CHECKPOINT, CORRECTED, SKIPPED
from boldstream.pipeline.stages import MotionStage, QCStage
from boldstream.receiver.volume import Volume
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, SeriesEnd


def run_chain(motion: MotionStage, qc: QCStage, messages: Iterable[Message]) -> list[Message]:
    return chain([motion, qc], list(messages))


def by_topic(messages: list[Message], topic: str) -> dict[int, dict]:
    found: dict[int, dict] = {}
    for m in messages:
        if m.topic == topic:
            assert m.index not in found, f"{topic} {m.index} emitted twice"
            found[m.index] = dict(m.payload.values)  # type: ignore[union-attr]
    return found


def direct(vols: list[Volume], *, dummy: int = 0) -> tuple[dict[int, tuple], dict[int, dict]]:
    """Motion params and QC values straight from the analysis classes."""
    ref = vols[dummy].data
    corrector = MotionCorrector(ref, vols[dummy].vox2ras)
    acc = QCAccumulator(foreground_mask(ref), tr_s=2.0)
    params, qc = {}, {}
    for v in vols[dummy:]:
        est = corrector.register(v.data)
        params[v.index] = est.params
        qc[v.index] = acc.update(est.corrected, est.params, usable=not est.flagged).as_dict()
    return params, qc


def test_stages_match_direct_analysis_calls() -> None:
    series = make_series()
    vols = volumes(40, series)
    out = run_chain(MotionStage(), QCStage(), (Message(v) for v in vols))
    motion, qc = by_topic(out, topics.MOTION), by_topic(out, topics.QC)
    params, expected = direct(vols)
    assert sorted(motion) == sorted(qc) == list(range(40))
    for i in range(40):
        got = tuple(motion[i][k] for k in topics.MOTION_FIELDS[:6])
        np.testing.assert_allclose(got, params[i], atol=1e-9)
        assert set(motion[i]) == set(topics.MOTION_FIELDS)
        assert set(qc[i]) == set(topics.QC_FIELDS)
        assert qc[i]["latency_ms"] is not None and qc[i]["latency_ms"] >= 0
        for key in ("fd_mm", "dvars", "std_dvars", "global_signal", "tsnr_median", "outlier"):
            want = expected[i][key]
            if want is None or isinstance(want, bool):  # n/a, or the outlier flag
                assert qc[i][key] == want, (i, key)
            else:
                assert qc[i][key] == pytest.approx(want, rel=1e-6, abs=1e-9), (i, key)
        assert qc[i]["usable"] == expected[i]["usable"]
    # The phantom's mild motion is recovered (truth relative to volume 0).
    truth = np.asarray(phantom(40).truth["motion"]["parameters"])
    got = np.asarray([[motion[i][k] for k in topics.MOTION_FIELDS[:6]] for i in range(40)])
    assert np.abs(got[:, :3] - truth[:, :3]).max() < 0.2
    # Corrected volumes stay internal: QC does not forward them by default.
    assert not any(m.topic == CORRECTED for m in out)


def test_dummy_scans_are_skipped_and_the_reference_follows_them() -> None:
    series = make_series()
    vols = volumes(12, series)
    out = run_chain(MotionStage(dummy_scans=3), QCStage(), (Message(v) for v in vols))
    assert sorted(by_topic(out, SKIPPED)) == [0, 1, 2]
    motion = by_topic(out, topics.MOTION)
    params, _ = direct(vols, dummy=3)
    assert sorted(motion) == list(range(3, 12))
    assert all(abs(motion[3][k]) < 1e-3 for k in ("trans_x", "trans_y", "trans_z"))
    for i in range(3, 12):
        np.testing.assert_allclose(
            [motion[i][k] for k in topics.MOTION_FIELDS[:6]], params[i], atol=1e-9
        )
    assert by_topic(out, topics.QC)[3]["fd_mm"] is None


def test_an_sbref_series_before_the_bold_series_is_its_motion_reference() -> None:
    bold = make_series("1.2.3.50")  # series number 7
    sbref_series = replace(
        make_series("1.2.3.49"), description="rest_SBRef", series_number=6, reference=True
    )
    vols = volumes(12, bold)
    # Volume 5's pose, brighter (single-band images have more signal).
    sbref = as_volume(vols[5].data * 1.5, vols[5].vox2ras, sbref_series, 0)
    out = run_chain(MotionStage(), QCStage(), [Message(sbref), *(Message(v) for v in vols)])
    mine = [m for m in out if m.series == sbref_series]
    assert [m.topic for m in mine] == [SKIPPED]  # not analysed itself
    motion = by_topic([m for m in out if m.series == bold], topics.MOTION)
    assert sorted(motion) == list(range(12))
    corrector = MotionCorrector(sbref.data, bold_vox2ras := vols[0].vox2ras)
    for v in vols:
        want = corrector.register(v.data).params
        got = [motion[v.index][k] for k in topics.MOTION_FIELDS[:6]]
        np.testing.assert_allclose(got, want, atol=1e-9)
    # Relative to the SBRef's pose: volume 5 stays put, volume 0 does not.
    trans = [[motion[i][k] for k in ("trans_x", "trans_y", "trans_z")] for i in (0, 5)]
    assert max(map(abs, trans[1])) < 0.05 < max(map(abs, trans[0]))

    # An SBRef on another grid, or acquired after the series, is not used.
    shifted = bold_vox2ras.copy()
    shifted[0, 3] += 2.0
    for other in (
        as_volume(sbref.data, shifted, sbref_series, 0),
        as_volume(sbref.data, bold_vox2ras, replace(sbref_series, series_number=8), 0),
    ):
        out = run_chain(MotionStage(), QCStage(), [Message(other), *(Message(v) for v in vols)])
        first = by_topic([m for m in out if m.series == bold], topics.MOTION)[0]
        assert all(first[k] == 0.0 for k in topics.MOTION_FIELDS[:6])


def test_a_motion_stage_restarted_after_the_sbref_still_uses_it(tmp_path: Path) -> None:
    """The stage process dies between the SBRef series and the BOLD series' first
    volume: the new process finds the SBRef in the checkpoint folder, and the
    BOLD series is corrected to it as without the restart. Another study's
    BOLD series does not take it."""
    bold = make_series("1.2.3.50")
    sbref_series = replace(
        make_series("1.2.3.49"), description="rest_SBRef", series_number=6, reference=True
    )
    vols = volumes(8, bold)
    sbref = as_volume(vols[5].data * 1.5, vols[5].vox2ras, sbref_series, 0)
    first = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    out = run_chain(first, QCStage(checkpoint_dir=tmp_path), [Message(sbref)])
    assert [m.topic for m in out if m.series == sbref_series] == [SKIPPED]
    again = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=5)  # the restart
    out = run_chain(again, QCStage(checkpoint_dir=tmp_path), [Message(v) for v in vols])
    motion = by_topic(out, topics.MOTION)
    corrector = MotionCorrector(sbref.data, vols[0].vox2ras)
    for v in vols:
        got = [motion[v.index][k] for k in topics.MOTION_FIELDS[:6]]
        np.testing.assert_allclose(got, corrector.register(v.data).params, atol=1e-9)
    assert max(abs(motion[0][k]) for k in ("trans_x", "trans_y", "trans_z")) > 0.05

    other = replace(make_series("1.2.3.60"), study_uid="1.2.3.999")
    out = run_chain(
        MotionStage(checkpoint_dir=tmp_path),
        QCStage(checkpoint_dir=tmp_path),
        [Message(as_volume(v.data, v.vox2ras, other, v.index)) for v in vols[:2]],
    )
    assert all(by_topic(out, topics.MOTION)[0][k] == 0.0 for k in topics.MOTION_FIELDS[:6])


def test_an_unreadable_sbref_file_leaves_the_series_its_first_volume(tmp_path: Path) -> None:
    """A damaged SBRef file after a restart: logged and removed once, and the
    series is corrected to its own first volume, every volume analysed."""
    bold = make_series("1.2.3.50")
    sbref_series = replace(
        make_series("1.2.3.49"), description="rest_SBRef", series_number=6, reference=True
    )
    vols = volumes(6, bold)
    sbref = as_volume(vols[5].data * 1.5, vols[5].vox2ras, sbref_series, 0)
    run_chain(MotionStage(checkpoint_dir=tmp_path), QCStage(), [Message(sbref)])
    (stored,) = (tmp_path / "studies" / "motion").iterdir()
    stored.write_bytes(stored.read_bytes()[:100])  # truncated
    with capture_logs() as logs:
        out = run_chain(MotionStage(checkpoint_dir=tmp_path), QCStage(), [Message(v) for v in vols])
    assert sorted(by_topic(out, topics.MOTION)) == list(range(6))
    assert all(by_topic(out, topics.MOTION)[0][k] == 0.0 for k in topics.MOTION_FIELDS[:6])
    assert not any(m.topic == SKIPPED for m in out)
    unreadable = [e for e in logs if e["event"].startswith("SBRef in the checkpoint folder")]
    assert len(unreadable) == 1 and not stored.exists()


def test_study_arrays_keep_only_the_newest_studies(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "motion")
    for k in range(5):
        store.write_study(f"1.2.{k}", "sbref", {"data": np.full(3, k)}, keep=3)
        time.sleep(0.02)  # file times are coarser than back-to-back writes
    held = sorted(p.name for p in (tmp_path / "studies" / "motion").iterdir())
    assert held == ["1.2.2-sbref.npz", "1.2.3-sbref.npz", "1.2.4-sbref.npz"]
    np.testing.assert_array_equal(store.read_study("1.2.4", "sbref")["data"], np.full(3, 4))
    assert store.read_study("1.2.0", "sbref") is None


def test_interleaved_series_are_kept_apart() -> None:
    a, b = make_series("1.2.3.10"), make_series("1.2.3.20", session_key="sess-b")
    va, vb = volumes(15, a, seed=0), volumes(15, b, seed=1, motion="heavy")
    mixed = [Message(v) for pair in zip(va, vb, strict=True) for v in pair]
    out = run_chain(MotionStage(), QCStage(), mixed)
    alone_a = run_chain(MotionStage(), QCStage(), (Message(v) for v in va))
    for series, alone in ((a, alone_a),):
        mine = [m for m in out if m.series == series]
        for topic in (topics.MOTION, topics.QC):
            got, want = by_topic(mine, topic), by_topic(alone, topic)
            for i in want:
                want[i].pop("latency_ms", None)
                got[i].pop("latency_ms", None)
            assert got == want
    assert len(by_topic([m for m in out if m.series == b], topics.QC)) == 15


def test_a_failing_series_does_not_touch_another() -> None:
    a, b = make_series("1.2.3.10"), make_series("1.2.3.20")
    va, vb = volumes(10, a), volumes(10, b, seed=1)
    va[4] = replace(va[4], data=np.ones((8, 8, 8), dtype=np.float32), acquisition_time=None)
    mixed = [Message(v) for pair in zip(va, vb, strict=True) for v in pair]
    out = run_chain(MotionStage(), QCStage(), mixed)
    of_a = [m for m in out if m.series == a]
    warnings = [m.payload.values for m in of_a if m.topic == topics.WARNING]  # type: ignore[union-attr]
    assert [w["code"] for w in warnings] == ["analysis-failed"]
    assert "volume 4" in warnings[0]["message"]
    assert sorted(by_topic(of_a, SKIPPED)) == [4]
    assert sorted(by_topic(of_a, topics.QC)) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert sorted(by_topic([m for m in out if m.series == b], topics.QC)) == list(range(10))


def test_gaps_pass_through_and_the_series_end_flushes(tmp_path: Path) -> None:
    series = make_series()
    vols = volumes(8, series)
    messages = [Message(v) for v in vols[:3]]
    messages.append(Message(Gap(series, 3, "incomplete")))
    messages.extend(Message(v) for v in vols[4:])
    messages.append(Message(SeriesEnd(series, ended=0.0, n_volumes=8)))
    motion = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=100)
    qc = QCStage(checkpoint_dir=tmp_path, checkpoint_every=100)
    out = run_chain(motion, qc, messages)
    assert [m.index for m in out if m.kind == "gap"] == [3]
    assert sorted(by_topic(out, topics.QC)) == [0, 1, 2, 4, 5, 6, 7]
    # The end writes a checkpoint for each stage, reported before the end passes on.
    assert [m.payload.values["stage"] for m in out if m.topic == CHECKPOINT] == ["motion", "qc"]  # type: ignore[union-attr]
    assert out[-1].kind == "series-end"


def test_a_lost_volume_counts_as_scan_time_and_a_nan_volume_stays_out_of_tsnr() -> None:
    series = make_series()
    vols = volumes(10, series)
    nan = vols[6].data.copy()
    nan[nan.shape[0] // 2] = np.nan  # one slice of NaN (float input)
    vols[6] = replace(vols[6], data=nan, acquisition_time=None)
    messages = [Message(v) for v in vols[:4]]
    messages.append(Message(Gap(series, 4, "timeout")))
    messages.extend(Message(v) for v in vols[5:])
    qc = by_topic(run_chain(MotionStage(), QCStage(), messages), topics.QC)
    assert sorted(qc) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    # The lost volume is scan time without data: 5 frames of scan time at volume 5.
    assert qc[3]["usable"]["frames_total"] == 4
    assert qc[5]["usable"]["frames_total"] == 6
    # The NaN volume: no FD (motion flagged it), no DVARS, left out of tSNR.
    assert qc[6]["fd_mm"] is None and qc[6]["dvars"] is None
    assert qc[6]["outlier_reasons"] == ["non-finite"]
    assert qc[6]["tsnr_median"] == qc[5]["tsnr_median"]  # unchanged by it
    # The next DVARS compares volume 7 with volume 5, the last finite one.
    assert qc[7]["dvars"] is not None and qc[7]["dvars"] > 0


def test_a_checkpoint_that_cannot_be_written_loses_no_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    series = make_series()
    vols = volumes(12, series)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CheckpointStore, "write", full)
    motion = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    qc = QCStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    messages = [Message(v) for v in vols]
    messages.append(Message(SeriesEnd(series, ended=0.0, n_volumes=12)))
    out = run_chain(motion, qc, messages)
    assert (
        sorted(by_topic(out, topics.MOTION)) == sorted(by_topic(out, topics.QC)) == list(range(12))
    )
    assert out[-1].kind == "series-end"
    assert not any(m.topic == CHECKPOINT for m in out)
    warnings = [m.payload.values for m in out if m.topic == topics.WARNING]  # type: ignore[union-attr]
    assert {w["code"] for w in warnings} == {"checkpoint-failed"}
    assert "No space left on device" in warnings[0]["message"]
    # Tried again every checkpoint_every volumes (5, 10) and at the end, not on every volume.
    assert motion.counts["checkpoint_failed"] == qc.counts["checkpoint_failed"] == 3


def test_a_restarted_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    series = make_series()
    vols = volumes(24, series)
    whole = run_chain(MotionStage(), QCStage(), (Message(v) for v in vols))
    first_m = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    first_q = QCStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    before = run_chain(first_m, first_q, (Message(v) for v in vols[:17]))
    assert max(m.index for m in before if m.topic == CHECKPOINT) == 14
    # Both "die" after volume 16; new instances see the journal re-sent from 10,
    # with a stale 18 and 19 arriving first (still queued upstream at the restart).
    again_m = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    again_q = QCStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    resent = [vols[18], vols[19], *vols[10:]]
    after = run_chain(again_m, again_q, (Message(v) for v in resent))
    assert again_m.counts["restored"] == again_q.counts["restored"] == 1
    want_m, want_q = by_topic(whole, topics.MOTION), by_topic(whole, topics.QC)
    # Repeats (10..14) are re-emitted as first published; 15.. are computed again.
    got_m: dict[int, dict] = {}
    got_q: dict[int, dict] = {}
    for m in after:
        if m.topic in (topics.MOTION, topics.QC):
            target = got_m if m.topic == topics.MOTION else got_q
            target.setdefault(m.index, dict(m.payload.values))  # type: ignore[union-attr]
    assert sorted(got_q) == list(range(10, 24))
    for i in range(10, 24):
        assert got_m[i] == want_m[i]
        got_q[i].pop("latency_ms")
        want = dict(want_q[i])
        want.pop("latency_ms")
        assert got_q[i].keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got_q[i][key] == pytest.approx(value, rel=1e-9), (i, key)
            else:
                assert got_q[i][key] == value, (i, key)


def test_an_end_that_overtakes_resent_volumes_waits_for_them(tmp_path: Path) -> None:
    """After a restart, volumes queued before the crash and the series' end can
    arrive before the journal re-sends the ones the crash lost."""
    series = make_series()
    vols = volumes(20, series)
    whole = by_topic(run_chain(MotionStage(), QCStage(), (Message(v) for v in vols)), topics.QC)
    first_m = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    first_q = QCStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    run_chain(first_m, first_q, (Message(v) for v in vols[:12]))  # checkpoints at 4 and 9
    again_m = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    again_q = QCStage(checkpoint_dir=tmp_path, checkpoint_every=5)
    end = Message(SeriesEnd(series, ended=0.0, n_volumes=20))
    stale = [*(Message(v) for v in vols[15:]), end]
    out = run_chain(again_m, again_q, stale)
    assert [m.kind for m in out if m.kind == "series-end"] == []  # it waits
    out += run_chain(again_m, again_q, (Message(v) for v in vols[10:15]))
    ends = [i for i, m in enumerate(out) if m.kind == "series-end"]
    assert ends == [len(out) - 1]  # the end comes after every volume's results
    got = by_topic(out, topics.QC)
    assert sorted(got) == list(range(10, 20))
    for i in range(10, 20):
        assert got[i]["fd_mm"] == pytest.approx(whole[i]["fd_mm"], rel=1e-9)
    # The journal's own copies then come too (repeats, then its end): restored
    # from the end's checkpoint, they are repeats, and the end passes once more.
    out = run_chain(again_m, again_q, [*(Message(v) for v in vols[10:]), end])
    assert sorted(by_topic(out, topics.QC)) == list(range(10, 20))
    assert out[-1].kind == "series-end"


def test_a_second_end_stops_waiting_for_a_hole_that_never_fills() -> None:
    series = make_series()
    vols = volumes(10, series)
    motion, qc = MotionStage(), QCStage()
    run_chain(motion, qc, (Message(v) for v in vols[:4]))
    end = Message(SeriesEnd(series, ended=0.0, n_volumes=10))
    out = run_chain(motion, qc, [*(Message(v) for v in vols[6:]), end])
    assert not any(m.kind == "series-end" for m in out)
    out = run_chain(motion, qc, [end])
    # The hole is reported as gaps, so the stages after motion do not wait on it.
    assert [m.index for m in out if m.kind == "gap"] == [4, 5]
    assert sorted(by_topic(out, topics.QC)) == [6, 7, 8, 9]
    assert out[-1].kind == "series-end"
    assert motion.stats()["open_series"] == qc.stats()["open_series"] == 0


def test_repeats_of_a_series_this_stage_ended_and_let_go_are_dropped(tmp_path: Path) -> None:
    series = make_series()
    vols = volumes(6, series)
    motion = MotionStage(checkpoint_dir=tmp_path, checkpoint_every=100)
    qc = QCStage(checkpoint_dir=tmp_path, checkpoint_every=100)
    run_chain(motion, qc, [*(Message(v) for v in vols), Message(SeriesEnd(series, ended=0.0))])
    CheckpointStore.forget(tmp_path, series)  # what the hub does once the series is out
    out = run_chain(motion, qc, (Message(v) for v in vols[2:]))
    assert out == []  # not a new series starting at volume 2
    assert motion.counts["after_end"] == 4
    assert motion.stats()["open_series"] == 0
