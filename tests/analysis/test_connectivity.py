"""Online seed connectivity: exact against batch numpy OLS + Pearson r, censoring, band-pass."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from boldstream.analysis.connectivity import (
    OnlineRegression,
    SeedConnectivity,
    bandpass,
    can_bandpass,
    nuisance_regressors,
)
from boldstream.analysis.registration import NativeRois, Registration
from boldstream.errors import AnalysisError

F64 = npt.NDArray[np.float64]


def batch_partial_r(y: F64, s: F64, x: F64) -> F64:
    """Plain numpy: residuals of y and s on [1, x] by lstsq, then Pearson r."""
    design = np.column_stack([np.ones(len(s)), x])
    ry = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    rs = s - design @ np.linalg.lstsq(design, s, rcond=None)[0]
    out: F64 = (rs @ ry) / np.sqrt((ry * ry).sum(axis=0) * (rs @ rs))
    return out


def test_online_regression_equals_batch_ols() -> None:
    rng = np.random.default_rng(3)
    t, v, k = 150, 400, 12
    x = rng.standard_normal((t, k))
    x[:, 3:6] *= 1e-3  # rotations in radians next to millimetres
    x[:, 7] = 0.0  # a regressor that is constant so far (still run)
    s = rng.standard_normal(t) + 0.5 * x[:, 0]
    y = 1000.0 + 10.0 * rng.standard_normal((t, v)) + np.outer(s, rng.standard_normal(v))
    y += x @ rng.standard_normal((k, v)) * 3.0
    online = OnlineRegression(v, k)
    for i in range(t):
        online.add(y[i], s[i], x[i])
    expected = batch_partial_r(y, s, x)
    np.testing.assert_allclose(online.correlation(), expected, atol=1e-6, rtol=0)
    assert online.n == t


def test_online_regression_is_stable_with_a_large_offset() -> None:
    """Welford centring: a 1e6 baseline does not eat the 1e-2 fluctuations."""
    rng = np.random.default_rng(4)
    t, v = 300, 50
    x = rng.standard_normal((t, 3))
    s = rng.standard_normal(t)
    y = 1e6 + 1e-2 * (rng.standard_normal((t, v)) - 0.5 * s[:, None])
    online = OnlineRegression(v, 3)
    for i in range(t):
        online.add(y[i], s[i], x[i])
    expected = batch_partial_r(y - 1e6, s, x)
    np.testing.assert_allclose(online.correlation(), expected, atol=1e-6, rtol=0)


def _small_rois(shape: tuple[int, int, int] = (12, 10, 8)) -> NativeRois:
    brain = np.zeros(shape, dtype=bool)
    brain[1:-1, 1:-1, 1:-1] = True
    seed = np.zeros(shape, dtype=bool)
    seed[2:4, 2:4, 2:4] = True
    search = np.zeros(shape, dtype=bool)
    search[6:10, 4:8, 3:6] = True
    wm = np.zeros(shape, dtype=bool)
    wm[4:6, 6:8, 5:7] = True
    csf = np.zeros(shape, dtype=bool)
    csf[8:10, 2:4, 1:3] = True
    vox2ras = np.diag([-3.0, -3.0, 3.0, 1.0])
    vox2ras[:3, 3] = (15.0, 12.0, -10.0)
    reg = Registration(
        native2mni=np.eye(4), dice=1.0, correlation=1.0, iterations=0, converged=True
    )
    return NativeRois(brain, seed, search & brain, wm, csf, vox2ras, reg)


def _series(
    rois: NativeRois, n: int, rng: np.random.Generator
) -> tuple[list[npt.NDArray[np.float32]], F64]:
    shape = rois.brain.shape
    seed_course = rng.standard_normal(n)
    params = np.cumsum(rng.standard_normal((n, 6)) * [0.05, 0.05, 0.05, 5e-4, 5e-4, 5e-4], axis=0)
    jumps = [i for i in (20, 21, 45) if i < n]
    params[jumps] += [1.0, 0.0, 0.5, 0.0, 0.0, 0.0]  # FD > 0.5 mm around these
    weights = rng.standard_normal(shape)
    vols = []
    for t in range(n):
        v = 1000.0 + 20.0 * rng.standard_normal(shape) + 15.0 * weights * seed_course[t]
        v += 30.0 * params[t, 0]
        vols.append(v.astype(np.float32))
    return vols, params


def test_seed_connectivity_equals_batch_with_censoring() -> None:
    rng = np.random.default_rng(5)
    rois = _small_rois()
    vols, params = _series(rois, 80, rng)
    conn = SeedConnectivity(rois, tr_s=2.0, fd_censor_mm=0.5)
    frames = [conn.update(v, p) for v, p in zip(vols, params, strict=True)]
    # batch: the same regressors built independently, censored frames dropped
    brain = np.flatnonzero(rois.brain)
    rows, ys, ss, xs = [], [], [], []
    for t, v in enumerate(vols):
        flat = v.reshape(-1).astype(np.float64)
        fd = None if t == 0 else float(np.abs(params[t] - params[t - 1]) @ [1, 1, 1, 50, 50, 50])
        d = np.zeros(6) if t == 0 else params[t] - params[t - 1]
        signals = [
            flat[brain].mean(),
            flat[np.flatnonzero(rois.wm)].mean(),
            flat[np.flatnonzero(rois.csf)].mean(),
        ]
        if fd is not None and fd > 0.5:
            assert frames[t].censored and "fd" in frames[t].reasons
            continue
        assert not frames[t].censored
        rows.append(t)
        ys.append(flat[brain])
        ss.append(flat[np.flatnonzero(rois.seed)].mean())
        xs.append(np.concatenate([params[t], d, signals]))
    assert 0 < len(rows) < len(vols)
    expected = batch_partial_r(np.array(ys), np.array(ss), np.array(xs))
    running = conn.running_map().reshape(-1)[brain]
    np.testing.assert_allclose(running, expected, atol=1e-6, rtol=0)
    assert conn.good_frames == len(rows)
    # the exact recompute from the buffer (no band-pass) gives the same numbers
    maps = conn.search_maps(bandpassed=False)
    in_brain = np.searchsorted(brain, np.flatnonzero(rois.search))
    np.testing.assert_allclose(maps.all, expected[in_brain], atol=1e-6, rtol=0)
    assert maps.first is not None and maps.second is not None


def test_maps_say_whether_they_were_bandpassed() -> None:
    """sosfiltfilt needs more rows than it pads with (15 for the band-pass):
    below that the maps are of unfiltered data and must not claim a filter."""
    rois = _small_rois()
    vols, params = _series(rois, 17, np.random.default_rng(9))
    conn = SeedConnectivity(rois, tr_s=2.0, motion_model="6")
    for t, (v, p) in enumerate(zip(vols, params, strict=True)):
        conn.update(v, p)
        if t + 1 in (15, 16):
            assert can_bandpass(t + 1, 2.0, 0.01, 0.1) is (t + 1 == 16)
            maps = conn.search_maps()
            assert maps.bandpassed is (t + 1 == 16), t + 1
            unfiltered = conn.search_maps(bandpassed=False)
            same = np.allclose(maps.all, unfiltered.all, equal_nan=True)
            assert same is (t + 1 == 15)


def test_a_lost_volume_keeps_its_place_in_time() -> None:
    rois = _small_rois()
    vols, params = _series(rois, 30, np.random.default_rng(10))
    conn = SeedConnectivity(rois, tr_s=2.0, motion_model="6")
    frames = []
    for t, (v, p) in enumerate(zip(vols, params, strict=True)):
        if t == 12:
            conn.missing()  # volume 12 never arrived
            continue
        frames.append(conn.update(v, p))
    assert conn.frames == 30
    good = conn.buffered()[3]
    assert good.size == 30 and not good[12]
    assert conn.good_frames == int(good.sum()) < 29
    after = frames[12]  # volume 13: its FD spans the lost TR
    d = np.abs(params[13] - params[11])
    assert after.fd_mm == pytest.approx(float(d[:3].sum() + 50.0 * d[3:].sum()))
    maps = conn.search_maps()
    assert maps.bandpassed and np.isfinite(maps.all).any()


def test_flagged_and_non_finite_frames_are_censored() -> None:
    rois = _small_rois()
    rng = np.random.default_rng(6)
    vols, _ = _series(rois, 5, rng)
    conn = SeedConnectivity(rois, tr_s=1.0)
    zero = np.zeros(6)
    assert not conn.update(vols[0], zero).censored
    assert conn.update(vols[1], zero, usable=False).reasons == ("flagged",)
    bad = vols[2].copy()
    bad[5, 5, 5] = np.nan
    assert conn.update(bad, zero).reasons == ("non-finite",)
    assert conn.good_frames == 1 and conn.frames == 3 and conn.censored_frames == 2
    with pytest.raises(AnalysisError):
        conn.update(np.zeros((3, 3, 3)), zero)


def test_nuisance_models() -> None:
    p, prev = np.arange(6.0), np.ones(6)
    assert nuisance_regressors(p, None, [1, 2, 3], motion_model="6").size == 9
    x12 = nuisance_regressors(p, prev, [1, 2, 3])
    assert x12.size == 15
    np.testing.assert_array_equal(x12[6:12], p - prev)
    x24 = nuisance_regressors(p, prev, [1, 2, 3], motion_model="24")
    np.testing.assert_array_equal(x24[12:18], p * p)
    with pytest.raises(AnalysisError):
        nuisance_regressors(p, prev, [1], motion_model="36")  # type: ignore[arg-type]


def test_bandpass_keeps_the_band_and_bridges_censored_frames() -> None:
    tr, n = 2.0, 300
    t = np.arange(n) * tr
    slow = np.sin(2 * np.pi * 0.05 * t)
    fast = np.sin(2 * np.pi * 0.2 * t)
    drift = 0.02 * t
    good = np.ones(n, dtype=bool)
    data = np.column_stack([slow + fast + drift, slow])
    data[100, 0] += 50.0  # a spike on a censored frame
    good[100] = False
    out = bandpass(data, tr, 0.01, 0.1, good)
    inner = slice(40, -40)
    assert np.corrcoef(out[inner, 0], slow[inner])[0, 1] > 0.98
    assert np.abs(out[90:110, 0] - out[90:110, 1]).max() < 0.2  # no ringing from the spike


def test_ring_buffer_keeps_the_last_frames_in_order() -> None:
    rois = _small_rois()
    rng = np.random.default_rng(8)
    vols, _ = _series(rois, 40, rng)
    conn = SeedConnectivity(rois, tr_s=60.0 / 20, buffer_minutes=1.0)  # 20 frames, min 16
    assert conn.capacity == 20
    for v in vols:
        conn.update(v, np.zeros(6))
    y, s, _, good = conn.buffered()
    assert y.shape[0] == 20 and good.all()
    seed_index = np.flatnonzero(rois.seed)
    expected = [float(v.reshape(-1)[seed_index].astype(np.float64).mean()) for v in vols[-20:]]
    np.testing.assert_allclose(s, expected)
    assert conn.nbytes > 0


def test_voxels_that_leave_the_slab_are_dropped() -> None:
    rois = _small_rois()
    rng = np.random.default_rng(9)
    vols, _ = _series(rois, 30, rng)
    conn = SeedConnectivity(rois, tr_s=2.0, fd_censor_mm=100.0)
    shift = np.zeros(6)
    for i, v in enumerate(vols):
        shift[2] = 0.2 * i  # the head slides 6 mm in z: the top slice samples beyond the slab
        conn.update(v, shift)
    top = np.zeros(rois.brain.shape, dtype=bool)
    top[:, :, -2] = True  # last brain slice (the outer one is not brain)
    in_fov = np.zeros(rois.brain.shape, dtype=bool)
    in_fov.reshape(-1)[conn.brain_index[conn.in_fov]] = True
    assert not (in_fov & top).any()
    assert in_fov[:, :, 2].sum() == rois.brain[:, :, 2].sum()
    assert (conn.running_map()[top] == 0).all()


def test_state_and_restore_carry_on_exactly_also_after_the_buffer_wraps() -> None:
    rois = _small_rois()
    rng = np.random.default_rng(8)
    vols, params = _series(rois, 60, rng)

    # 0.5 min at TR 1 s: a 30-frame buffer (16 is the floor) that wraps at frame 30
    def make() -> SeedConnectivity:
        return SeedConnectivity(rois, tr_s=1.0, fd_censor_mm=0.5, buffer_minutes=0.5)

    for cut in (10, 45):
        whole, half = make(), make()
        for v, p in zip(vols[:cut], params[:cut], strict=True):
            whole.update(v, p)
            half.update(v, p)
        scalars, arrays = half.state()
        resumed = make()
        resumed.restore(scalars, {k: np.array(a) for k, a in arrays.items()})
        for v, p in zip(vols[cut:], params[cut:], strict=True):
            a, b = whole.update(v, p), resumed.update(v, p)
            assert (a.censored, a.fd_mm, a.good_frames) == (b.censored, b.fd_mm, b.good_frames)
        assert resumed.frames == whole.frames == 60
        np.testing.assert_array_equal(resumed.running_map(), whole.running_map())
        np.testing.assert_array_equal(
            resumed.search_maps(surrogates=5).all, whole.search_maps(surrogates=5).all
        )


def test_restore_refuses_a_state_of_other_masks() -> None:
    rois = _small_rois()
    rng = np.random.default_rng(9)
    vols, params = _series(rois, 5, rng)
    conn = SeedConnectivity(rois, tr_s=2.0)
    for v, p in zip(vols, params, strict=True):
        conn.update(v, p)
    scalars, arrays = conn.state()
    smaller = rois.search.copy()
    smaller.reshape(-1)[np.flatnonzero(smaller)[0]] = False
    other = NativeRois(
        brain=rois.brain,
        seed=rois.seed,
        search=smaller,
        wm=rois.wm,
        csf=rois.csf,
        vox2ras=rois.vox2ras,
        registration=rois.registration,
    )
    with pytest.raises(AnalysisError, match="buffer_y"):
        SeedConnectivity(other, tr_s=2.0).restore(scalars, arrays)
