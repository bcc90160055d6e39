"""Subject EPI to MNI152: a 12-dof affine, and template masks pulled into native space.

Method (pure numpy/scipy):

- The reference is an *EPI-like* template synthesised from the MNI152 tissue
  maps, ``1500 CSF + 1000 GM + 700 WM`` (T2*-weighted contrast: CSF brighter
  than grey matter, grey brighter than white; the same levels as the
  simulator's phantom). Against it, plain least squares works across the
  EPI/T1 contrast gap, which a T1 template would not allow.
- Model: ``I(x) = a * S(A x) + b`` for native points ``x`` (scanner RAS+ mm)
  inside the subject's dilated EPI foreground, where ``S`` is the synthetic
  template, ``A`` the native-to-MNI affine (12 parameters, written about the
  foreground's centroid so that the translation and the linear part are
  nearly decoupled) and ``a``, ``b`` a gain and offset. Levenberg-Marquardt
  on the 14 parameters with analytic Jacobians (template gradients sampled
  trilinearly at the mapped points).
- Start: the centroids of the two foregrounds are matched (scanner RAS and
  MNI origins can be centimetres apart); then three pyramid levels, both
  images Gaussian-smoothed to 6, 3 and 1.5 mm with points taken every 3rd, 2nd
  and 1st voxel.

Masks (brain, seed, search region, WM, CSF) go the other way by inverse
mapping: each native voxel centre is sent through ``native2mni`` into the
template grid and takes the value of the nearest template voxel (nearest
neighbour, so masks stay masks). Mapping quality is reported as the Dice
overlap between the mapped template brain and the EPI's own foreground, and
the correlation of the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from boldstream.analysis.motion import foreground_mask
from boldstream.analysis.rois import TemplateRois
from boldstream.analysis.template import Template, load_template
from boldstream.errors import AnalysisError

__all__ = [
    "EPI_TISSUE_LEVELS",
    "NativeRois",
    "Registration",
    "epi_like_template",
    "map_to_native",
    "native_rois",
    "register_to_template",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

#: EPI intensity per tissue of the synthetic template (CSF > GM > WM).
EPI_TISSUE_LEVELS = {"csf": 1500.0, "gm": 1000.0, "wm": 700.0}
#: (smoothing mm, point stride in voxels) per pyramid level, coarse to fine.
_LEVELS = ((6.0, 3), (3.0, 2), (1.5, 1))
_RADIUS_MM = 50.0


@dataclass(frozen=True, slots=True)
class Registration:
    """The native (scanner RAS+) to MNI affine, and how good it is."""

    #: 4x4: scanner RAS+ mm -> MNI mm.
    native2mni: F64
    #: Dice overlap of the mapped template brain mask and the EPI foreground.
    dice: float
    #: Pearson correlation of the EPI and the fitted template at the points.
    correlation: float
    iterations: int
    #: The finest level's last step moved less than ``tol_mm``.
    converged: bool
    #: Volumes averaged into the image that was registered (0 when unknown).
    n_volumes: int = 0

    @property
    def mni2native(self) -> F64:
        out: F64 = np.asarray(np.linalg.inv(self.native2mni), dtype=np.float64)
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "native2mni": self.native2mni.tolist(),
            "dice": self.dice,
            "correlation": self.correlation,
            "iterations": self.iterations,
            "converged": self.converged,
            "n_volumes": self.n_volumes,
        }


def epi_like_template(template: Template | None = None) -> F32:
    """The synthetic EPI-contrast template (see the module docstring)."""
    tpl = template if template is not None else load_template()
    levels = EPI_TISSUE_LEVELS
    out: F32 = (
        levels["csf"] * np.asarray(tpl.csf)
        + levels["gm"] * np.asarray(tpl.gm)
        + levels["wm"] * np.asarray(tpl.wm)
    ).astype(np.float32)
    return out


def _world(affine: F64, ijk: F64) -> F64:
    out: F64 = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return out


def _voxel_sizes(affine: F64) -> F64:
    out: F64 = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return out


def _smooth(volume: F32, affine: F64, sigma_mm: float) -> F32:
    sigma = sigma_mm / _voxel_sizes(affine)
    out: F32 = ndimage.gaussian_filter(volume.astype(np.float32), sigma, mode="constant")
    return out


def _centroid(affine: F64, mask: Mask) -> F64:
    ijk = np.argwhere(mask).T.astype(np.float64)
    out: F64 = _world(affine, ijk).mean(axis=1)
    return out


def _step_mm(delta_m: F64, delta_t: F64) -> float:
    """RMS displacement (mm) of a change of the affine over a 50 mm ball."""
    return math.sqrt(
        _RADIUS_MM**2 / 5.0 * float(np.sum(delta_m * delta_m)) + float(delta_t @ delta_t)
    )


def register_to_template(
    mean_epi: npt.ArrayLike,
    vox2ras: npt.ArrayLike,
    *,
    template: Template | None = None,
    max_iter: int = 40,
    tol_mm: float = 0.01,
    n_volumes: int = 0,
) -> Registration:
    """12-dof affine from the subject's mean EPI (scanner RAS+) to MNI152."""
    image = np.nan_to_num(np.asarray(mean_epi, dtype=np.float32))
    if image.ndim != 3 or min(image.shape) < 4:
        raise AnalysisError(f"registration needs a 3-D image, got shape {image.shape}")
    native = np.asarray(vox2ras, dtype=np.float64)
    tpl = template if template is not None else load_template()
    synth = epi_like_template(tpl)
    tpl_affine = np.asarray(tpl.vox2mni, dtype=np.float64)
    tpl_inv: F64 = np.asarray(np.linalg.inv(tpl_affine), dtype=np.float64)
    fg = foreground_mask(image)
    if fg.sum() < 100:
        raise AnalysisError("the mean EPI has almost no foreground to register")
    points_mask = ndimage.binary_dilation(fg, iterations=2)
    centre = _centroid(native, fg)
    # Start: identity linear part, foreground centroids matched.
    m = np.eye(3)
    t = _centroid(tpl_affine, synth > 0.5 * float(np.percentile(synth[synth > 0], 50)))
    gain, offset = 1.0, 0.0
    iterations = 0
    converged = False
    for sigma_mm, stride in _LEVELS:
        converged = False  # what is reported is the finest level's
        s_level = _smooth(synth, tpl_affine, sigma_mm)
        grads = np.gradient(s_level)
        # voxel gradient -> MNI-mm gradient: d/dy = inv(A)^T d/dijk
        g_vox = [g.astype(np.float32) for g in grads]
        i_level = _smooth(image, native, sigma_mm)
        sub = np.zeros_like(points_mask)
        sub[::stride, ::stride, ::stride] = True
        ijk = np.argwhere(points_mask & sub).T.astype(np.float64)
        x = _world(native, ijk) - centre[:, None]
        values = i_level[tuple(ijk.astype(np.intp))].astype(np.float64)
        if iterations == 0:
            # intensity scale from the overlap at the start
            y0 = m @ x + t[:, None]
            s0 = ndimage.map_coordinates(s_level, _world(tpl_inv, y0), order=1, cval=0.0)
            gain = float(values.mean() / max(float(s0.mean()), 1e-6))
        lam = 1e-3
        cost = math.inf
        prev = (m.copy(), t.copy(), gain, offset)
        for _ in range(max_iter):
            iterations += 1
            y = m @ x + t[:, None]
            vox = _world(tpl_inv, y)
            s = ndimage.map_coordinates(s_level, vox, order=1, cval=0.0)
            gv = np.stack([ndimage.map_coordinates(g, vox, order=1, cval=0.0) for g in g_vox])
            gy = tpl_inv[:3, :3].T @ gv  # (3, N) gradient in MNI mm
            r = values - gain * s - offset
            new_cost = float(r @ r)
            if new_cost > cost:
                # reject the last step, damp more
                m, t, gain, offset = prev
                lam *= 10.0
                if lam > 1e6:
                    break
                y = m @ x + t[:, None]
                vox = _world(tpl_inv, y)
                s = ndimage.map_coordinates(s_level, vox, order=1, cval=0.0)
                gv = np.stack([ndimage.map_coordinates(g, vox, order=1, cval=0.0) for g in g_vox])
                gy = tpl_inv[:3, :3].T @ gv
                r = values - gain * s - offset
            else:
                cost = new_cost
                lam = max(lam / 3.0, 1e-6)
            # Jacobian of the model a*S(Mx+t)+b: columns M (row-major), t, a, b.
            ag = gain * gy
            jac = np.empty((14, x.shape[1]))
            for i in range(3):
                for j in range(3):
                    jac[3 * i + j] = ag[i] * x[j]
                jac[9 + i] = ag[i]
            jac[12] = s
            jac[13] = 1.0
            h = jac @ jac.T
            grad = jac @ r
            h_damped = h + lam * np.diag(np.diag(h) + 1e-12)
            try:
                delta = np.linalg.solve(h_damped, grad)
            except np.linalg.LinAlgError:
                break
            prev = (m.copy(), t.copy(), gain, offset)
            dm = delta[:9].reshape(3, 3)
            dt = delta[9:12]
            m = m + dm
            t = t + dt
            gain += float(delta[12])
            offset += float(delta[13])
            if _step_mm(dm, dt) < tol_mm:
                converged = True
                break
    native2mni = np.eye(4)
    native2mni[:3, :3] = m
    native2mni[:3, 3] = t - m @ centre
    if not np.isfinite(native2mni).all() or abs(np.linalg.det(m)) < 0.3:
        raise AnalysisError("registration to the template diverged")
    # quality at full resolution
    ijk_all = np.argwhere(fg).T.astype(np.float64)
    vox = _world(tpl_inv @ native2mni, _world(native, ijk_all))
    s_full = ndimage.map_coordinates(synth, vox, order=1, cval=0.0)
    corr = float(np.corrcoef(s_full, image[fg].astype(np.float64))[0, 1])
    brain = map_to_native(tpl.brain_mask, tpl_affine, native2mni, image.shape, native)
    dice = _dice(brain, fg)
    return Registration(
        native2mni=native2mni,
        dice=dice,
        correlation=corr if math.isfinite(corr) else 0.0,
        iterations=iterations,
        converged=converged,
        n_volumes=int(n_volumes),
    )


