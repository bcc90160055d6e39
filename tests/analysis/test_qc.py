"""QC metrics against direct batch numpy on the same arrays, and usable-data arithmetic."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from boldstream.analysis.motion import MotionCorrector, foreground_mask
from boldstream.analysis.qc import QCAccumulator, QCFrame, std_dvars_scale
from boldstream.analysis.usable import UsableData, minutes_to_goal
from boldstream.errors import AnalysisError

F64 = npt.NDArray[np.float64]
SHAPE = (9, 10, 8)


def _series(n: int, seed: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], F64]:
    """(n, *SHAPE) volumes with AR(1) voxel noise, a mask, and (n, 6) motion params."""
    rng = np.random.default_rng(seed)
    base = 100.0 + 20.0 * rng.random(SHAPE)
    phi = rng.uniform(-0.2, 0.7, SHAPE)
    noise = np.zeros((n, *SHAPE))
    noise[0] = rng.normal(size=SHAPE)
    for t in range(1, n):
        noise[t] = phi * noise[t - 1] + rng.normal(size=SHAPE)
    vols = (base + 2.0 * noise).astype(np.float32)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:-1, 2:-1, 1:-2] = True
    params = np.cumsum(rng.normal(0, [0.1, 0.1, 0.1, 0.001, 0.001, 0.001], (n, 6)), axis=0)
    return vols, mask, params


def _batch_std_dvars_scale(x: F64) -> float:
    """Nichols' denominator written out per voxel, independently of the module."""
    return _batch_scale_from(x, x)


def _batch_scale_from(sigma_frames: F64, all_frames: F64) -> float:
    """Nichols' denominator with sigma from ``sigma_frames`` and rho from ``all_frames``."""
    vals = []
    for v in range(all_frames.shape[1]):
        q1, q3 = np.percentile(sigma_frames[:, v], [25, 75])
        d = all_frames[:, v] - all_frames[:, v].mean()
        r = np.correlate(d, d, mode="full")[len(d) - 1 :]
        if r[0] == 0:
            continue
        vals.append((q3 - q1) / 1.349 * math.sqrt(2 * (1 - r[1] / r[0])))
    return float(np.mean(vals))


def _fd(p: F64) -> list[float | None]:
    out: list[float | None] = [None]
    for t in range(1, len(p)):
        d = np.abs(p[t] - p[t - 1])
        out.append(float(d[:3].sum() + 50.0 * d[3:].sum()))
    return out


def test_fd_dvars_global_and_tsnr_match_batch() -> None:
    vols, mask, params = _series(30)
    qc = QCAccumulator(mask, tr_s=2.0, std_dvars_voxels=None)
    frames = [qc.update(v, p) for v, p in zip(vols, params, strict=True)]
    x = vols[:, mask].astype(np.float64)  # (t, v)
    fd = _fd(params)
    for t, f in enumerate(frames):
        assert f.index == t
        if t == 0:
            assert f.fd_mm is None and f.dvars is None and f.tsnr_median is None
        else:
            assert f.fd_mm == pytest.approx(fd[t], rel=1e-12)
            assert f.dvars == pytest.approx(math.sqrt(np.mean((x[t] - x[t - 1]) ** 2)), rel=1e-9)
            tsnr = x[: t + 1].mean(axis=0) / x[: t + 1].std(axis=0, ddof=1)
            assert f.tsnr_median == pytest.approx(float(np.median(tsnr)), rel=1e-9)
        assert f.global_signal == pytest.approx(float(x[t].mean()), rel=1e-12)
    tsnr_map = qc.tsnr_map()
    expected = x.mean(axis=0) / x.std(axis=0, ddof=1)
    assert np.allclose(tsnr_map[mask], expected, rtol=1e-5)
    assert (tsnr_map[~mask] == 0).all()
    assert np.allclose(qc.mean_map()[mask], x.mean(axis=0), rtol=1e-6)


