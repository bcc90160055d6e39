"""The provisional TMS target from the seed map, its coordinates and how settled it is.

SPEC section 5:

- The correlation map of the search region is smoothed (Gaussian, 5 mm FWHM
  by default; 4-6 mm is the published range) *within* the region: a
  normalised convolution ``G*(r m) / G*m`` so that values outside the region
  (other cortex, zeros) do not leak in.
- Decision rule ``"centroid"`` (default; Cash et al. 2021, Human Brain
  Mapping): keep the voxels with ``r < 0`` at or below the 10th percentile of
  the region's negative values, cluster them with 26-connectivity, take the
  largest cluster and its centroid. ``"peak"``: the most negative voxel
  (known to be unstable between sessions, > 25 mm).
- Coordinates: scanner RAS+ mm, DICOM LPS+ mm (x and y negated), fractional
  voxel indices of the EPI grid, and MNI mm through the registration.
- Reliability: the distance between the targets of the first and second
  halves of the good (uncensored) frames, how far the target moved in the
  last minute of acquisition, and the good minutes behind it. The status is
  ``provisional`` / ``settling`` / ``stable`` by :class:`TargetRules`. SPEC 5
  reports that individual targets beat the group target only after >= 10
  min of good data; the default minutes floor is 8 (the target issue's
  acceptance test calls a settled target stable then), and a cautious site
  sets 10. Centroid methods reach 2-7 mm between sessions (SPEC 5; hence
  split-half <= 7 mm). The drift limit (3 mm per minute) and
  the settling thresholds (5 min, 15 mm) are our own choice (unverified).
- Beyond chance: a seed map always has a most negative spot, and with no
  real anticorrelated cluster the split-half and drift of a noise map can
  dip under their limits by luck (a 12-minute null phantom run did, twice
  in a row). So stable also needs the strongest smoothed anticorrelation of
  the region to beat ``p <= 0.01`` against phase-randomised seeds
  (:mod:`boldstream.analysis.significance`; settling needs ``p <= 0.05``),
  and the p, split-half and drift limits to have held at every recompute
  for a minute (``stable_hold_s``). Both are our own choice (unverified
  clinically; chosen on simulated null runs, see docs/guidance.md).
  The reasons a target is not stable are listed, in words, with the minutes
  lost to censoring.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from boldstream.analysis.connectivity import SearchMaps, SeedConnectivity
from boldstream.analysis.significance import NullTest, max_statistic_test
from boldstream.errors import AnalysisError

__all__ = [
    "TargetEstimate",
    "TargetPoint",
    "TargetRules",
    "TargetTracker",
    "choose_target",
    "smooth_in_region",
    "smoothed_minima",
    "target_coordinates",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
Method = Literal["centroid", "peak"]
Status = Literal["provisional", "settling", "stable"]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _voxel_sizes(vox2ras: F64) -> F64:
    out: F64 = np.sqrt((vox2ras[:3, :3] ** 2).sum(axis=0))
    return out


def _smoothing_box(
    mask: Mask, vox2ras: npt.ArrayLike, fwhm_mm: float
) -> tuple[tuple[slice, ...], F64]:
    """The bounding box of ``mask`` padded for the kernel, and the kernel's sigma (voxels)."""
    sigma = fwhm_mm * _FWHM_TO_SIGMA / _voxel_sizes(np.asarray(vox2ras, dtype=np.float64))
    pad = np.ceil(3.0 * sigma).astype(int) + 1
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(axis=0) - pad, 0)
    hi = np.minimum(nz.max(axis=0) + pad + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)), sigma


def smooth_in_region(
    volume: npt.ArrayLike, region: Mask, vox2ras: npt.ArrayLike, fwhm_mm: float
) -> F64:
    """Gaussian smoothing of ``volume`` restricted to ``region`` (NaN outside it)."""
    vol = np.asarray(volume, dtype=np.float64)
    mask = np.asarray(region, dtype=bool) & np.isfinite(vol)
    out = np.full(vol.shape, np.nan)
    if not mask.any():
        return out
    if fwhm_mm <= 0:
        out[mask] = vol[mask]
        return out
    box, sigma = _smoothing_box(mask, vox2ras, fwhm_mm)
    m = mask[box].astype(np.float64)
    num = ndimage.gaussian_filter(np.where(mask[box], vol[box], 0.0), sigma, mode="constant")
    den = ndimage.gaussian_filter(m, sigma, mode="constant")
    inner = np.full(m.shape, np.nan)
    ok = mask[box] & (den > 1e-6)
    inner[ok] = num[ok] / den[ok]
    out[box] = inner
    return out