def _dice(a: Mask, b: Mask) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 0.0


def map_to_native(
    mask: npt.ArrayLike,
    vox2mni: npt.ArrayLike,
    native2mni: npt.ArrayLike,
    shape: tuple[int, ...],
    vox2ras: npt.ArrayLike,
) -> Mask:
    """A template-grid mask pulled onto the native grid (nearest neighbour)."""
    src = np.asarray(mask, dtype=bool)
    to_tpl = (
        np.linalg.inv(np.asarray(vox2mni, dtype=np.float64))
        @ np.asarray(native2mni, dtype=np.float64)
        @ np.asarray(vox2ras, dtype=np.float64)
    )
    grid = (int(shape[0]), int(shape[1]), int(shape[2]))
    out = ndimage.affine_transform(
        src.astype(np.uint8), to_tpl, output_shape=grid, order=0, mode="constant", cval=0
    )
    result: Mask = out.astype(bool)
    return result


@dataclass(frozen=True, slots=True, eq=False)
class NativeRois:
    """The analysis masks on the subject's EPI grid (all share ``vox2ras``)."""

    brain: Mask
    seed: Mask
    search: Mask
    wm: Mask
    csf: Mask
    vox2ras: F64
    registration: Registration

    def counts(self) -> dict[str, int]:
        """Voxels per mask (for logs and warnings)."""
        return {
            "brain": int(self.brain.sum()),
            "seed": int(self.seed.sum()),
            "search": int(self.search.sum()),
            "wm": int(self.wm.sum()),
            "csf": int(self.csf.sum()),
        }


