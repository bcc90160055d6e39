"""Running seed connectivity with exact online nuisance regression (SPEC section 4).

Two maps of the partial correlation between the sgACC seed's mean signal and
each voxel, controlling for the nuisance regressors:

- :class:`OnlineRegression`, every brain voxel, updated per volume in
  ``O(V k)``. It keeps Welford running means and centred co-moments of
  ``z = (x_1..x_k, s)`` and of every voxel ``y``::

      n += 1;  dz = z - m_z;  m_z += dz / n;  dy = y - m_y;  m_y += dy / n
      C_zz += dz (z - m_z)'    C_zy += dz (y - m_y)'    C_yy += dy (y - m_y)

  (centred co-moments, never a raw sum of squares). These are the sufficient
  statistics ``S_XX, S_Xy, S_Xs, S_yy, S_ys, S_ss`` of SPEC 4 about the
  running means, which is the same as having an intercept column in ``X``.
  The partial correlation is then exact OLS::

      cov = C_ys - C_Xy' C_XX^+ C_Xs,  var_y = C_yy - C_Xy' C_XX^+ C_Xy,
      var_s = C_ss - C_Xs' C_XX^+ C_Xs,  r = cov / sqrt(var_y var_s)

  with ``C_XX^+`` a pseudo-inverse on standardised columns (a regressor that
  is constant so far, e.g. motion in a still run, drops out exactly as
  ``lstsq`` drops it). Reading the map costs ``O(V k^2)`` in one BLAS call.
- The band-passed map (0.01-0.1 Hz) of the search region: a band-pass is not
  causal, so :class:`SeedConnectivity` keeps a ring buffer of the search
  region's voxels, the seed and the regressors of every frame, and
  :meth:`SeedConnectivity.search_maps` recomputes exactly from it (censored
  frames linearly interpolated, then data and regressors filtered alike with
  a zero-phase 2nd-order Butterworth, then OLS and Pearson r over the
  uncensored frames only). It also gives the maps of the first and second
  halves of the uncensored frames, for the split-half reliability.

Nuisance model (SPEC 4): 6 motion parameters and their backward differences
(``"12"``; ``"24"`` adds the squares of those 12; ``"6"`` only the
parameters), the global signal (brain mean), white-matter and CSF means,
and the intercept. A frame is censored (left out of every sum, kept in the
buffer for filtering) when its FD exceeds ``fd_censor_mm`` (0.5 mm), when
motion correction flagged it, or when it has non-finite values.

Memory for a 15-min 90x90x60 run at TR 0.8 s (1,125 frames; measured by
``benchmarks/connectivity.py`` on the phantom): 140,000 brain voxels x 16
float64 co-moment rows plus means and variances (20 MB), and a ring buffer of
3,200 search voxels x 1,125 float32 frames (14 MB; 29 MB at the default
``buffer_minutes`` = 30): 35 MB held per series, whatever the run length
beyond the buffer. A target recompute allocates about 190 MB transiently
(band-pass and OLS on the buffer in float64) and frees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import signal

from boldstream.analysis._rigid import displacement_mm, params_to_matrix, volume_centre
from boldstream.analysis.registration import NativeRois
from boldstream.analysis.significance import surrogate_correlations
from boldstream.errors import AnalysisError

__all__ = [
    "ConnectivityFrame",
    "OnlineRegression",
    "SearchMaps",
    "SeedConnectivity",
    "bandpass",
    "can_bandpass",
    "nuisance_regressors",
    "partial_correlation",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
MotionModel = Literal["6", "12", "24"]
#: Voxels: how far beyond the slab's outer voxel centres a sample may fall.
_FOV_TOLERANCE = 0.5


def _pinv_sqrt(cxx: F64) -> F64:
    """``W`` with ``W' W = C^+`` on the columns with variance (standardised first)."""
    d = np.sqrt(np.clip(np.diag(cxx), 0.0, None))
    keep = d > 1e-12 * max(float(d.max()), 1e-300) if d.size else np.zeros(0, dtype=bool)
    k = cxx.shape[0]
    if not keep.any():
        return np.zeros((0, k))
    dk = d[keep]
    corr = cxx[np.ix_(keep, keep)] / np.outer(dk, dk)
    vals, vecs = np.linalg.eigh(corr)
    ok = vals > 1e-10 * float(vals.max())
    w_small = (vecs[:, ok] / np.sqrt(vals[ok])).T / dk  # (r, kept)
    out = np.zeros((w_small.shape[0], k))
    out[:, keep] = w_small
    return out


