"""Incremental rigid motion correction of fMRI volumes against one reference.

Method (the AFNI 3dvolreg family): Gauss-Newton least squares on image
intensities, each volume started from the previous volume's estimate, on a
small pyramid of 2x2x2 block averages, inside a dilated foreground mask.

The solver is *inverse compositional* (Baker & Matthews 2004): the cost
``sum_x (I(W(x; p)) - (1 + a) R(W(x; dp)) - b)^2`` is linearised in ``dp``
at the reference ``R``, so the Jacobian (reference gradient times the
derivative of the warp at identity, plus a gain ``a`` and offset ``b`` column
that absorb global intensity changes) and its 8x8 normal matrix are computed
once per reference. Each iteration is then one trilinear resample of the
moving volume at the mask points, one ``(8, N) @ (N,)`` product and an 8x8
solve; the warp is updated by composition, ``M <- M @ inv(M(dp))``. Points
that the current estimate maps outside the moving volume are dropped from
that iteration exactly (their rows are subtracted from the normal matrix).

Large products use ``np.einsum`` rather than ``@``: BLAS threads on these
thin shapes cost 10-30x more than they save when the two cores are busy.

Parameters follow fMRIPrep's confound names in RAS+ world mm about the volume
centre; see :mod:`boldstream.analysis._rigid` for the matrix convention.
A volume that cannot be trusted (non-finite values, a constant volume, a
slice whose residual stands far above the others (spike or dropout), a jump
in global intensity, a residual far above the recent ones, no convergence)
is flagged with a reason, its motion falls back to the previous estimate,
and it is still resliced so that every output is finite.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from boldstream.analysis._resample import (
    TrilinearSampler,
    binomial_smooth,
    block_any,
    block_mean,
    voxel_gradient,
)
from boldstream.analysis._rigid import (
    displacement_mm,
    matrix_to_params,
    params_to_matrix,
    rms_displacement_mm,
    volume_centre,
)
from boldstream.errors import AnalysisError

__all__ = [
    "PARAM_NAMES",
    "MotionCorrector",
    "MotionEstimate",
    "displacement_mm",
    "fill_non_finite",
    "foreground_mask",
    "matrix_to_params",
    "params_to_matrix",
    "rms_displacement_mm",
    "volume_centre",
]

PARAM_NAMES = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Params = tuple[float, float, float, float, float, float]

# Radius (mm) of the sphere on which step sizes and jumps are measured.
_RADIUS_MM = 50.0
# Recent accepted volumes whose residual defines "usual" for the spike test.
_COST_HISTORY = 20


@dataclass(frozen=True, slots=True, eq=False)
class MotionEstimate:
    """Motion of one volume relative to the reference, and the corrected volume."""

    #: 0-based count of volumes passed to :meth:`MotionCorrector.register`.
    index: int
    #: (trans_x, trans_y, trans_z) mm, (rot_x, rot_y, rot_z) rad; RAS+ about the centre.
    params: Params
    #: The volume resliced into the reference grid (float32, always finite).
    corrected: F32
    #: Gauss-Newton iterations summed over pyramid levels.
    iterations: int
    #: The last update at full resolution moved less than ``tol`` mm.
    converged: bool
    #: Pearson correlation with the reference over the mask points (-1..1).
    correlation: float
    #: Mean squared difference from the reference over the mask points,
    #: divided by the reference's mean square (dimensionless, 0 is perfect).
    cost: float
    #: Fitted global intensity ratio to the reference (1.0 = unchanged).
    gain: float
    #: True when the volume is not trusted; ``params`` then repeat the
    #: previous estimate.
    flagged: bool
    #: Why the volume was flagged, None otherwise.
    reason: str | None
    #: The volume held NaN or infinity, set to 0 before reslicing: ``corrected``
    #: is then not the acquired signal (QC leaves it out of DVARS and tSNR).
    filled: bool = False

    def confounds(self) -> dict[str, float]:
        """The six parameters under fMRIPrep's confound names."""
        return dict(zip(PARAM_NAMES, self.params, strict=True))


