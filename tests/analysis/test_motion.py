"""Motion correction: geometry helpers, accuracy against known motion, robustness.

Accuracy is the rigid displacement between estimate and truth, RMS over a
50 mm sphere about the volume centre (Jenkinson 1999), which weighs
translations and rotations the way FD does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from boldstream.analysis.motion import (
    PARAM_NAMES,
    MotionCorrector,
    MotionEstimate,
    displacement_mm,
    foreground_mask,
    matrix_to_params,
    params_to_matrix,
    rms_displacement_mm,
    volume_centre,
)
from boldstream.errors import AnalysisError

F64 = npt.NDArray[np.float64]


def run_series(volumes: list[Any], vox2ras: F64, **options: Any) -> list[MotionEstimate]:
    mc = MotionCorrector(volumes[0], vox2ras, **options)
    return [mc.register(v) for v in volumes]


def errors_mm(estimates: list[MotionEstimate], truth: F64) -> F64:
    return np.array([rms_displacement_mm(e.params, truth[i]) for i, e in enumerate(estimates)])


def fd_trace(params: Any) -> F64:
    p = np.asarray(params, dtype=np.float64)
    return np.array([displacement_mm(p[i - 1], p[i]) for i in range(1, len(p))])


# ------------------------------------------------------------------ geometry


def test_params_matrix_round_trip_about_any_centre() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = np.concatenate([rng.uniform(-20, 20, 3), rng.uniform(-1.2, 1.2, 3)])
        c = rng.normal(0, 40, 3)
        m = params_to_matrix(p, centre=c)
        assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3))
        assert np.allclose(m[:3, :3] @ c + m[:3, 3], c + p[:3])  # the centre moves by t
        assert np.allclose(matrix_to_params(m, centre=c), p)


def test_rotation_order_is_rz_ry_rx() -> None:
    a = 0.3
    for axis in range(3):
        p = np.zeros(6)
        p[3 + axis] = a
        r = params_to_matrix(p)[:3, :3]
        assert np.isclose(r[axis, axis], 1.0)  # a pure rotation about that RAS axis
    p = np.array([0, 0, 0, 0.1, 0.2, 0.3])
    cx, cy, cz = np.cos(p[3:])
    sx, sy, sz = np.sin(p[3:])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    assert np.allclose(params_to_matrix(p)[:3, :3], rz @ ry @ rx)


def test_power_fd_formula() -> None:
    a = [0.1, -0.2, 0.3, 0.001, -0.002, 0.003]
    b = [0.3, 0.1, 0.2, -0.001, 0.0, 0.001]
    expected = 0.2 + 0.3 + 0.1 + 50.0 * (0.002 + 0.002 + 0.002)
    assert displacement_mm(a, b) == pytest.approx(expected)
    assert displacement_mm(a, b, radius=80.0) == pytest.approx(0.6 + 80.0 * 0.006)


def test_rms_displacement_matches_sampling_a_ball() -> None:
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(200_000, 3))
    pts *= (50.0 * rng.random(200_000) ** (1 / 3) / np.linalg.norm(pts, axis=1))[:, None]
    for _ in range(5):
        a = np.concatenate([rng.uniform(-3, 3, 3), rng.uniform(-0.05, 0.05, 3)])
        b = np.concatenate([rng.uniform(-3, 3, 3), rng.uniform(-0.05, 0.05, 3)])
        ma, mb = params_to_matrix(a), params_to_matrix(b)
        xa = pts @ ma[:3, :3].T + ma[:3, 3]
        xb = pts @ mb[:3, :3].T + mb[:3, 3]
        sampled = math.sqrt(float(np.mean(np.sum((xa - xb) ** 2, axis=1))))
        assert rms_displacement_mm(a, b) == pytest.approx(sampled, rel=5e-3)
    assert rms_displacement_mm(np.zeros(6), [1.0, 2.0, 2.0, 0, 0, 0]) == pytest.approx(3.0)


def test_volume_centre_is_the_middle_of_the_grid() -> None:
    aff = np.diag([-3.0, -3.0, 3.5, 1.0])
    aff[:3, 3] = [10.0, 20.0, -30.0]
    c = volume_centre(aff, (64, 64, 36))
    assert np.allclose(c, [10.0 - 3.0 * 31.5, 20.0 - 3.0 * 31.5, -30.0 + 3.5 * 17.5])


# ------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("name", ["series_64", "series_64_oblique", "series_90"])
def test_accuracy_against_known_motion(name: str, request: pytest.FixtureRequest) -> None:
    series = request.getfixturevalue(name)
    est = run_series(series.volumes, series.geometry.vox2ras)
    err = errors_mm(est, series.truth)
    assert not any(e.flagged for e in est), [e.reason for e in est if e.flagged]
    assert err.mean() < 0.03, err
    assert err.max() < 0.1, err
    fd_est = fd_trace([e.params for e in est])
    fd_true = fd_trace(series.truth)
    assert np.corrcoef(fd_est, fd_true)[0, 1] > 0.98
    assert np.abs(fd_est - fd_true).mean() < 0.05
    for e in est:
        assert all(math.isfinite(v) for v in e.params)
        assert e.converged and e.correlation > 0.95 and 0.5 < e.gain < 1.5
        assert e.corrected.dtype == np.float32 and np.isfinite(e.corrected).all()
        assert e.iterations >= 1
        assert list(e.confounds()) == list(PARAM_NAMES)


def test_motion_covers_the_stated_range(series_64: Any) -> None:
    peak = np.abs(series_64.truth).max(axis=0)
    assert peak[:3].max() == pytest.approx(3.0)
    assert math.degrees(peak[3:].max()) == pytest.approx(3.0)
    jumps = fd_trace(series_64.truth)
    assert jumps.max() > 1.0  # sudden jerks, not only drift


def test_corrected_volumes_line_up_with_the_reference(series_64: Any) -> None:
    vols = series_64.volumes
    mc = MotionCorrector(vols[0], series_64.geometry.vox2ras)
    brain = foreground_mask(vols[0])
    worst = int(np.argmax(np.abs(series_64.truth).sum(axis=1)))
    for e in (mc.register(v) for v in vols[: worst + 1]):
        last = e
    raw = float(np.mean((vols[worst] - vols[0])[brain] ** 2))
    fixed = float(np.mean((last.corrected - vols[0])[brain] ** 2))
    assert fixed < 0.2 * raw
    cubic = MotionCorrector(vols[0], series_64.geometry.vox2ras, reslice_order=3)
    out = cubic.reslice(vols[worst], cubic.params_to_world(last.params))
    assert float(np.mean((out - vols[0])[brain] ** 2)) < fixed


def test_simulator_phantom_run() -> None:
    from boldstream.simulator.phantom import make_phantom_run

    run = make_phantom_run(n_volumes=25, motion="heavy", orientation="oblique", seed=5)
    truth = np.asarray(run.truth["motion"]["parameters"])
    vols = list(run.iter_volumes())
    est = run_series(vols, run.vox2ras)
    assert np.allclose(run.truth["motion"]["centre_ras_mm"], volume_centre(run.vox2ras, run.shape))
    err = errors_mm(est, truth)
    assert not any(e.flagged for e in est), [e.reason for e in est if e.flagged]
    assert err.mean() < 0.1, err
    fd_est = fd_trace([e.params for e in est])
    if fd_trace(truth).std() > 0:
        assert np.corrcoef(fd_est, fd_trace(truth))[0, 1] > 0.95


# ---------------------------------------------------------------- robustness


def _stripes(shape: tuple[int, int], amplitude: float) -> F64:
    i, j = np.indices(shape)
    return amplitude * np.cos(2 * np.pi * (0.23 * i + 0.17 * j))


def _corruptions(clean: Any) -> dict[str, Any]:
    level = float(np.percentile(clean, 90))
    spike = clean.copy()
    spike[:, :, 18] += _stripes(spike.shape[:2], 0.6 * level).astype(np.float32)
    dropout = clean.copy()
    dropout[:, :, 20] *= 0.05
    nan = clean.copy()
    nan[10:20, 30, 5] = np.nan
    inf = clean.copy()
    inf[3, 3, 3] = np.inf
    noise = np.random.default_rng(9).random(clean.shape).astype(np.float32) * level
    return {
        "spike": spike,
        "dropout": dropout,
        "zero": np.zeros_like(clean),
        "nan": nan,
        "inf": inf,
        "noise": noise,
        "dim": clean * np.float32(0.3),
    }


@pytest.mark.parametrize("kind", ["spike", "dropout", "zero", "nan", "inf", "noise", "dim"])
def test_bad_volume_is_flagged_and_motion_falls_back(kind: str, series_64: Any) -> None:
    vols = series_64.volumes
    mc = MotionCorrector(vols[0], series_64.geometry.vox2ras)
    for v in vols[:8]:
        good = mc.register(v)
        assert not good.flagged
    bad = mc.register(_corruptions(vols[8])[kind])
    assert bad.flagged and bad.reason, kind
    assert bad.filled == (kind in ("nan", "inf")), kind  # only those were set to 0
    assert bad.params == good.params
    assert np.isfinite(bad.corrected).all()
    for value in (bad.correlation, bad.cost, bad.gain):
        assert math.isfinite(value)
    after = [mc.register(v) for v in vols[9:14]]
    assert not any(e.flagged for e in after)
    err = errors_mm(after, series_64.truth[9:14])
    assert err.max() < 0.1


def test_series_of_bad_volumes_never_crashes(series_64: Any) -> None:
    vols = series_64.volumes
    mc = MotionCorrector(vols[0], series_64.geometry.vox2ras)
    bad = list(_corruptions(vols[5]).values())
    out = [mc.register(v) for v in [*bad, vols[1], *bad]]
    assert [e.flagged for e in out] == [True] * len(bad) + [False] + [True] * len(bad)
    assert all(np.isfinite(e.params).all() and np.isfinite(e.corrected).all() for e in out)
    assert [e.index for e in out] == list(range(len(out)))


def test_invalid_setup_raises() -> None:
    ref = np.ones((16, 16, 16), dtype=np.float32)
    with pytest.raises(AnalysisError):
        MotionCorrector(ref, np.eye(4))  # no structure at all
    ref = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    with pytest.raises(AnalysisError):
        MotionCorrector(ref, np.zeros((4, 4)))
    with pytest.raises(AnalysisError):
        MotionCorrector(ref[..., 0], np.eye(4))
    bad = ref.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(AnalysisError):
        MotionCorrector(bad, np.eye(4))
    with pytest.raises(AnalysisError):
        MotionCorrector(ref, np.eye(4), mask=np.ones((8, 8, 8), dtype=bool))
    mc = MotionCorrector(ref, np.eye(4), mask=np.ones(ref.shape, dtype=bool))
    with pytest.raises(AnalysisError):
        mc.register(np.zeros((16, 16, 15), dtype=np.float32))


# --------------------------------------------------------- independent check


def _sitk_rigid(ref: Any, vol: Any, vox2ras: F64, centre: F64, mask: Any) -> F64:
    """SimpleITK Euler3D registration, mean squares, 2 levels; returns the 4x4."""
    import SimpleITK as sitk  # noqa: N813 (the package's own spelling)

    lin = vox2ras[:3, :3]
    spacing = np.sqrt((lin**2).sum(axis=0))

    def image(a: Any) -> Any:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(a).transpose(2, 1, 0)))
        img.SetSpacing([float(s) for s in spacing])
        img.SetOrigin([float(o) for o in vox2ras[:3, 3]])
        img.SetDirection([float(d) for d in (lin / spacing).ravel()])
        return img

    fixed = image(ref.astype(np.float32))
    moving = image(vol.astype(np.float32))
    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(c) for c in centre])
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricFixedMask(image(mask.astype(np.uint8)))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-5, numberOfIterations=400, relaxationFactor=0.6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(fixed, moving)
    m = np.eye(4)
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    m[:3, :3] = a
    m[:3, 3] = np.array(tx.GetTranslation()) + c - a @ c
    return m


def test_agrees_with_simpleitk_offline(series_64_oblique: Any) -> None:
    series = series_64_oblique
    vols = series.volumes[:14]
    geom = series.geometry
    mc = MotionCorrector(vols[0], geom.vox2ras)
    ours = [mc.register(v).params for v in vols]
    mask = foreground_mask(vols[0], dilate=2)
    theirs = [
        matrix_to_params(
            _sitk_rigid(vols[0], v, geom.vox2ras, geom.centre, mask), centre=geom.centre
        )
        for v in vols
    ]
    diff = np.array([rms_displacement_mm(a, b) for a, b in zip(ours, theirs, strict=True)])
    assert diff.mean() < 0.05, diff
    sitk_err = np.array(
        [rms_displacement_mm(b, t) for b, t in zip(theirs, series.truth, strict=False)]
    )
    assert sitk_err.mean() < 0.1, sitk_err  # the reference method itself is on target