def partial_correlation(cxx: F64, cxs: F64, css: float, cxy: F64, cys: F64, cyy: F64) -> F64:
    """Pearson r of the OLS residuals of ``y`` and ``s`` on ``x``, from centred co-moments.

    ``cxx`` (k, k), ``cxs`` (k,), ``css`` scalar, ``cxy`` (k, V), ``cys`` and
    ``cyy`` (V,). Voxels (or a seed) without residual variance get NaN.
    """
    w = _pinv_sqrt(cxx)
    by = w @ cxy  # (r, V)
    bs = w @ cxs
    cov = cys - bs @ by
    var_y = cyy - np.einsum("rv,rv->v", by, by)
    var_s = css - float(bs @ bs)
    out = np.full(cov.shape, np.nan)
    scale_y = np.maximum(np.abs(cyy), 1e-300)
    ok = (var_y > 1e-12 * scale_y) & (var_s > 1e-12 * max(abs(css), 1e-300))
    out[ok] = cov[ok] / np.sqrt(var_y[ok] * var_s)
    np.clip(out, -1.0, 1.0, out=out)
    return out


class OnlineRegression:
    """Exact running partial correlation of ``V`` voxels with a seed; see the module doc."""

    def __init__(self, n_voxels: int, n_regressors: int) -> None:
        if n_voxels < 1 or n_regressors < 0:
            raise AnalysisError("need at least one voxel and zero or more regressors")
        self.n_voxels = int(n_voxels)
        self.k = int(n_regressors)
        self.n = 0
        self._mz = np.zeros(self.k + 1)
        self._czz = np.zeros((self.k + 1, self.k + 1))
        self._my = np.zeros(self.n_voxels)
        self._czy = np.zeros((self.k + 1, self.n_voxels))
        self._cyy = np.zeros(self.n_voxels)

    def add(self, y: npt.ArrayLike, s: float, x: npt.ArrayLike) -> None:
        """One frame: voxel values ``y`` (V,), seed ``s``, regressors ``x`` (k,)."""
        yv = np.asarray(y, dtype=np.float64).reshape(-1)
        z = np.empty(self.k + 1)
        z[: self.k] = np.asarray(x, dtype=np.float64).reshape(-1)
        z[self.k] = float(s)
        if yv.size != self.n_voxels:
            raise AnalysisError(f"expected {self.n_voxels} voxel values, got {yv.size}")
        self.n += 1
        inv_n = 1.0 / self.n
        dz = z - self._mz
        self._mz += dz * inv_n
        self._czz += np.outer(dz, z - self._mz)
        dy = yv - self._my
        self._my += dy * inv_n
        dy_new = yv - self._my
        for i in range(self.k + 1):
            if dz[i] != 0.0:
                self._czy[i] += dz[i] * dy_new
        dy *= dy_new
        self._cyy += dy

    def correlation(self) -> F64:
        """Partial correlation per voxel (NaN before 3 frames or without variance)."""
        if self.n < 3:
            return np.full(self.n_voxels, np.nan)
        k = self.k
        return partial_correlation(
            self._czz[:k, :k],
            self._czz[:k, k],
            float(self._czz[k, k]),
            self._czy[:k],
            self._czy[k],
            self._cyy,
        )

    def state(self) -> dict[str, F64]:
        """The running sums as arrays (checkpoints)."""
        return {
            "mz": self._mz,
            "czz": self._czz,
            "my": self._my,
            "czy": self._czy,
            "cyy": self._cyy,
        }

    def restore(self, n: int, arrays: dict[str, npt.NDArray[np.floating]]) -> None:
        self.n = int(n)
        self._mz = np.array(arrays["mz"], dtype=np.float64)
        self._czz = np.array(arrays["czz"], dtype=np.float64)
        self._my = np.array(arrays["my"], dtype=np.float64)
        self._czy = np.array(arrays["czy"], dtype=np.float64)
        self._cyy = np.array(arrays["cyy"], dtype=np.float64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state().values())