def fill_non_finite(volume: npt.ArrayLike) -> tuple[F32, bool]:
    """``volume`` as float32 with NaN and infinity set to 0, and whether any were.

    What :meth:`MotionCorrector.register` reslices for a volume with such
    voxels (and flags it); a stage re-slicing that volume again uses the same.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if np.isfinite(vol).all():
        return vol, False
    return np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0), True


def foreground_mask(volume: npt.ArrayLike, *, dilate: int = 0) -> npt.NDArray[np.bool_]:
    """Head/brain foreground of an EPI volume.

    Voxels above a quarter of the 98th percentile, holes filled, largest
    connected component kept, then dilated by ``dilate`` voxels (registration
    wants the edge of the head inside its mask; QC wants ``dilate=0``).
    """
    v = np.nan_to_num(np.asarray(volume, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    hi = float(np.percentile(v, 98.0))
    if not hi > 0.0:
        return np.zeros(v.shape, dtype=bool)
    fg = ndimage.binary_fill_holes(v > 0.25 * hi)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    if dilate > 0:
        fg = ndimage.binary_dilation(fg, iterations=dilate)
    out: npt.NDArray[np.bool_] = np.asarray(fg, dtype=bool)
    return out


@dataclass(frozen=True, slots=True, eq=False)
class _Level:
    """Everything about one pyramid level that depends only on the reference."""

    shape: tuple[int, int, int]
    sampler: TrilinearSampler
    #: level voxel -> fine voxel (4x4) and its inverse
    to_fine: F64
    from_fine: F64
    points: F32  # (3, N) level voxel coordinates of the mask points
    ref_values: F32  # (N,)
    jac_t: F32  # (8, N): 6 rigid columns, gain, offset
    hessian: F64  # (8, 8)
    half_d2: F32  # (3, N) second differences / 2
    sixth_d3: F32  # (3, N) third differences / 6
    tol_mm: float


def _solve(h: F64, g: F64) -> F64 | None:
    try:
        sol = np.asarray(np.linalg.solve(h, g), dtype=np.float64)
    except np.linalg.LinAlgError:
        return None
    return sol if bool(np.isfinite(sol).all()) else None


class MotionCorrector:
    """Registers each volume of a series to one reference volume.

    ``reference`` is a 3D array on the grid ``vox2ras`` (4x4, voxel -> RAS+
    mm; oblique and anisotropic grids are fine); every registered volume
    must share that grid. ``mask`` (same shape, bool) restricts the cost;
    by default :func:`foreground_mask` of the reference dilated by 2 voxels.
    ``levels`` pyramid levels (1 = full resolution only), at most
    ``max_iter`` iterations per level, stopping when an update moves points
    by less than ``tol`` mm RMS over a 50 mm sphere (``tol * 2**level`` on
    coarser levels). ``reslice_order`` 1 reslices with the trilinear sampler
    (fast), 3 with cubic B-splines (``scipy.ndimage.affine_transform``,
    sharper, about 5x slower). The remaining options set the tests that flag
    a volume, see the module docstring.
    """

    def __init__(
        self,
        reference: npt.ArrayLike,
        vox2ras: npt.ArrayLike,
        *,
        mask: npt.ArrayLike | None = None,
        levels: int = 2,
        max_iter: int = 15,
        tol: float = 0.002,
        reslice_order: int = 1,
        smooth: bool = True,
        slice_outlier_ratio: float = 20.0,
        residual_outlier_ratio: float = 8.0,
        max_gain_change: float = 0.5,
        max_jump_mm: float = 25.0,
    ) -> None:
        ref = np.asarray(reference, dtype=np.float32)
        affine = np.asarray(vox2ras, dtype=np.float64)
        if ref.ndim != 3 or min(ref.shape) < 4:
            raise AnalysisError(
                f"reference must be a 3D volume (>= 4 voxels a side), got {ref.shape}"
            )
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise AnalysisError("vox2ras must be a finite 4x4 matrix")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise AnalysisError("vox2ras is singular")
        if not np.isfinite(ref).all():
            raise AnalysisError("the reference volume has NaN or infinite values")
        if levels < 1 or max_iter < 1 or not tol > 0.0 or reslice_order not in (1, 3):
            raise AnalysisError("need levels >= 1, max_iter >= 1, tol > 0, reslice_order 1 or 3")
        if mask is None:
            m = foreground_mask(ref, dilate=2)
        else:
            m = np.asarray(mask, dtype=bool)
            if m.shape != ref.shape:
                raise AnalysisError(f"mask shape {m.shape} differs from the reference {ref.shape}")
        if int(m.sum()) < 64:
            raise AnalysisError("the mask holds fewer than 64 voxels; nothing to register")

        self.shape: tuple[int, int, int] = (int(ref.shape[0]), int(ref.shape[1]), int(ref.shape[2]))
        self.vox2ras = affine
        self.centre = volume_centre(affine, self.shape)
        self.mask = m
        self.levels = levels
        self.max_iter = max_iter
        self.tol = tol
        self.reslice_order = reslice_order
        self.smooth = smooth
        self.slice_outlier_ratio = slice_outlier_ratio
        self.residual_outlier_ratio = residual_outlier_ratio
        self.max_gain_change = max_gain_change
        self.max_jump_mm = max_jump_mm
        self._ras2vox = np.linalg.inv(affine)
        self._levels = self._build_levels(ref, m)
        self._sampler = TrilinearSampler(self.shape)
        self._grid = np.indices(self.shape, dtype=np.float32).reshape(3, -1)
        self._last = np.eye(4)
        self._count = 0
        self._costs: deque[float] = deque(maxlen=_COST_HISTORY)

    # ----------------------------------------------------------------- set-up

    def _build_levels(self, ref: F32, mask: npt.NDArray[np.bool_]) -> list[_Level]:
        levels: list[_Level] = []
        vol, m = (binomial_smooth(ref) if self.smooth else ref), mask
        for lv in range(self.levels):
            if lv > 0:
                if min(vol.shape) < 8:
                    break
                vol, m = block_mean(vol), block_any(m)
            f = float(2**lv)
            to_fine = np.diag([f, f, f, 1.0])
            to_fine[:3, 3] = (f - 1.0) / 2.0
            shape = (int(vol.shape[0]), int(vol.shape[1]), int(vol.shape[2]))
            # Smoothing pads the edges and central differences need both
            # neighbours: keep points two voxels clear of the grid's faces.
            inner = m.copy()
            inner[[0, 1, -2, -1], :, :] = False
            inner[:, [0, 1, -2, -1], :] = False
            inner[:, :, [0, 1, -2, -1]] = False
            idx = np.nonzero(inner)
            pts = np.stack(idx).astype(np.float32)
            grads = voxel_gradient(vol)
            g_vox = np.stack([g[idx] for g in grads], axis=1).astype(np.float64)
            lin = (self.vox2ras @ to_fine)[:3, :3]
            g_world = g_vox @ np.linalg.inv(lin)
            world = (self.vox2ras @ to_fine)[:3, :3] @ pts.astype(np.float64)
            world += (self.vox2ras @ to_fine)[:3, 3:4]
            d = world.T - self.centre
            ref_vals = vol[idx].astype(np.float64)
            jac = np.empty((pts.shape[1], 8))
            jac[:, :3] = g_world
            jac[:, 3:6] = np.cross(d, g_world)
            jac[:, 6] = ref_vals
            jac[:, 7] = 1.0
            hess = jac.T @ jac
            # Second and third central differences along each voxel axis,
            # for the correction of trilinear interpolation (see register).
            d2 = np.empty((3, pts.shape[1]), dtype=np.float32)
            d3 = np.empty((3, pts.shape[1]), dtype=np.float32)
            for a in range(3):
                vm = np.moveaxis(vol, a, 0)
                dd = np.zeros_like(vm)
                dd[1:-1] = vm[:-2] + vm[2:] - 2.0 * vm[1:-1]
                d2[a] = np.moveaxis(dd, 0, a)[idx]
                dd = np.zeros_like(vm)
                dd[2:-2] = 0.5 * (vm[4:] - vm[:-4]) - (vm[3:-1] - vm[1:-3])
                d3[a] = np.moveaxis(dd, 0, a)[idx]
            if np.linalg.cond(hess) > 1e12:
                raise AnalysisError(f"reference has too little structure to register (level {lv})")
            levels.append(
                _Level(
                    shape=shape,
                    sampler=TrilinearSampler(shape),
                    to_fine=to_fine,
                    from_fine=np.linalg.inv(to_fine),
                    points=pts,
                    ref_values=ref_vals.astype(np.float32),
                    jac_t=np.ascontiguousarray(jac.T, dtype=np.float32),
                    hessian=hess,
                    half_d2=0.5 * d2,
                    sixth_d3=d3 / 6.0,
                    tol_mm=self.tol * f,
                )
            )
        levels.reverse()  # coarse to fine
        return levels

    # ------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, Any], dict[str, F64]]:
        """What carries from one volume to the next (for a checkpoint)."""
        scalars = {"count": self._count, "costs": [float(c) for c in self._costs]}
        return scalars, {"last": np.asarray(self._last, dtype=np.float64)}

    def restore(self, scalars: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        """Take back what :meth:`state` gave."""
        self._count = int(scalars["count"])
        self._costs = deque((float(c) for c in scalars["costs"]), maxlen=self._costs.maxlen)
        self._last = np.array(arrays["last"], dtype=np.float64)

    # ------------------------------------------------------------ per volume

    @property
    def last_params(self) -> Params:
        """The estimate the next volume starts from (the last accepted one)."""
        return _params_tuple(matrix_to_params(self._last, centre=self.centre))

    def params_to_world(self, params: npt.ArrayLike) -> F64:
        """4x4 RAS+ matrix of ``params`` about this series' centre."""
        return params_to_matrix(np.asarray(params, dtype=np.float64), centre=self.centre)

    def register(self, volume: npt.ArrayLike) -> MotionEstimate:
        """Estimate the motion of ``volume`` and reslice it into the reference grid.

        Never raises on bad data (only on a volume of the wrong shape, which
        is a wiring error) and never returns NaN.
        """
        vol = np.asarray(volume, dtype=np.float32)
        if vol.shape != self.shape:
            raise AnalysisError(f"volume shape {vol.shape} differs from the reference {self.shape}")
        index = self._count
        self._count += 1

        clean, filled = fill_non_finite(vol)
        if filled:
            return self._fallback(index, clean, "non-finite values (NaN or inf)", filled=True)
        if float(vol.max()) == float(vol.min()):
            return self._fallback(index, vol, "constant volume (dropout)")

        pyramid = [binomial_smooth(vol) if self.smooth else vol]
        for _ in range(1, len(self._levels)):
            pyramid.append(block_mean(pyramid[-1]))
        pyramid.reverse()

        m = self._last.copy()
        iterations = 0
        converged = False
        last: tuple[F32, F32, npt.NDArray[np.bool_], F64] | None = None
        for lv, (level, data) in enumerate(zip(self._levels, pyramid, strict=True)):
            fine = lv == len(self._levels) - 1
            converged = False
            for _ in range(self.max_iter):
                iterations += 1
                v = level.from_fine @ self._ras2vox @ m @ self.vox2ras @ level.to_fine
                coords = np.einsum("ij,jn->in", v[:3, :3].astype(np.float32), level.points)
                coords += v[:3, 3:4].astype(np.float32)
                inside = level.sampler.inside(coords)
                z = coords[2].copy() if fine else coords[2]
                vals = level.sampler.sample(data, coords)
                # Taylor correction of linear interpolation along each axis, using
                # the reference's differences at the same tissue point:
                # g(f) = lerp(f) - f(1-f)/2 g'' - f(1-f)(1-2f)/6 g''' (coords now
                # holds the fractional offsets f).
                w = coords - coords * coords
                coords *= -2.0
                coords += 1.0
                coords *= level.sixth_d3
                coords += level.half_d2
                coords *= w
                vals -= coords.sum(axis=0)
                err = vals - level.ref_values
                hess = level.hessian
                if not inside.all():
                    err[~inside] = 0.0
                    out = level.jac_t[:, ~inside].astype(np.float64)
                    hess = hess - np.einsum("in,jn->ij", out, out)
                grad = np.einsum("kn,n->k", level.jac_t, err).astype(np.float64)
                sol = _solve(hess, grad)
                if sol is None:
                    break
                if fine:
                    last = (vals, z, inside, sol)
                dp = sol[:6]
                m = m @ np.linalg.inv(params_to_matrix(dp, centre=self.centre))
                step = math.sqrt(
                    float(dp[:3] @ dp[:3]) + 0.4 * _RADIUS_MM**2 * float(dp[3:] @ dp[3:])
                )
                if not math.isfinite(step) or step > 1e3:
                    break
                if step < level.tol_mm:
                    converged = True
                    break

        if last is None or not np.isfinite(m).all():
            return self._fallback(index, vol, "registration failed (singular system)")
        vals, z, inside, sol = last
        correlation, cost, gain, reason = self._assess(vals, z, inside, sol)
        if reason is None and not converged:
            reason = f"no convergence in {self.max_iter} iterations"
        if reason is None:
            jump = rms_displacement_mm(
                matrix_to_params(self._last, centre=self.centre),
                matrix_to_params(m, centre=self.centre),
            )
            if jump > self.max_jump_mm:
                reason = f"implausible jump of {jump:.1f} mm from the previous volume"
        if reason is not None:
            est = self._fallback(index, vol, reason)
            return MotionEstimate(
                index=index,
                params=est.params,
                corrected=est.corrected,
                iterations=iterations,
                converged=converged,
                correlation=correlation,
                cost=cost,
                gain=gain,
                flagged=True,
                reason=reason,
            )
        self._last = m
        self._costs.append(cost)
        return MotionEstimate(
            index=index,
            params=_params_tuple(matrix_to_params(m, centre=self.centre)),
            corrected=self.reslice(vol, m),
            iterations=iterations,
            converged=True,
            correlation=correlation,
            cost=cost,
            gain=gain,
            flagged=False,
            reason=None,
        )

    def _assess(
        self, vals: F32, z: F32, inside: npt.NDArray[np.bool_], sol: F64
    ) -> tuple[float, float, float, str | None]:
        """Quality figures of the final full-resolution fit, and a reason to distrust it."""
        level = self._levels[-1]
        ref = level.ref_values[inside].astype(np.float64)
        got = vals[inside].astype(np.float64)
        if got.size < 64:
            return 0.0, 1.0, 1.0, "the volume does not overlap the reference"
        ref_c = ref - ref.mean()
        got_c = got - got.mean()
        denom = math.sqrt(_dot(ref_c, ref_c) * _dot(got_c, got_c))
        correlation = _dot(ref_c, got_c) / denom if denom > 0.0 else 0.0
        diff = got - ref
        cost = _dot(diff, diff) / max(_dot(ref, ref), 1e-30)
        gain = 1.0 + float(sol[6])
        if not (math.isfinite(correlation) and math.isfinite(cost) and math.isfinite(gain)):
            return 0.0, 1.0, 1.0, "non-finite fit"
        if abs(gain - 1.0) > self.max_gain_change:
            return correlation, cost, gain, f"global intensity changed by {gain - 1.0:+.0%}"
        # Residual after the intensity fit, per acquired slice of the moving volume.
        resid = diff - float(sol[6]) * ref - float(sol[7])
        nz = self.shape[2]
        k = np.clip(np.rint(z[inside]), 0, nz - 1).astype(np.intp)
        counts = np.bincount(k, minlength=nz)
        sums = np.bincount(k, weights=resid * resid, minlength=nz)
        usable = counts >= max(32, int(0.1 * counts.max()))
        if int(usable.sum()) >= 3:
            ms = sums[usable] / counts[usable]
            typical = float(np.median(ms))
            if typical > 0.0:
                ratio = ms / typical
                worst = int(np.argmax(ratio))
                if float(ratio[worst]) > self.slice_outlier_ratio:
                    slice_k = int(np.flatnonzero(usable)[worst])
                    return (
                        correlation,
                        cost,
                        gain,
                        f"slice {slice_k} residual {float(ratio[worst]):.0f}x the median slice "
                        "(spike or dropout)",
                    )
        if len(self._costs) >= 5:
            usual = float(np.median(np.asarray(self._costs)))
            if usual > 0.0 and cost > self.residual_outlier_ratio * usual:
                return (
                    correlation,
                    cost,
                    gain,
                    f"residual {cost / usual:.0f}x the recent median (spike)",
                )
        return correlation, cost, gain, None

    def _fallback(
        self, index: int, vol: F32, reason: str, *, filled: bool = False
    ) -> MotionEstimate:
        """A flagged estimate: previous motion, volume resliced with it."""
        return MotionEstimate(
            index=index,
            params=self.last_params,
            corrected=self.reslice(vol, self._last),
            iterations=0,
            converged=False,
            correlation=0.0,
            cost=1.0,
            gain=1.0,
            flagged=True,
            reason=reason,
            filled=filled,
        )

    def reslice(self, volume: npt.ArrayLike, matrix: npt.ArrayLike) -> F32:
        """Resample ``volume`` at ``matrix @ x`` for every reference voxel ``x`` (edges clamp)."""
        vol = np.asarray(volume, dtype=np.float32)
        v = self._ras2vox @ np.asarray(matrix, dtype=np.float64) @ self.vox2ras
        if self.reslice_order == 3:
            out3: F32 = ndimage.affine_transform(
                vol, v[:3, :3], offset=v[:3, 3], order=3, mode="nearest", output=np.float32
            )
            return out3
        coords = np.einsum("ij,jn->in", v[:3, :3].astype(np.float32), self._grid)
        coords += v[:3, 3:4].astype(np.float32)
        out: F32 = self._sampler.sample(vol, coords).reshape(self.shape)
        return out


def _dot(a: npt.NDArray[np.floating], b: npt.NDArray[np.floating]) -> float:
    return float(np.einsum("n,n->", a, b))


def _params_tuple(p: F64) -> Params:
    return (float(p[0]), float(p[1]), float(p[2]), float(p[3]), float(p[4]), float(p[5]))