def test_std_dvars_matches_batch_after_warmup() -> None:
    vols, mask, params = _series(30, seed=1)
    qc = QCAccumulator(
        mask,
        tr_s=2.0,
        std_dvars_voxels=None,
        std_dvars_warmup=6,
        std_dvars_window=40,
        std_dvars_refresh=1,
    )
    x = vols[:, mask].astype(np.float64)
    for t, (v, p) in enumerate(zip(vols, params, strict=True)):
        f = qc.update(v, p)
        if t + 1 < 6:
            assert f.std_dvars is None
            continue
        scale = _batch_std_dvars_scale(x[: t + 1])
        assert qc.std_dvars_scale == pytest.approx(scale, rel=1e-4)
        assert f.dvars is not None
        assert f.std_dvars == pytest.approx(f.dvars / scale, rel=1e-4)


def _evenly_kept(n: int, window: int) -> list[int]:
    """Which of frames 0..n-1 the sigma sample holds: all, then every 2nd, 4th, ..."""
    stride = 1
    while n > window * stride:
        stride *= 2
    kept = list(range(0, n, stride))
    assert min(n, window // 2) <= len(kept) <= window
    return kept


def test_std_dvars_uses_the_whole_run_and_refreshes_on_schedule() -> None:
    vols, mask, params = _series(60, seed=2)
    x = vols[:, mask].astype(np.float64)
    qc = QCAccumulator(
        mask,
        tr_s=1.0,
        std_dvars_voxels=None,
        std_dvars_warmup=5,
        std_dvars_window=12,
        std_dvars_refresh=4,
    )
    for t, (v, p) in enumerate(zip(vols, params, strict=True)):
        f = qc.update(v, p)
        n = t + 1
        if n < 5:
            assert f.std_dvars is None
            continue
        seen = 5 + ((n - 5) // 4) * 4  # frames seen at the last recomputation
        # rho from every frame so far; sigma from frames spread evenly over them.
        sample = x[_evenly_kept(seen, 12)]
        scale = _batch_scale_from(sample, x[:seen])
        assert qc.std_dvars_scale == pytest.approx(scale, rel=1e-4), n
        if seen <= 12:  # the sample is the whole run: Nichols' estimate exactly
            assert scale == pytest.approx(_batch_std_dvars_scale(x[:seen]), rel=1e-9)
        assert f.std_dvars == pytest.approx(f.dvars / scale, rel=1e-4)


def test_std_dvars_follows_the_whole_run_not_its_last_minutes() -> None:
    """The noise of the first half still counts at the end (SPEC 3: the data so far)."""
    rng = np.random.default_rng(8)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    n = 400
    noise = np.where(np.arange(n) < n // 2, 12.0, 2.0)[:, None]
    x = 1000.0 + noise * rng.normal(size=(n, int(mask.sum())))
    qc = QCAccumulator(
        mask,
        tr_s=1.0,
        std_dvars_voxels=None,
        std_dvars_warmup=20,
        std_dvars_window=80,
        std_dvars_refresh=1,
    )
    vol = np.zeros(SHAPE)
    for t in range(n):
        vol[mask] = x[t]
        qc.update(vol, np.zeros(6))
    assert qc.std_dvars_scale == pytest.approx(
        _batch_scale_from(x[_evenly_kept(n, 80)], x), rel=1e-4
    )
    whole = _batch_std_dvars_scale(x)
    last_window = _batch_std_dvars_scale(x[-80:])  # what a sliding window would give
    assert qc.std_dvars_scale == pytest.approx(whole, rel=0.1)
    assert last_window < 0.5 * whole


def test_std_dvars_state_survives_a_checkpoint() -> None:
    vols, mask, params = _series(50, seed=4)
    options: dict[str, Any] = {
        "std_dvars_voxels": None,
        "std_dvars_warmup": 5,
        "std_dvars_window": 8,
        "std_dvars_refresh": 3,
    }
    straight = QCAccumulator(mask, tr_s=1.0, **options)
    first = QCAccumulator(mask, tr_s=1.0, **options)
    expected = [straight.update(v, p) for v, p in zip(vols, params, strict=True)]
    for v, p in zip(vols[:23], params[:23], strict=True):
        first.update(v, p)
    resumed = QCAccumulator(mask, tr_s=1.0, **options)
    resumed.restore(*first.state())
    got = [resumed.update(v, p) for v, p in zip(vols[23:], params[23:], strict=True)]
    assert [f.std_dvars for f in got] == [f.std_dvars for f in expected[23:]]
    assert resumed.std_dvars_scale == straight.std_dvars_scale


def test_std_dvars_voxel_subset_is_close_to_all_voxels() -> None:
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.normal(size=(60, 20000)), axis=0) * 0.2 + rng.normal(size=(60, 20000))
    full = std_dvars_scale(x)
    assert full is not None
    assert full == pytest.approx(_batch_std_dvars_scale(x[:, :500]), rel=0.1)
    sub = std_dvars_scale(x[:, np.linspace(0, 19999, 2000).astype(int)])
    assert sub == pytest.approx(full, rel=0.02)
    assert std_dvars_scale(np.ones((10, 5))) is None
    assert std_dvars_scale(x[:2]) is None


def test_outlier_flags() -> None:
    vols, mask, params = _series(30, seed=4)
    vols = vols.copy()
    params = 0.2 * params  # quiet: FD well under 0.5 mm
    params[25:] += [0.8, 0, 0, 0, 0, 0]  # a jerk: FD > 0.5 at frame 25
    vols[27] += 15.0 * np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
    qc = QCAccumulator(mask, tr_s=2.0, std_dvars_warmup=10)
    frames = [qc.update(v, p) for v, p in zip(vols, params, strict=True)]
    assert frames[25].outlier and "fd" in frames[25].outlier_reasons
    assert frames[27].outlier and "std_dvars" in frames[27].outlier_reasons
    assert frames[27].std_dvars is not None and frames[27].std_dvars > 1.5
    quiet = [f for i, f in enumerate(frames) if i not in (25, 27, 28)]
    assert not any(f.outlier for f in quiet[12:])
    custom = QCAccumulator(mask, tr_s=2.0, fd_outlier_mm=0.05)
    out = [custom.update(v, p) for v, p in zip(vols[:5], params[:5], strict=True)]
    assert any("fd" in f.outlier_reasons for f in out)


def test_non_finite_and_flagged_frames() -> None:
    vols, mask, params = _series(8, seed=6)
    bad = vols[4].copy()
    bad[mask.nonzero()[0][0], mask.nonzero()[1][0], mask.nonzero()[2][0]] = np.nan
    qc = QCAccumulator(mask, tr_s=2.0)
    seq = [*vols[:4], bad, vols[5]]
    frames = [qc.update(v, p) for v, p in zip(seq, params[:6], strict=True)]
    f = frames[4]
    assert f.dvars is None and f.global_signal is None and f.std_dvars is None
    assert f.outlier and f.outlier_reasons == ("non-finite",)
    x = vols[:, mask].astype(np.float64)
    assert frames[5].dvars == pytest.approx(math.sqrt(np.mean((x[5] - x[3]) ** 2)))
    kept = np.stack([x[0], x[1], x[2], x[3], x[5]])
    assert np.allclose(qc.tsnr_map()[mask], kept.mean(0) / kept.std(0, ddof=1), rtol=1e-5)
    assert frames[5].usable.frames_total == 6
    assert frames[5].usable.thresholds[-1].frames == 5  # the NaN frame is not good
    flagged = qc.update(vols[6], params[6], usable=False)
    assert flagged.outlier_reasons[-1] == "flagged"
    assert flagged.usable.thresholds[-1].frames == 5
    nan_params = qc.update(vols[7], [np.nan] * 6)
    assert nan_params.fd_mm is None


def test_flagged_frame_has_no_fd_and_the_next_compares_with_the_last_estimate() -> None:
    vols, mask, params = _series(6, seed=11)
    qc = QCAccumulator(mask, tr_s=2.0)
    frames = [qc.update(v, p) for v, p in zip(vols[:3], params[:3], strict=True)]
    # The motion stage repeats the last estimate for a volume it flagged.
    flagged = qc.update(vols[3], params[2], usable=False)
    assert flagged.fd_mm is None  # not 0.0: nothing was measured
    assert flagged.outlier_reasons == ("flagged",)
    assert flagged.dvars is not None  # its intensities were acquired
    after = qc.update(vols[4], params[4])
    expected = float(
        np.abs(params[4] - params[2])[:3].sum() + 50 * np.abs(params[4] - params[2])[3:].sum()
    )
    assert after.fd_mm == pytest.approx(expected)
    good_before = [t.frames for t in frames[2].usable.thresholds]
    assert [t.frames for t in flagged.usable.thresholds] == good_before  # never good
    assert after.usable.frames_total == 5


def test_filled_frame_and_lost_volume_keep_out_of_dvars_and_tsnr() -> None:
    vols, mask, params = _series(7, seed=12)
    qc = QCAccumulator(mask, tr_s=2.0)
    for v, p in zip(vols[:3], params[:3], strict=True):
        qc.update(v, p)
    filled = np.where(mask, 0.0, vols[3]).astype(np.float32)  # NaNs set to 0 upstream
    f = qc.update(filled, params[2], usable=False, acquired=False)  # motion flagged it
    assert f.dvars is None and f.global_signal is None
    assert f.outlier_reasons == ("non-finite",)
    good_before = [t.frames for t in f.usable.thresholds]
    summary = qc.lost()  # volume 4 never arrived
    assert summary.frames_total == 5
    assert [t.frames for t in summary.thresholds] == good_before  # never good
    g = qc.update(vols[5], params[5])
    x = vols[:, mask].astype(np.float64)
    assert g.dvars == pytest.approx(math.sqrt(np.mean((x[5] - x[2]) ** 2)))
    assert g.fd_mm == pytest.approx(
        float(
            np.abs(params[5] - params[2])[:3].sum() + 50 * np.abs(params[5] - params[2])[3:].sum()
        )
    )
    kept = np.stack([x[0], x[1], x[2], x[5]])
    assert np.allclose(qc.tsnr_map()[mask], kept.mean(0) / kept.std(0, ddof=1), rtol=1e-5)
    assert g.usable.frames_total == 6
    assert g.usable.minutes_total == pytest.approx(6 * 2.0 / 60)


def test_frames_are_json_ready() -> None:
    vols, mask, params = _series(25, seed=7)
    qc = QCAccumulator(mask, tr_s=0.8, std_dvars_warmup=5)
    for v, p in zip(vols, params, strict=True):
        f = qc.update(v, p)
        text = json.dumps(f.as_dict(), allow_nan=False)
        back = json.loads(text)
        assert back["index"] == f.index
        assert isinstance(f, QCFrame)
    assert back["std_dvars"] is not None and back["tsnr_median"] is not None


def test_setup_is_validated() -> None:
    mask = np.ones(SHAPE, dtype=bool)
    with pytest.raises(AnalysisError):
        QCAccumulator(np.zeros(SHAPE, dtype=bool), tr_s=2.0)
    with pytest.raises(AnalysisError):
        QCAccumulator(mask, tr_s=0.0)
    with pytest.raises(AnalysisError):
        QCAccumulator(mask, tr_s=2.0, std_dvars_warmup=30, std_dvars_window=20)
    qc = QCAccumulator(mask, tr_s=2.0)
    with pytest.raises(AnalysisError):
        qc.update(np.zeros((3, 3, 3)), np.zeros(6))


# ---------------------------------------------------------------- usable data


def test_usable_counts_by_hand() -> None:
    u = UsableData(tr_s=2.0, fd_thresholds=(0.2, 0.3, 0.5), goal_minutes=1.0)
    for fd in [None, 0.1, 0.25, 0.4, 0.6, 0.1]:
        s = u.add(fd)
    assert s.frames_total == 6 and s.minutes_total == pytest.approx(0.2)
    frames = [t.frames for t in s.thresholds]
    assert frames == [3, 4, 5]  # < 0.2: frames 0,1,5; < 0.3: +2; < 0.5: +3
    t02 = s.thresholds[0]
    assert t02.minutes == pytest.approx(3 * 2.0 / 60.0)
    assert t02.fraction == pytest.approx(0.5)
    assert t02.minutes_to_goal == pytest.approx((1.0 - 0.1) / 0.5)
    t05 = s.thresholds[2]
    assert t05.minutes_to_goal == pytest.approx((1.0 - 5 * 2.0 / 60.0) / (5 / 6))


def test_usable_threshold_is_strict_and_flags_count_as_bad() -> None:
    u = UsableData(tr_s=1.0, fd_thresholds=(0.2,))
    u.add(None)
    s = u.add(0.2)  # not below 0.2
    assert s.thresholds[0].frames == 1
    s = u.add(0.05, usable=False)
    assert s.thresholds[0].frames == 1
    s = u.add(float("nan"))
    assert s.thresholds[0].frames == 1 and s.frames_total == 4


def test_usable_prediction_edge_cases() -> None:
    u = UsableData(tr_s=60.0, fd_thresholds=(0.3,), goal_minutes=2.0)
    s = u.add(None, usable=False)
    assert s.thresholds[0].minutes_to_goal is None  # nothing good yet: zero rate
    s = u.add(0.1)
    assert s.thresholds[0].minutes_to_goal == pytest.approx(1.0 / 0.5)
    s = u.add(0.1)
    assert s.thresholds[0].minutes_to_goal == 0.0  # goal reached
    assert minutes_to_goal(0.0, 0.0, 12.5) is None
    assert minutes_to_goal(12.5, 0.0, 12.5) == 0.0
    assert minutes_to_goal(2.5, 0.8, 12.5) == pytest.approx(12.5)
    json.dumps(s.as_dict(), allow_nan=False)
    with pytest.raises(ValueError):
        UsableData(tr_s=-1.0)
    with pytest.raises(ValueError):
        UsableData(tr_s=1.0, fd_thresholds=())


def test_default_firmm_settings() -> None:
    s = UsableData(tr_s=0.8).add(None)
    assert [t.fd_threshold_mm for t in s.thresholds] == [0.2, 0.3, 0.5]
    assert s.goal_minutes == 12.5
    assert s.thresholds[0].minutes_to_goal == pytest.approx(12.5 - 0.8 / 60.0)


# -------------------------------------------------------- motion feeding QC


def test_motion_then_qc_on_a_synthetic_series(series_64: Any) -> None:
    vols = series_64.volumes
    mc = MotionCorrector(vols[0], series_64.geometry.vox2ras)
    qc = QCAccumulator(foreground_mask(vols[0]), tr_s=2.0, std_dvars_warmup=10)
    frames = []
    for v in vols:
        est = mc.register(v)
        frames.append(qc.update(est.corrected, est.params, usable=not est.flagged))
    fd_true = _fd(series_64.truth)
    fd_est = [f.fd_mm for f in frames]
    assert fd_est[0] is None
    assert np.corrcoef(np.array(fd_est[1:], float), np.array(fd_true[1:], float))[0, 1] > 0.98
    last = frames[-1]
    assert last.tsnr_median is not None and last.tsnr_median > 5
    assert last.usable.frames_total == len(vols)
    json.dumps(last.as_dict(), allow_nan=False)