def nuisance_regressors(
    params: npt.ArrayLike,
    previous: npt.ArrayLike | None,
    signals: npt.ArrayLike,
    *,
    motion_model: MotionModel = "12",
) -> F64:
    """One frame's regressors: motion (+ differences, + squares) then ``signals``.

    ``params`` are the 6 motion parameters, ``previous`` those of the frame
    before (None for the first frame: differences 0), ``signals`` the global,
    WM and CSF means. The intercept is implicit (centring).
    """
    p = np.asarray(params, dtype=np.float64).reshape(6)
    parts = [p]
    if motion_model in ("12", "24"):
        d = np.zeros(6) if previous is None else p - np.asarray(previous, dtype=np.float64)
        parts.append(d)
        if motion_model == "24":
            parts.extend([p * p, d * d])
    elif motion_model != "6":
        raise AnalysisError(f"motion_model must be '6', '12' or '24', not {motion_model!r}")
    parts.append(np.asarray(signals, dtype=np.float64).reshape(-1))
    return np.concatenate(parts)


def _butterworth(tr_s: float, low_hz: float, high_hz: float) -> F64:
    """Second-order sections of the band-pass (a high-pass when ``high_hz`` >= Nyquist)."""
    if high_hz < 0.5 / tr_s:
        sos: F64 = signal.butter(
            2, [low_hz, high_hz], btype="bandpass", fs=1.0 / tr_s, output="sos"
        )
    else:
        sos = signal.butter(2, low_hz, btype="highpass", fs=1.0 / tr_s, output="sos")
    return sos


def _padlen(sos: F64) -> int:
    """Rows ``sosfiltfilt`` pads with: a series must be longer to be filtered."""
    return 3 * (2 * int(sos.shape[0]) + 1)


def can_bandpass(frames: int, tr_s: float, low_hz: float, high_hz: float) -> bool:
    """Whether :func:`bandpass` filters ``frames`` rows (fewer: it only demeans them)."""
    return frames > _padlen(_butterworth(tr_s, low_hz, high_hz))


def bandpass(data: F64, tr_s: float, low_hz: float, high_hz: float, good: npt.ArrayLike) -> F64:
    """Zero-phase band-pass of the columns of ``data`` (T, n); censored rows interpolated.

    Rows where ``good`` is False are replaced by linear interpolation between
    the nearest good rows (held at the ends) before filtering, so a motion
    spike does not ring into its neighbours. A 2nd-order Butterworth run
    forwards and backwards (``sosfiltfilt``); ``high_hz`` at or above Nyquist
    makes it a high-pass. Too few rows to filter: returned as is (demeaned).
    """
    x = np.array(data, dtype=np.float64)
    mask = np.asarray(good, dtype=bool)
    t = x.shape[0]
    if mask.sum() >= 2 and not mask.all():
        idx = np.arange(t)
        gi = idx[mask]
        pos = np.searchsorted(gi, idx[~mask])
        lo = gi[np.clip(pos - 1, 0, gi.size - 1)]
        hi = gi[np.clip(pos, 0, gi.size - 1)]
        span = np.where(hi != lo, hi - lo, 1)
        frac = np.clip((idx[~mask] - lo) / span, 0.0, 1.0)[:, None]
        x[~mask] = x[lo] * (1.0 - frac) + x[hi] * frac
    sos = _butterworth(tr_s, low_hz, high_hz)
    x -= x.mean(axis=0)
    if t <= _padlen(sos):
        return x
    out: F64 = signal.sosfiltfilt(sos, x, axis=0)
    return out


def _residualise(y: F64, s: F64, x: F64) -> tuple[F64, F64, F64]:
    """Residuals of ``y`` (T, V) and ``s`` (T,) on ``[1, x]``, and that design's basis."""
    design = np.column_stack([np.ones(y.shape[0]), x])
    # standardise the regressors so that rank decisions do not depend on units
    sd = design.std(axis=0)
    sd[0] = 1.0
    keep = (sd > 1e-12) | (np.arange(design.shape[1]) == 0)
    design = design[:, keep] / np.where(sd[keep] > 0, sd[keep], 1.0)
    q, rr = np.linalg.qr(design)
    rank_ok = np.abs(np.diag(rr)) > 1e-10 * np.abs(np.diag(rr)).max()
    q = q[:, rank_ok]
    ry = y - q @ (q.T @ y)
    rs = s - q @ (q.T @ s)
    return ry, rs, q