def smoothed_minima(
    values: npt.ArrayLike,
    index: npt.ArrayLike,
    region: Mask,
    vox2ras: npt.ArrayLike,
    fwhm_mm: float,
    *,
    chunk: int = 25,
) -> F64:
    """The most negative value of each map in ``values`` (n, V) once smoothed in ``region``.

    The maps hold the voxels ``index`` (flat indices into the region's grid);
    each is smoothed as :func:`smooth_in_region` does, over the voxels finite
    in every map, but only inside the region's box, in float32 and ``chunk``
    maps at a time (200 surrogate maps of a 90x90x60 grid as whole float64
    volumes would take 1.6 GB). NaN for a map with nothing to smooth.
    """
    stack = np.atleast_2d(np.asarray(values, dtype=np.float32))
    flat_index = np.asarray(index).reshape(-1)
    region = np.asarray(region, dtype=bool)
    finite_cols = np.isfinite(stack).all(axis=0)
    mask = np.zeros(region.shape, dtype=bool)
    mask.reshape(-1)[flat_index[finite_cols]] = True
    mask &= region
    out = np.full(stack.shape[0], np.nan)
    if not mask.any():
        return out
    # where each column lands in the box, for the columns inside the mask
    cols = np.flatnonzero(mask.reshape(-1)[flat_index])
    if fwhm_mm <= 0:
        out[:] = stack[:, cols].min(axis=1)
        return out
    box, sigma = _smoothing_box(mask, vox2ras, fwhm_mm)
    inside = mask[box]
    den = ndimage.gaussian_filter(inside.astype(np.float32), sigma, mode="constant")
    ijk = np.unravel_index(flat_index[cols], region.shape)
    local = np.ravel_multi_index(
        tuple(ax - s.start for ax, s in zip(ijk, box, strict=True)), inside.shape
    )
    keep = den.reshape(-1)[local] > 1e-6
    local, cols = local[keep], cols[keep]
    den_at = den.reshape(-1)[local]
    size = int(np.prod(inside.shape))
    for start in range(0, stack.shape[0], chunk):
        part = stack[start : start + chunk]
        buf = np.zeros((part.shape[0], size), dtype=np.float32)
        buf[:, local] = part[:, cols]
        num = ndimage.gaussian_filter(
            buf.reshape(part.shape[0], *inside.shape), (0.0, *sigma), mode="constant"
        )
        out[start : start + part.shape[0]] = (
            num.reshape(part.shape[0], -1)[:, local] / den_at
        ).min(axis=1)
    return out


@dataclass(frozen=True, slots=True)
class TargetPoint:
    """A target on the EPI grid."""

    #: Fractional voxel indices (i, j, k).
    ijk: tuple[float, float, float]
    #: Smoothed r at the nearest voxel of the target (centroid) or the peak.
    r: float
    #: Voxels in the chosen cluster (1 for the peak rule).
    cluster_voxels: int
    #: Threshold r used (centroid rule), None for the peak rule.
    threshold: float | None