def native_rois(
    rois: TemplateRois,
    registration: Registration,
    mean_epi: npt.ArrayLike,
    vox2ras: npt.ArrayLike,
) -> NativeRois:
    """Template masks in the subject's grid.

    The brain mask is the EPI foreground (mean image threshold) inside the
    mapped template brain dilated by one voxel (SPEC 4); every other mask is
    kept inside it.
    """
    image = np.asarray(mean_epi, dtype=np.float32)
    affine = np.asarray(vox2ras, dtype=np.float64)
    shape = image.shape

    def pull(mask: Mask) -> Mask:
        return map_to_native(mask, rois.vox2mni, registration.native2mni, shape, affine)

    template_brain = ndimage.binary_dilation(pull(rois.brain))
    brain = foreground_mask(image) & template_brain
    if not brain.any():
        raise AnalysisError("the EPI foreground and the mapped template brain do not overlap")
    masks = {name: pull(m) & brain for name, m in rois.masks().items() if name != "brain"}
    for name in ("seed", "search"):
        if not masks[name].any():
            raise AnalysisError(f"the {name} region falls outside the EPI slab")
    return NativeRois(
        brain=brain,
        seed=masks["seed"],
        search=masks["search"],
        wm=masks["wm"],
        csf=masks["csf"],
        vox2ras=affine,
        registration=registration,
    )