def _pearson(ry: F64, rs: F64) -> F64:
    num = rs @ ry
    den = np.sqrt(np.einsum("tv,tv->v", ry, ry) * float(rs @ rs))
    out = np.full(ry.shape[1], np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _ols_correlation(y: F64, s: F64, x: F64) -> F64:
    """Pearson r of the residuals of ``y`` (T, V) and ``s`` (T,) on ``[1, x]``."""
    ry, rs, _ = _residualise(y, s, x)
    return _pearson(ry, rs)


@dataclass(frozen=True, slots=True)
class ConnectivityFrame:
    """What happened to one frame."""

    index: int
    censored: bool
    #: Why it was censored ("fd", "flagged", "non-finite"), empty otherwise.
    reasons: tuple[str, ...]
    fd_mm: float | None
    good_frames: int
    frames: int


@dataclass(frozen=True, slots=True, eq=False)
class SearchMaps:
    """Correlations over the search voxels from the buffer (NaN where undefined)."""

    all: F64
    #: First and second halves of the uncensored frames (None if too few).
    first: F64 | None
    second: F64 | None
    good_frames: int
    bandpassed: bool
    #: Correlations of phase-randomised seeds with the same voxels (n, V), for
    #: :mod:`boldstream.analysis.significance`; None unless asked for.
    null: F64 | None = None


class SeedConnectivity:
    """Seed-based connectivity of one series on its native grid; see the module doc.

    ``update(volume, params, fd_mm=..., usable=...)`` per motion-corrected
    volume (in acquisition order). ``running_map()`` is the online map of every
    brain voxel, ``search_maps()`` the exact recompute (band-passed or not)
    of the search region from the ring buffer.
    """

    def __init__(
        self,
        rois: NativeRois,
        *,
        tr_s: float,
        fd_censor_mm: float = 0.5,
        motion_model: MotionModel = "12",
        bandpass_hz: tuple[float, float] = (0.01, 0.1),
        buffer_minutes: float = 30.0,
        fd_radius_mm: float = 50.0,
    ) -> None:
        if not tr_s > 0:
            raise AnalysisError(f"tr_s must be positive, not {tr_s}")
        if not 0 < bandpass_hz[0] < bandpass_hz[1]:
            raise AnalysisError(f"band-pass needs 0 < low < high, not {bandpass_hz}")
        self.rois = rois
        self.shape = rois.brain.shape
        self.tr_s = float(tr_s)
        self.fd_censor_mm = float(fd_censor_mm)
        self.motion_model: MotionModel = motion_model
        self.bandpass_hz = (float(bandpass_hz[0]), float(bandpass_hz[1]))
        self.fd_radius_mm = fd_radius_mm
        self.brain_index = np.flatnonzero(rois.brain)
        self.search_index = np.flatnonzero(rois.search)
        self.seed_index = np.flatnonzero(rois.seed)
        self._wm_index = np.flatnonzero(rois.wm)
        self._csf_index = np.flatnonzero(rois.csf)
        k = nuisance_regressors(np.zeros(6), None, np.zeros(3), motion_model=motion_model).size
        self.n_regressors = k
        self.regression = OnlineRegression(self.brain_index.size, k)
        self.capacity = max(16, math.ceil(buffer_minutes * 60.0 / self.tr_s))
        self._y = np.zeros((self.capacity, self.search_index.size), dtype=np.float32)
        self._s = np.zeros(self.capacity)
        self._x = np.zeros((self.capacity, k))
        self._good = np.zeros(self.capacity, dtype=bool)
        self.frames = 0
        self.good_frames = 0
        self._prev_params: F64 | None = None
        # Where each brain voxel's data came from in the raw slab (field of view check).
        vox2ras = np.asarray(rois.vox2ras, dtype=np.float64)
        self._vox2ras = vox2ras
        self._ras2vox = np.linalg.inv(vox2ras)
        self._centre = volume_centre(vox2ras, self.shape)
        ijk = np.array(np.unravel_index(self.brain_index, self.shape), dtype=np.float64)
        self._brain_ras = vox2ras[:3, :3] @ ijk + vox2ras[:3, 3:4]
        self._fov_hi = np.asarray(self.shape, dtype=np.float64)[:, None] - 1.0 + _FOV_TOLERANCE
        #: Brain voxels whose data stayed inside the slab in every uncensored frame.
        self.in_fov = np.ones(self.brain_index.size, dtype=bool)
        self._search_in_brain = np.searchsorted(self.brain_index, self.search_index)

    # -- per volume ---------------------------------------------------------------

    def missing(self) -> None:
        """A volume that never arrived: a censored frame, so that the buffer keeps
        the time axis (the band-pass bridges it) and the next FD spans it."""
        slot = self.frames % self.capacity
        self.frames += 1
        self._y[slot] = 0.0
        self._s[slot] = 0.0
        self._x[slot] = 0.0
        self._good[slot] = False

    def update(
        self,
        volume: npt.ArrayLike,
        params: npt.ArrayLike,
        *,
        fd_mm: float | None = None,
        usable: bool = True,
        index: int | None = None,
    ) -> ConnectivityFrame:
        """Add one corrected volume; ``fd_mm`` None computes FD from the last params."""
        vol = np.asarray(volume)
        if vol.shape != self.shape:
            raise AnalysisError(f"volume shape {vol.shape} differs from the masks {self.shape}")
        p = np.asarray(params, dtype=np.float64).reshape(6)
        if fd_mm is None and self._prev_params is not None:
            fd_mm = displacement_mm(self._prev_params, p, radius=self.fd_radius_mm)
        flat = vol.reshape(-1)
        y = flat[self.brain_index].astype(np.float64)
        reasons: list[str] = []
        if not (np.isfinite(y).all() and np.isfinite(p).all()):
            reasons.append("non-finite")
        if fd_mm is not None and fd_mm > self.fd_censor_mm:
            reasons.append("fd")
        if not usable:
            reasons.append("flagged")
        slot = self.frames % self.capacity
        self.frames += 1
        if "non-finite" in reasons:
            self._y[slot] = 0.0
            self._s[slot] = 0.0
            self._x[slot] = 0.0
            self._good[slot] = False
        else:
            seed = float(flat[self.seed_index].astype(np.float64).mean())
            signals = [
                float(y.mean()),
                float(flat[self._wm_index].mean()) if self._wm_index.size else 0.0,
                float(flat[self._csf_index].mean()) if self._csf_index.size else 0.0,
            ]
            x = nuisance_regressors(p, self._prev_params, signals, motion_model=self.motion_model)
            self._y[slot] = flat[self.search_index]
            self._s[slot] = seed
            self._x[slot] = x
            self._good[slot] = not reasons
            if not reasons:
                self.regression.add(y, seed, x)
                self.good_frames += 1
                self._check_fov(p)
        if np.isfinite(p).all():
            self._prev_params = p
        return ConnectivityFrame(
            index=self.frames - 1 if index is None else int(index),
            censored=bool(reasons),
            reasons=tuple(reasons),
            fd_mm=fd_mm,
            good_frames=self.good_frames,
            frames=self.frames,
        )

    def _check_fov(self, params: F64) -> None:
        """Drop voxels whose corrected value was sampled outside the raw slab.

        Motion correction resamples volume ``t`` at ``M_t(x)``; where that falls
        more than half a voxel beyond the slab's outer voxel centres, the value
        is an edge value repeated, not tissue, and correlates with motion.
        """
        if not np.any(params):
            return
        m = self._ras2vox @ params_to_matrix(params, centre=self._centre)
        src = m[:3, :3] @ self._brain_ras + m[:3, 3:4]
        inside = ((src >= -_FOV_TOLERANCE) & (src <= self._fov_hi)).all(axis=0)
        self.in_fov &= inside

    # -- maps ---------------------------------------------------------------------------

    def running_map(self) -> F32:
        """The online (unfiltered) partial-correlation map; 0 outside the brain."""
        out = np.zeros(self.shape, dtype=np.float32)
        r = self.regression.correlation()
        r[~self.in_fov] = np.nan
        out.reshape(-1)[self.brain_index] = np.nan_to_num(r, nan=0.0)
        return out

    def buffered(self) -> tuple[F32, F64, F64, npt.NDArray[np.bool_]]:
        """The buffer oldest first: search voxels (T, Vs), seed (T,), regressors (T, k), good."""
        n = min(self.frames, self.capacity)
        if self.frames <= self.capacity:
            order = np.arange(n)
        else:
            start = self.frames % self.capacity
            order = np.concatenate([np.arange(start, self.capacity), np.arange(start)])
        return self._y[order], self._s[order], self._x[order], self._good[order]

    def search_maps(
        self, *, bandpassed: bool = True, halves: bool = True, surrogates: int = 0
    ) -> SearchMaps:
        """Exact correlations over the search voxels from the buffered frames.

        ``surrogates`` > 0 also returns that many maps of phase-randomised
        seeds (the null of :mod:`boldstream.analysis.significance`), drawn
        from a generator seeded by the frame count (reproducible in replay).
        """
        y32, s, x, good = self.buffered()
        n_good = int(good.sum())
        nan = np.full(self.search_index.size, np.nan)
        if n_good < self.n_regressors + 3:
            return SearchMaps(nan, None, None, n_good, bandpassed)
        y = y32.astype(np.float64)
        low, high = self.bandpass_hz
        # Too few frames to filter: the maps are of the unfiltered data, and say so.
        bandpassed = bandpassed and can_bandpass(good.size, self.tr_s, low, high)
        if bandpassed:
            cols = np.column_stack([s, x, y])
            filt = bandpass(cols, self.tr_s, low, high, good)
            s, x, y = filt[:, 0], filt[:, 1 : 1 + x.shape[1]], filt[:, 1 + x.shape[1] :]
        rows = np.flatnonzero(good)
        ry, rs, basis = _residualise(y[rows], s[rows], x[rows])
        full = _pearson(ry, rs)
        null = None
        if surrogates > 0:
            rng = np.random.default_rng([self.frames, 0x5EED])
            null = surrogate_correlations(ry, rs, basis, surrogates, rng)
        del ry
        first = second = None
        half = rows.size // 2
        if halves and half >= self.n_regressors + 3:
            a, b = rows[:half], rows[half:]
            first = _ols_correlation(y[a], s[a], x[a])
            second = _ols_correlation(y[b], s[b], x[b])
        outside = ~self.in_fov[self._search_in_brain]
        for values in (full, first, second):
            if values is not None:
                values[outside] = np.nan
        if null is not None:
            null[:, outside] = np.nan
        return SearchMaps(full, first, second, n_good, bandpassed, null)

    def as_volume(self, values: F64) -> F32:
        """Search-voxel values as a volume (0 elsewhere, NaN as 0)."""
        out = np.zeros(self.shape, dtype=np.float32)
        out.reshape(-1)[self.search_index] = np.nan_to_num(values, nan=0.0)
        return out

    # -- checkpoints -------------------------------------------------------------------

    def state(self) -> tuple[dict[str, int | bool], dict[str, npt.NDArray[np.generic]]]:
        """What :meth:`update` carries from one frame to the next, for a checkpoint.

        Scalars (JSON-able) and arrays; the ring buffer only as far as it is
        filled. :meth:`restore` on a :class:`SeedConnectivity` built with the
        same masks and options takes it back exactly.
        """
        used = min(self.frames, self.capacity)
        scalars: dict[str, int | bool] = {
            "frames": self.frames,
            "good_frames": self.good_frames,
            "regression_n": self.regression.n,
            "has_prev_params": self._prev_params is not None,
        }
        arrays: dict[str, npt.NDArray[np.generic]] = {
            f"regression_{k}": v for k, v in self.regression.state().items()
        }
        arrays.update(
            buffer_y=self._y[:used],
            buffer_s=self._s[:used],
            buffer_x=self._x[:used],
            buffer_good=self._good[:used],
            in_fov=self.in_fov,
        )
        if self._prev_params is not None:
            arrays["prev_params"] = self._prev_params
        return scalars, arrays

    def restore(self, scalars: dict[str, Any], arrays: dict[str, npt.NDArray[np.generic]]) -> None:
        """Take back what :meth:`state` gave; a mismatch with these masks is an error."""
        used = min(int(scalars["frames"]), self.capacity)
        expected = {
            "buffer_y": (used, self.search_index.size),
            "buffer_x": (used, self.n_regressors),
            "in_fov": (self.brain_index.size,),
            "regression_cyy": (self.brain_index.size,),
        }
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise AnalysisError(
                    f"connectivity state does not fit these masks: {name} is "
                    f"{arrays[name].shape}, expected {shape}"
                )
        self.regression.restore(
            int(scalars["regression_n"]),
            {
                k: np.asarray(arrays[f"regression_{k}"], dtype=np.float64)
                for k in ("mz", "czz", "my", "czy", "cyy")
            },
        )
        self._y[:used] = arrays["buffer_y"]
        self._s[:used] = arrays["buffer_s"]
        self._x[:used] = arrays["buffer_x"]
        self._good[:used] = arrays["buffer_good"]
        self.in_fov = np.array(arrays["in_fov"], dtype=bool)
        self.frames = int(scalars["frames"])
        self.good_frames = int(scalars["good_frames"])
        self._prev_params = (
            np.array(arrays["prev_params"], dtype=np.float64)
            if scalars["has_prev_params"]
            else None
        )

    @property
    def censored_frames(self) -> int:
        return self.frames - self.good_frames

    @property
    def nbytes(self) -> int:
        """Memory held by the running sums and the ring buffer."""
        return int(
            self.regression.nbytes
            + self._y.nbytes
            + self._s.nbytes
            + self._x.nbytes
            + self._good.nbytes
        )