def choose_target(
    smoothed: npt.ArrayLike,
    region: Mask,
    *,
    method: Method = "centroid",
    percentile: float = 10.0,
) -> TargetPoint | None:
    """Apply the decision rule to a smoothed map; None when no voxel has r < 0."""
    vol = np.asarray(smoothed, dtype=np.float64)
    inside = np.asarray(region, dtype=bool) & np.isfinite(vol)
    neg = inside & (vol < 0)
    if not neg.any():
        return None
    if method == "peak":
        values = np.where(neg, vol, np.inf)
        flat = int(np.argmin(values))
        ijk = np.unravel_index(flat, vol.shape)
        return TargetPoint(
            ijk=(float(ijk[0]), float(ijk[1]), float(ijk[2])),
            r=float(vol[ijk]),
            cluster_voxels=1,
            threshold=None,
        )
    if method != "centroid":
        raise AnalysisError(f"target method must be 'centroid' or 'peak', not {method!r}")
    threshold = float(np.percentile(vol[neg], percentile))
    keep = neg & (vol <= threshold)
    labels, n = ndimage.label(keep, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # largest cluster; ties go to the more negative mean r
    best = max(
        range(1, n + 1),
        key=lambda lab: (int(sizes[lab]), -float(vol[labels == lab].mean())),
    )
    members = np.argwhere(labels == best).astype(np.float64)
    centre = members.mean(axis=0)
    near = tuple(int(v) for v in np.clip(np.rint(centre), 0, np.asarray(vol.shape) - 1))
    r = float(vol[near]) if np.isfinite(vol[near]) else float(vol[labels == best].mean())
    return TargetPoint(
        ijk=(float(centre[0]), float(centre[1]), float(centre[2])),
        r=r,
        cluster_voxels=int(sizes[best]),
        threshold=threshold,
    )


def target_coordinates(
    ijk: npt.ArrayLike, vox2ras: npt.ArrayLike, native2mni: npt.ArrayLike | None = None
) -> dict[str, list[float] | None]:
    """The target in every frame: ``ras_mm``, ``lps_mm``, ``voxel_ijk``, ``mni_mm``."""
    v = np.asarray(ijk, dtype=np.float64).reshape(3)
    affine = np.asarray(vox2ras, dtype=np.float64)
    ras = affine[:3, :3] @ v + affine[:3, 3]
    mni = None
    if native2mni is not None:
        n2m = np.asarray(native2mni, dtype=np.float64)
        mni = [float(c) for c in n2m[:3, :3] @ ras + n2m[:3, 3]]
    return {
        "ras_mm": [float(c) for c in ras],
        "lps_mm": [float(-ras[0]), float(-ras[1]), float(ras[2])],
        "voxel_ijk": [float(c) for c in v],
        "mni_mm": mni,
    }


@dataclass(frozen=True, slots=True)
class TargetRules:
    """When a target is called stable or settling (see the module docstring)."""

    stable_good_minutes: float = 8.0
    stable_split_half_mm: float = 7.0
    stable_drift_mm: float = 3.0
    #: Stable needs the region's anticorrelation beyond chance at this p ...
    stable_p: float = 0.01
    #: ... and the p, split-half and drift limits met at every recompute over
    #: at least this long (one lucky recompute of a noise map is not stable).
    stable_hold_s: float = 60.0
    settling_good_minutes: float = 5.0
    settling_split_half_mm: float = 15.0
    #: Settling needs at least this (looser) significance.
    settling_p: float = 0.05

    def steady(
        self, *, p_value: float | None, split_half_mm: float | None, drift_mm: float | None
    ) -> bool:
        """Does one recompute meet the p, split-half and drift limits of stable?"""
        return (
            p_value is not None
            and p_value <= self.stable_p
            and split_half_mm is not None
            and split_half_mm <= self.stable_split_half_mm
            and drift_mm is not None
            and drift_mm <= self.stable_drift_mm
        )

    def judge(
        self,
        *,
        good_minutes: float,
        split_half_mm: float | None,
        drift_mm: float | None,
        censored_minutes: float,
        p_value: float | None = None,
        held_s: float | None = None,
        strongest_r: float | None = None,
    ) -> tuple[Status, list[str]]:
        """The status and, when it is not stable, why (in words).

        ``p_value`` is the surrogate test of the strongest anticorrelation
        (``strongest_r``); without a test a target is never stable.
        ``held_s`` is how long every recompute up to this one has been
        :meth:`steady` (None: this one is not).
        """
        reasons: list[str] = []
        if good_minutes < self.stable_good_minutes:
            text = f"{good_minutes:.1f} good minutes, stable needs {self.stable_good_minutes:g}"
            if censored_minutes > 0:
                text += f" ({censored_minutes:.1f} min censored: FD or flagged volumes)"
            reasons.append(text)
        if p_value is None:
            reasons.append("the anticorrelation has not been tested against chance")
        elif p_value > self.stable_p:
            r = "" if strongest_r is None else f" (strongest r {strongest_r:.2f})"
            reasons.append(
                f"no anticorrelation beyond chance yet{r}: p = {p_value:.3f} against "
                f"phase-randomised seeds (stable: p <= {self.stable_p:g})"
            )
        if split_half_mm is None:
            reasons.append("too little good data to compare its two halves")
        elif split_half_mm > self.stable_split_half_mm:
            reasons.append(
                f"first- and second-half targets {split_half_mm:.1f} mm apart "
                f"(stable: <= {self.stable_split_half_mm:g} mm)"
            )
        if drift_mm is None:
            reasons.append("no target from a minute ago to compare with yet")
        elif drift_mm > self.stable_drift_mm:
            reasons.append(
                f"moved {drift_mm:.1f} mm in the last minute "
                f"(stable: <= {self.stable_drift_mm:g} mm)"
            )
        steady = self.steady(p_value=p_value, split_half_mm=split_half_mm, drift_mm=drift_mm)
        if steady and (held_s or 0.0) < self.stable_hold_s:
            reasons.append(
                f"within the stable limits for {held_s or 0.0:.0f} s so far "
                f"(stable: held for {self.stable_hold_s:g} s)"
            )
        if not reasons:
            return "stable", []
        settling = (
            good_minutes >= self.settling_good_minutes
            and split_half_mm is not None
            and split_half_mm <= self.settling_split_half_mm
            and p_value is not None
            and p_value <= self.settling_p
        )
        return ("settling" if settling else "provisional"), reasons


@dataclass(frozen=True, slots=True, eq=False)
class TargetEstimate:
    """One recomputation of the target: the values of a ``target`` result and its map."""

    values: dict[str, Any]
    #: Correlation map on the EPI grid: the running map, with the (band-passed,
    #: unsmoothed) values the target was chosen from inside the search region.
    correlation_map: F32
    vox2ras: F64
    point: TargetPoint | None


class TargetTracker:
    """Recomputes the target of one :class:`SeedConnectivity` and tracks its history.

    ``surrogates`` phase-randomised seeds per recompute test the strongest
    anticorrelation against chance (:mod:`boldstream.analysis.significance`);
    0 skips the test, and then no target is ever called stable.
    """

    def __init__(
        self,
        *,
        method: Method = "centroid",
        fwhm_mm: float = 5.0,
        percentile: float = 10.0,
        bandpass: bool = True,
        rules: TargetRules | None = None,
        native2mni: npt.ArrayLike | None = None,
        drift_window_s: float = 60.0,
        surrogates: int = 200,
    ) -> None:
        if method not in ("centroid", "peak"):
            raise AnalysisError(f"target method must be 'centroid' or 'peak', not {method!r}")
        if not 0 < percentile < 100:
            raise AnalysisError(f"percentile must be in (0, 100), not {percentile}")
        if surrogates < 0:
            raise AnalysisError(f"surrogates must be >= 0, not {surrogates}")
        self.method: Method = method
        self.fwhm_mm = float(fwhm_mm)
        self.percentile = float(percentile)
        self.bandpass = bandpass
        self.rules = rules or TargetRules()
        self.native2mni = None if native2mni is None else np.asarray(native2mni, dtype=np.float64)
        self.drift_window_s = float(drift_window_s)
        self.surrogates = int(surrogates)
        #: (acquisition seconds, scanner RAS) of earlier targets.
        self.history: deque[tuple[float, F64]] = deque(maxlen=256)
        #: Acquisition seconds of the first of the recomputes, up to the last
        #: one, that were all :meth:`TargetRules.steady` (None: the last was not).
        self.steady_since: float | None = None

    def state(self) -> tuple[dict[str, float | None], dict[str, F64]]:
        """What carries from one recompute to the next (drift, hold), for a checkpoint."""
        when = np.array([w for w, _ in self.history], dtype=np.float64)
        where = np.array([r for _, r in self.history], dtype=np.float64).reshape(-1, 3)
        return {"steady_since": self.steady_since}, {"when": when, "where": where}

    def restore(self, scalars: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Take back what :meth:`state` gave."""
        when = np.asarray(arrays["when"], dtype=np.float64)
        where = np.asarray(arrays["where"], dtype=np.float64).reshape(-1, 3)
        self.history.clear()
        self.history.extend((float(w), r.copy()) for w, r in zip(when, where, strict=True))
        since = scalars["steady_since"]
        self.steady_since = None if since is None else float(since)

    def _pick(self, conn: SeedConnectivity, values: F64 | None) -> TargetPoint | None:
        if values is None or not np.isfinite(values).any():
            return None
        vol = np.full(conn.shape, np.nan)
        vol.reshape(-1)[conn.search_index] = values
        region = conn.rois.search
        smoothed = smooth_in_region(vol, region, conn.rois.vox2ras, self.fwhm_mm)
        return choose_target(smoothed, region, method=self.method, percentile=self.percentile)

    def _test(self, conn: SeedConnectivity, maps: SearchMaps) -> NullTest | None:
        """The strongest smoothed anticorrelation against the surrogates' (None: no test)."""
        if maps.null is None or not np.isfinite(maps.all).any():
            return None
        minima = smoothed_minima(
            np.vstack([maps.all[None], maps.null]),
            conn.search_index,
            conn.rois.search,
            conn.rois.vox2ras,
            self.fwhm_mm,
        )
        if not np.isfinite(minima[0]) or not np.isfinite(minima[1:]).any():
            return None
        return max_statistic_test(float(minima[0]), minima[1:])

    def _ras(self, conn: SeedConnectivity, point: TargetPoint) -> F64:
        a = conn.rois.vox2ras
        out: F64 = a[:3, :3] @ np.asarray(point.ijk) + a[:3, 3]
        return out

    def update(self, conn: SeedConnectivity) -> TargetEstimate | None:
        """Recompute from the connectivity so far; None while no target can be chosen."""
        maps = conn.search_maps(bandpassed=self.bandpass, halves=True, surrogates=self.surrogates)
        point = self._pick(conn, maps.all)
        if point is None:
            return None
        ras = self._ras(conn, point)
        split = None
        if maps.first is not None and maps.second is not None:
            a = self._pick(conn, maps.first)
            b = self._pick(conn, maps.second)
            if a is not None and b is not None:
                split = float(np.linalg.norm(self._ras(conn, a) - self._ras(conn, b)))
        now_s = conn.frames * conn.tr_s
        drift = None
        for when, where in reversed(self.history):
            if when <= now_s - self.drift_window_s + 1e-9:
                drift = float(np.linalg.norm(ras - where))
                break
        self.history.append((now_s, ras))
        test = self._test(conn, maps)
        p_value = None if test is None else test.p
        if self.rules.steady(p_value=p_value, split_half_mm=split, drift_mm=drift):
            if self.steady_since is None:
                self.steady_since = now_s
        else:
            self.steady_since = None
        held_s = None if self.steady_since is None else now_s - self.steady_since
        per_min = conn.tr_s / 60.0
        good_minutes = conn.good_frames * per_min
        censored_minutes = conn.censored_frames * per_min
        status, reasons = self.rules.judge(
            good_minutes=good_minutes,
            split_half_mm=split,
            drift_mm=drift,
            censored_minutes=censored_minutes,
            p_value=p_value,
            held_s=held_s,
            strongest_r=None if test is None else test.observed,
        )
        coords = target_coordinates(point.ijk, conn.rois.vox2ras, self.native2mni)
        values: dict[str, Any] = {
            "status": status,
            "ras_mm": coords["ras_mm"],
            "mni_mm": coords["mni_mm"],
            "split_half_mm": split,
            "drift_mm": drift,
            "good_minutes": good_minutes,
            "lps_mm": coords["lps_mm"],
            "voxel_ijk": coords["voxel_ijk"],
            "censored_minutes": censored_minutes,
            "minutes": conn.frames * per_min,
            "reasons": reasons,
            "method": self.method,
            "r": point.r,
            "cluster_voxels": point.cluster_voxels,
            "threshold_r": point.threshold,
            "fwhm_mm": self.fwhm_mm,
            "bandpassed": maps.bandpassed,
            "good_frames": maps.good_frames,
            "p_value": p_value,
            "strongest_r": None if test is None else test.observed,
            "null_r_p05": None if test is None else test.null_p05,
            "surrogates": 0 if test is None else test.surrogates,
            "held_s": held_s,
        }
        cmap = conn.running_map()
        cmap.reshape(-1)[conn.search_index] = np.nan_to_num(maps.all, nan=0.0)
        return TargetEstimate(
            values=values, correlation_map=cmap, vox2ras=conn.rois.vox2ras, point=point
        )
