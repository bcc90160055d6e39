"""Live quality metrics, one frame at a time: FD, DVARS, std_DVARS, tSNR, global signal.

Definitions (SPEC section 3):

- FD (Power et al. 2012): ``|dx| + |dy| + |dz| + r * (|da| + |db| + |dc|)``
  between consecutive motion parameters, ``r`` = 50 mm; None for the first
  frame and for a frame whose motion could not be estimated (flagged).
- DVARS: ``sqrt(mean_v (I_t - I_t-1)^2)`` over brain voxels; None for the
  first frame.
- std_DVARS (Nichols 2013, as in nipype's ``compute_dvars``):
  ``DVARS_t / mean_v(sigma_v * sqrt(2 (1 - rho_v)))``, ``sigma_v`` the robust
  standard deviation (IQR / 1.349) of voxel ``v`` over time and ``rho_v`` its
  lag-1 autocorrelation (Yule-Walker: ``sum d_t d_t+1 / sum d_t^2`` on the
  demeaned series); voxels whose series is constant are left out.
- tSNR: temporal mean / standard deviation (ddof 1) per voxel, from a Welford
  running mean and variance; its median over voxels with a non-zero
  deviation; None before two frames.
- Global signal: mean over the brain mask.
- Outlier: FD above ``fd_outlier_mm`` (0.5) or std_DVARS above
  ``std_dvars_outlier`` (1.5), fMRIPrep's defaults.

How std_DVARS stays incremental and bounded in cost while it uses the data
so far (SPEC 3): its denominator, ``mean_v(sigma_v * sqrt(2 (1 - rho_v)))``,
is estimated over an evenly spaced subset of at most ``std_dvars_voxels``
brain voxels (the denominator is a mean over voxels, so a few thousand
estimate it to well under 1 %; ``None`` keeps every voxel).

- rho_v, the lag-1 autocorrelation, comes from running sums over every
  frame so far (of each voxel's values less its first value, which leaves
  rho unchanged and keeps the sums small): exact, in O(voxels) memory.
- sigma_v, IQR / 1.349, needs each voxel's quantiles, which no running sum
  gives. The accumulator keeps up to ``std_dvars_window`` frames spread
  evenly over the run: every frame until the store is full, then every
  other one of those, and from then on every second frame, and so on, so
  the store always holds between half and all of ``std_dvars_window``
  frames from the whole run so far, evenly spaced.

Once ``std_dvars_warmup`` frames have arrived the denominator is computed,
then again every ``std_dvars_refresh`` frames; frames in between use the
latest value. Memory is ``window * voxels`` floats and a recomputation costs
``O(window * voxels)``, whatever the run length; before the warm-up
std_DVARS is None. While the run has no more frames than the window, the
estimate is exactly :func:`std_dvars_scale` of all its frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from boldstream.analysis._rigid import displacement_mm
from boldstream.analysis.usable import UsableData, UsableSummary
from boldstream.errors import AnalysisError

__all__ = [
    "QCAccumulator",
    "QCFrame",
    "std_dvars_scale",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class QCFrame:
    """Quality figures of one frame, every field JSON-ready (None = n/a)."""

    #: 0-based frame count within the accumulator.
    index: int
    fd_mm: float | None
    dvars: float | None
    std_dvars: float | None
    global_signal: float | None
    tsnr_median: float | None
    outlier: bool
    #: Which tests made it an outlier: "fd", "std_dvars", "non-finite", "flagged".
    outlier_reasons: tuple[str, ...]
    usable: UsableSummary

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "fd_mm": self.fd_mm,
            "dvars": self.dvars,
            "std_dvars": self.std_dvars,
            "global_signal": self.global_signal,
            "tsnr_median": self.tsnr_median,
            "outlier": self.outlier,
            "outlier_reasons": list(self.outlier_reasons),
            "usable": self.usable.as_dict(),
        }


def std_dvars_scale(series: npt.ArrayLike) -> float | None:
    """Nichols' expected DVARS under the null, from a (time, voxel) array.

    ``mean_v(IQR_v / 1.349 * sqrt(2 * (1 - rho_v)))`` over voxels whose
    series is not constant; None with fewer than 3 frames or no such voxel.
    """
    data = np.asarray(series, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] < 3:
        return None
    d = data - data.mean(axis=0)
    den = np.einsum("tv,tv->v", d, d)
    num = np.einsum("tv,tv->v", d[1:], d[:-1])
    return _scale(_robust_sigma(data), num, den)


def _robust_sigma(sample: npt.NDArray[Any]) -> F64:
    q75, q25 = np.percentile(sample, [75.0, 25.0], axis=0)
    sigma: F64 = (q75 - q25) / 1.349
    return sigma


def _scale(sigma: F64, num: F64, den: F64) -> float | None:
    """``mean_v(sigma_v * sqrt(2 (1 - rho_v)))``, rho_v = num_v / den_v, over den_v > 0."""
    keep = den > 0.0
    if not keep.any():
        return None
    rho = num[keep] / den[keep]
    diff_sd = sigma[keep] * np.sqrt(2.0 * (1.0 - np.clip(rho, -1.0, 1.0)))
    scale = float(diff_sd.mean())
    return scale if scale > 0.0 and math.isfinite(scale) else None


class QCAccumulator:
    """Per-frame QC over a fixed brain ``mask`` (3D bool) of a series.

    ``update(volume, params)`` takes the motion-corrected volume and its six
    motion parameters (mm, rad) and returns a :class:`QCFrame`. Pass
    ``usable=False`` for a frame the motion stage flagged: it then counts as
    bad data at every threshold (and is reported as an outlier), its FD is
    n/a (its parameters only repeat the last estimate), while its
    intensities still enter DVARS and tSNR like any acquired frame.
    A frame with non-finite values inside the mask, or ``acquired=False``
    (the motion stage filled non-finite voxels with 0), is left out of DVARS,
    tSNR and the buffer. :meth:`lost` counts a volume that never arrived as
    scan time without good data. After any of these, the next frame's FD and
    DVARS compare with the last frame that was measured (so motion during
    the unmeasured time still shows, and counts against the usable data).
    """

    def __init__(
        self,
        mask: npt.ArrayLike,
        *,
        tr_s: float,
        fd_thresholds: Sequence[float] = (0.2, 0.3, 0.5),
        goal_minutes: float = 12.5,
        fd_radius_mm: float = 50.0,
        fd_outlier_mm: float = 0.5,
        std_dvars_outlier: float = 1.5,
        std_dvars_warmup: int = 20,
        std_dvars_window: int = 120,
        std_dvars_refresh: int = 10,
        std_dvars_voxels: int | None = 2048,
    ) -> None:
        m = np.asarray(mask, dtype=bool)
        if m.ndim != 3 or not m.any():
            raise AnalysisError("the QC mask must be a 3D boolean array with at least one voxel")
        if std_dvars_warmup < 3 or std_dvars_window < std_dvars_warmup or std_dvars_refresh < 1:
            raise AnalysisError("need std_dvars_warmup >= 3, window >= warmup, refresh >= 1")
        try:
            self._usable = UsableData(
                tr_s=tr_s, fd_thresholds=fd_thresholds, goal_minutes=goal_minutes
            )
        except ValueError as exc:
            raise AnalysisError(str(exc)) from exc
        self.mask = m
        self._flat = np.flatnonzero(m)
        n_vox = self._flat.size
        self.fd_radius_mm = fd_radius_mm
        self.fd_outlier_mm = fd_outlier_mm
        self.std_dvars_outlier = std_dvars_outlier
        self.warmup = std_dvars_warmup
        self.window = std_dvars_window
        self.refresh = std_dvars_refresh
        if std_dvars_voxels is None or std_dvars_voxels >= n_vox:
            self._subset = np.arange(n_vox)
        else:
            self._subset = np.linspace(0, n_vox - 1, max(1, std_dvars_voxels)).astype(np.intp)
        # sigma: up to ``window`` frames, evenly spaced over the run (see module doc).
        self._sample = np.zeros((self.window, self._subset.size), dtype=np.float32)
        self._kept = 0
        self._stride = 1
        # rho: running sums over every frame of y = x - (its first value).
        self._origin = np.zeros(self._subset.size)
        self._last = np.zeros(self._subset.size)
        self._sum = np.zeros(self._subset.size)
        self._sum_sq = np.zeros(self._subset.size)
        self._sum_lag = np.zeros(self._subset.size)
        self._mean = np.zeros(n_vox)
        self._m2 = np.zeros(n_vox)
        self._n = 0  # finite frames seen
        self._count = 0  # all frames seen
        self._prev: F64 | None = None
        self._prev_params: F64 | None = None
        self._scale: float | None = None

    @property
    def n_volumes(self) -> int:
        return self._count

    def state(self) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
        """What carries from one volume to the next, usable counts included (checkpoints)."""
        usable = self._usable.state()
        scalars = {
            "n": self._n,
            "count": self._count,
            "scale": self._scale,
            "kept": self._kept,
            "stride": self._stride,
            "usable_total": usable["total"],
            "usable_good": usable["good"],
            "has_prev": self._prev is not None,
            "has_prev_params": self._prev_params is not None,
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            "mean": self._mean,
            "m2": self._m2,
            "sample": self._sample,
            "origin": self._origin,
            "last": self._last,
            "sum": self._sum,
            "sum_sq": self._sum_sq,
            "sum_lag": self._sum_lag,
        }
        if self._prev is not None:
            arrays["prev"] = self._prev
        if self._prev_params is not None:
            arrays["prev_params"] = self._prev_params
        return scalars, arrays

    def restore(self, scalars: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Take back what :meth:`state` gave."""
        self._n = int(scalars["n"])
        self._count = int(scalars["count"])
        scale = scalars["scale"]
        self._scale = None if scale is None else float(scale)
        self._usable.restore({"total": scalars["usable_total"], "good": scalars["usable_good"]})
        self._mean = np.array(arrays["mean"], dtype=np.float64)
        self._m2 = np.array(arrays["m2"], dtype=np.float64)
        self._kept = int(scalars["kept"])
        self._stride = int(scalars["stride"])
        self._sample = np.array(arrays["sample"], dtype=np.float32)
        for name in ("origin", "last", "sum", "sum_sq", "sum_lag"):
            setattr(self, f"_{name}", np.array(arrays[name], dtype=np.float64))
        self._prev = np.array(arrays["prev"], dtype=np.float64) if scalars["has_prev"] else None
        self._prev_params = (
            np.array(arrays["prev_params"], dtype=np.float64)
            if scalars["has_prev_params"]
            else None
        )

    @property
    def std_dvars_scale(self) -> float | None:
        """The current std_DVARS denominator (None before the warm-up)."""
        return self._scale

    def update(
        self,
        volume: npt.ArrayLike,
        params: Sequence[float] | F64,
        *,
        usable: bool = True,
        acquired: bool = True,
    ) -> QCFrame:
        vol = np.asarray(volume)
        if vol.shape != self.mask.shape:
            raise AnalysisError(f"volume shape {vol.shape} differs from the mask {self.mask.shape}")
        index = self._count
        self._count += 1
        reasons: list[str] = []

        fd = self._fd(params) if usable else None
        x = vol.reshape(-1)[self._flat].astype(np.float64)
        dvars = std = gs = None
        if acquired and np.isfinite(x).all():
            gs = float(x.mean())
            if self._prev is not None:
                d = x - self._prev
                dvars = math.sqrt(float(np.einsum("v,v->", d, d)) / d.size)
            self._prev = x
            self._welford(x)
            self._keep_for_std_dvars(x[self._subset])
            if self._n >= self.warmup and (self._n - self.warmup) % self.refresh == 0:
                self._scale = self._std_dvars_scale()
            if dvars is not None and self._scale is not None:
                std = dvars / self._scale
        else:
            reasons.append("non-finite")
            usable = False

        if fd is not None and fd > self.fd_outlier_mm:
            reasons.append("fd")
        if std is not None and std > self.std_dvars_outlier:
            reasons.append("std_dvars")
        if not usable and "non-finite" not in reasons:
            reasons.append("flagged")
        summary = self._usable.add(fd, usable=usable)
        return QCFrame(
            index=index,
            fd_mm=fd,
            dvars=dvars,
            std_dvars=std,
            global_signal=gs,
            tsnr_median=self._tsnr_median(),
            outlier=bool(reasons),
            outlier_reasons=tuple(reasons),
            usable=summary,
        )

    def lost(self) -> UsableSummary:
        """Count a volume that never arrived: scan time, but no good data."""
        return self._usable.add(None, usable=False)

    def _fd(self, params: Sequence[float] | F64) -> float | None:
        p = np.asarray(params, dtype=np.float64).reshape(-1)
        if p.shape != (6,) or not np.isfinite(p).all():
            return None
        prev, self._prev_params = self._prev_params, p
        if prev is None:
            return None
        return displacement_mm(prev, p, radius=self.fd_radius_mm)

    def _welford(self, x: F64) -> None:
        self._n += 1
        delta = x - self._mean
        self._mean += delta / self._n
        delta *= x - self._mean
        self._m2 += delta

    def _keep_for_std_dvars(self, x: F64) -> None:
        """Add the ``self._n``-th measured frame (voxel subset) to the sums and the sample."""
        if self._n == 1:
            self._origin = x.copy()
        y = x - self._origin
        if self._n > 1:
            self._sum_lag += y * self._last
        self._sum += y
        self._sum_sq += y * y
        self._last = y
        if (self._n - 1) % self._stride:
            return
        if self._kept == self.window:  # full: keep every other frame, sample half as often
            kept = self._sample[: self._kept : 2].copy()
            self._kept = kept.shape[0]
            self._sample[: self._kept] = kept
            self._stride *= 2
            if (self._n - 1) % self._stride:
                return
        self._sample[self._kept] = x
        self._kept += 1

    def _std_dvars_scale(self) -> float | None:
        n = self._n
        if n < 3:
            return None
        mean = self._sum / n
        # sum over t >= 2 of (y_t - m)(y_{t-1} - m); y_1 = 0 by the choice of origin.
        num = self._sum_lag - mean * (2.0 * self._sum - self._last) + (n - 1) * mean * mean
        den = self._sum_sq - n * mean * mean
        sigma = _robust_sigma(self._sample[: self._kept].astype(np.float64))
        return _scale(sigma, num, den)

    def _tsnr(self) -> F64 | None:
        if self._n < 2:
            return None
        sd = np.sqrt(self._m2 / (self._n - 1))
        out = np.zeros_like(sd)
        ok = sd > 0.0
        out[ok] = self._mean[ok] / sd[ok]
        return out

    def _tsnr_median(self) -> float | None:
        if self._n < 2:
            return None
        sd2 = self._m2 / (self._n - 1)
        ok = sd2 > 0.0
        if not ok.any():
            return None
        return float(np.median(self._mean[ok] / np.sqrt(sd2[ok])))

    def tsnr_map(self) -> F32:
        """Running tSNR as a volume (0 outside the mask and where undefined)."""
        out = np.zeros(self.mask.shape, dtype=np.float32)
        t = self._tsnr()
        if t is not None:
            out.reshape(-1)[self._flat] = t
        return out

    def mean_map(self) -> F32:
        """Running temporal mean as a volume (0 outside the mask)."""
        out = np.zeros(self.mask.shape, dtype=np.float32)
        out.reshape(-1)[self._flat] = self._mean
        return out
