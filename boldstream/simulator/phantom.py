"""A resting-state run with known truth, built from the shipped MNI152 tissue maps.

The head (the template's brain) sits in the scanner with a rigid pose; an EPI
slab (a fixed voxel grid in scanner RAS+) samples it once per volume. Signals
live in template space, so head motion is a rigid transform of the head applied
before sampling, exactly as in a real scanner.

Signal model per brain voxel ``v`` and volume ``t``::

    S(v, t) = S0(v) * (1 + sum_k W[k, v] * c_k(t))

- ``S0``: EPI-like contrast, CSF > GM > WM, times a smooth receive-coil bias;
- components ``c_k``: 0.01-0.1 Hz band-limited unit-variance time courses for a
  global signal, a few smooth spatial "networks" (kept off the seed, so the
  planted pair is the seed's only network), a CSF pulsation term and the
  planted sgACC/DLPFC pair (``target = -r * seed + sqrt(1 - r^2) * other``);
- then Rician thermal noise ``|S + n1 + i n2|`` in the EPI grid.

Motion convention (fMRIPrep confounds): per volume ``trans_x, trans_y,
trans_z`` (mm) and ``rot_x, rot_y, rot_z`` (rad), RAS+, about the EPI volume
centre, relative to volume 0. They describe the head displacement ``M_t``: the
head point at scanner position ``x`` in volume 0 sits at ``M_t(x)`` in volume
``t``, where ``M_t(x) = R (x - c) + c + T`` and
``R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)`` (scipy's extrinsic ``"xyz"`` Euler
angles). Resampling volume ``t`` at ``M_t(x)`` realigns it to volume 0.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from boldstream.analysis.template import Template, load_template
from boldstream.errors import BoldstreamError

__all__ = [
    "MOTION_PRESETS",
    "HeadPose",
    "MotionSpec",
    "PhantomRun",
    "SimulatorError",
    "epi_grid",
    "make_motion",
    "make_phantom_run",
    "rigid_matrix",
    "run_from_nifti",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
SEED_MNI = (6.0, 16.0, -10.0)
TARGET_MNI = (-40.0, 38.0, 34.0)
#: MNI point that the head pose rotates about and places near the slab centre.
BRAIN_CENTRE_MNI = (0.0, -14.0, 16.0)
#: EPI baseline intensity per tissue (arbitrary units, 16-bit friendly).
TISSUE_LEVELS = {"csf": 1500.0, "gm": 1000.0, "wm": 700.0}


class SimulatorError(BoldstreamError, ValueError):
    """The simulated scanner was asked for something it cannot produce."""


@dataclass(frozen=True, slots=True)
class HeadPose:
    """Rigid placement of the MNI head in the scanner.

    ``scanner = T(translation) @ R @ T(-BRAIN_CENTRE_MNI) @ mni`` with ``R``
    built like the motion rotations (extrinsic x, then y, then z, degrees).
    """

    rotation_deg: tuple[float, float, float] = (7.0, -2.0, 3.0)
    translation_mm: tuple[float, float, float] = (1.5, -3.0, 2.0)

    def mni2scanner(self) -> F64:
        rot = np.deg2rad(np.asarray(self.rotation_deg, dtype=np.float64))
        params = np.concatenate([np.asarray(self.translation_mm, dtype=np.float64), rot])
        centre = np.asarray(BRAIN_CENTRE_MNI, dtype=np.float64)
        shift = np.eye(4)
        shift[:3, 3] = -centre
        return rigid_matrix(params, centre) @ _translation(centre) @ shift


@dataclass(frozen=True, slots=True)
class MotionSpec:
    """Head motion: slow drift plus sudden jerks, clipped to a range."""

    #: Peak slow drift (translation mm / rotation deg) over the run.
    drift_mm: float = 0.4
    drift_deg: float = 0.3
    #: Jerks per minute, and their largest size.
    jerks_per_min: float = 0.5
    jerk_mm: float = 0.8
    jerk_deg: float = 0.6
    #: Largest absolute displacement allowed.
    max_mm: float = 3.0
    max_deg: float = 3.0


MOTION_PRESETS: dict[str, MotionSpec | None] = {
    "none": None,
    "mild": MotionSpec(),
    "heavy": MotionSpec(drift_mm=1.5, drift_deg=1.2, jerks_per_min=3.0, jerk_mm=2.5, jerk_deg=2.0),
}


def _translation(t: npt.ArrayLike) -> F64:
    out = np.eye(4)
    out[:3, 3] = np.asarray(t, dtype=np.float64)
    return out


def rigid_matrix(params: npt.ArrayLike, centre: npt.ArrayLike) -> F64:
    """4x4 of ``x -> R (x - c) + c + T`` for fMRIPrep-style ``params``.

    ``params`` = (trans_x, trans_y, trans_z, rot_x, rot_y, rot_z), mm and rad;
    ``R = Rz @ Ry @ Rx``.
    """
    p = np.asarray(params, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64)
    cx, cy, cz = np.cos(p[3:])
    sx, sy, sz = np.sin(p[3:])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    out[:3, 3] = c + p[:3] - out[:3, :3] @ c
    return out


def epi_grid(
    shape: tuple[int, int, int],
    voxel_mm: tuple[float, float, float],
    *,
    orientation: Literal["axial", "oblique"] = "axial",
    centre_ras: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> F64:
    """vox2ras of an EPI slab as a scanner prescribes it.

    Axial: DICOM rows run to the patient's left, columns to posterior, slices
    foot to head (LPS row/column cosines (1,0,0) and (0,1,0)). Oblique: the
    same slab tilted 15 degrees about left-right (towards AC-PC) and 5 about
    anterior-posterior. The slab centre lands on ``centre_ras``.
    """
    vox2ras = np.diag([-voxel_mm[0], -voxel_mm[1], voxel_mm[2], 1.0])
    if orientation == "oblique":
        tilt = rigid_matrix([0, 0, 0, math.radians(15.0), math.radians(5.0), 0.0], [0, 0, 0])
        vox2ras = tilt @ vox2ras
    elif orientation != "axial":
        raise SimulatorError(f"orientation must be 'axial' or 'oblique', not {orientation!r}")
    middle = vox2ras @ np.array([(n - 1) / 2.0 for n in shape] + [1.0])
    vox2ras[:3, 3] += np.asarray(centre_ras) - middle[:3]
    return vox2ras


def _band_limited(rng: np.random.Generator, n: int, tr_s: float, count: int) -> F64:
    """``count`` unit-variance time courses with power only in 0.01-0.1 Hz."""
    freqs = np.fft.rfftfreq(n, tr_s)
    band = (freqs >= 0.01) & (freqs <= 0.1)
    if not band.any():
        band = np.zeros_like(band)
        band[min(1, len(band) - 1)] = True
    spectrum = rng.standard_normal((count, len(freqs))) + 1j * rng.standard_normal(
        (count, len(freqs))
    )
    spectrum[:, ~band] = 0.0
    series = np.fft.irfft(spectrum, n=n, axis=1)
    series -= series.mean(axis=1, keepdims=True)
    std = series.std(axis=1, keepdims=True)
    std[std == 0] = 1.0
    out: F64 = series / std
    return out


def make_motion(
    spec: MotionSpec | None, *, n_volumes: int, tr_s: float, rng: np.random.Generator
) -> F64:
    """(n_volumes, 6) fMRIPrep-style parameters, volume 0 at zero."""
    params = np.zeros((n_volumes, 6))
    if spec is None or n_volumes < 2:
        return params
    # Slow drift: a smoothed random walk scaled to the requested peak.
    walk = np.cumsum(rng.standard_normal((n_volumes, 6)), axis=0)
    sigma = max(1.0, 30.0 / tr_s)
    walk = ndimage.gaussian_filter1d(walk, sigma, axis=0, mode="nearest")
    walk -= walk[0]
    peak = np.abs(walk).max(axis=0)
    peak[peak == 0] = 1.0
    scale = np.array([spec.drift_mm] * 3 + [math.radians(spec.drift_deg)] * 3)
    params += walk / peak * scale * rng.uniform(0.5, 1.0, 6)
    # Jerks: sudden steps (the head settles elsewhere) or spikes (it comes back).
    n_jerks = rng.poisson(spec.jerks_per_min * n_volumes * tr_s / 60.0)
    size = np.array([spec.jerk_mm] * 3 + [math.radians(spec.jerk_deg)] * 3)
    for _ in range(int(n_jerks)):
        start = int(rng.integers(1, n_volumes))
        delta = rng.uniform(-1.0, 1.0, 6) * size * rng.uniform(0.3, 1.0)
        if rng.random() < 0.5:
            params[start:] += delta
        else:
            params[start : start + int(rng.integers(1, 4))] += delta
    limit = np.array([spec.max_mm] * 3 + [math.radians(spec.max_deg)] * 3)
    clipped: F64 = np.clip(params - params[0], -limit, limit)
    return clipped


def _soft_sphere(grid_mm: F64, centre: tuple[float, float, float], radius: float) -> F64:
    dist = np.sqrt(((grid_mm - np.asarray(centre)[:, None]) ** 2).sum(axis=0))
    out: F64 = 1.0 / (1.0 + np.exp((dist - radius) / 1.0))
    return out


@dataclass(frozen=True, slots=True)
class _HeadModel:
    """Everything about the head that does not change with time (template space)."""

    #: Cropped template-space box that holds the brain, and its vox2mni.
    box_shape: tuple[int, int, int]
    box2mni: F64
    #: Flat indices of brain voxels in the box, their baseline and weights (K, n).
    brain_index: npt.NDArray[np.intp]
    baseline: F32
    weights: F32


@functools.cache
def _head_model(seed: int, radius_mm: float, target_mni: tuple[float, float, float]) -> _HeadModel:
    tpl: Template = load_template()
    mask = tpl.brain_mask
    # Crop to the brain (plus a margin) so that every volume costs less.
    nz = np.nonzero(mask)
    lo = np.maximum(np.min(nz, axis=1) - 2, 0)
    hi = np.minimum(np.max(nz, axis=1) + 3, mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    gm, wm, csf = tpl.gm[box], tpl.wm[box], tpl.csf[box]
    box2mni = tpl.vox2mni @ _translation(lo)
    rng = np.random.default_rng([seed, 1])
    # Smooth receive-coil bias: +-10 % over the head.
    bias = ndimage.gaussian_filter(rng.standard_normal(gm.shape), 12.0)
    bias = 1.0 + 0.1 * bias / max(float(np.abs(bias).max()), 1e-9)
    levels = TISSUE_LEVELS
    s0 = (levels["csf"] * csf + levels["gm"] * gm + levels["wm"] * wm) * bias
    brain = mask[box] | ((gm + wm + csf) > 0.05)
    index = np.flatnonzero(brain)
    grid_mm = (box2mni @ np.vstack([np.indices(gm.shape).reshape(3, -1), np.ones(gm.size)]))[:3]
    grid_mm = grid_mm[:, index]
    g, w, c = gm.ravel()[index], wm.ravel()[index], csf.ravel()[index]
    tissue = g + 0.4 * w + 0.2 * c
    comps: list[npt.NDArray[np.floating[Any]]] = [0.004 * tissue]  # global signal, ~0.4 %
    # The background networks leave the seed alone: where they loaded on the
    # sgACC they coupled it to random parts of the DLPFC for real (a weak but
    # reproducible anticorrelated cluster in about one "null" run in three),
    # so the planted pair would not be the only seed network and a null run
    # would not be null. 14 mm: the 10 mm seed ROI plus registration error.
    off_seed = 1.0 - _soft_sphere(grid_mm, SEED_MNI, 14.0)
    for _ in range(6):  # smooth background "networks"
        field_ = ndimage.gaussian_filter(rng.standard_normal(gm.shape), 4.0).ravel()[index]
        comps.append(0.003 * (g + 0.3 * w) * off_seed * field_ / field_.std())
    comps.append(0.01 * c)  # CSF pulsation
    planted = 0.9 * (g + 0.25)
    comps.append(0.02 * planted * _soft_sphere(grid_mm, SEED_MNI, radius_mm))
    comps.append(0.02 * planted * _soft_sphere(grid_mm, target_mni, radius_mm))
    weights = np.vstack(comps).astype(np.float32)
    return _HeadModel(
        box_shape=(int(gm.shape[0]), int(gm.shape[1]), int(gm.shape[2])),
        box2mni=box2mni,
        brain_index=index,
        baseline=s0.ravel()[index].astype(np.float32),
        weights=weights,
    )


class PhantomRun:
    """A run of volumes on a fixed grid, generated on demand (never all in memory).

    ``volume(t)`` is deterministic, so volumes can be produced in any order;
    ``data`` materialises the whole (i, j, k, t) float32 array.
    """

    def __init__(
        self,
        *,
        shape: tuple[int, int, int],
        vox2ras: F64,
        tr_s: float,
        n_volumes: int,
        truth: dict[str, Any],
        volume_fn: Callable[[int], F32],
    ) -> None:
        self.shape = shape
        self.vox2ras = np.asarray(vox2ras, dtype=np.float64)
        self.tr_s = float(tr_s)
        self.n_volumes = int(n_volumes)
        self.truth = truth
        self._volume_fn = volume_fn

    def volume(self, t: int) -> F32:
        if not 0 <= t < self.n_volumes:
            raise IndexError(f"volume {t} outside 0..{self.n_volumes - 1}")
        return self._volume_fn(t)

    def __iter__(self) -> Iterator[F32]:
        return self.iter_volumes()

    def iter_volumes(self) -> Iterator[F32]:
        for t in range(self.n_volumes):
            yield self._volume_fn(t)

    def __len__(self) -> int:
        return self.n_volumes

    @property
    def data(self) -> F32:
        """The whole run as one (i, j, k, t) float32 array (materialised each call)."""
        out = np.empty((*self.shape, self.n_volumes), dtype=np.float32)
        for t, vol in enumerate(self.iter_volumes()):
            out[..., t] = vol
        return out

    def write_truth(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.truth, indent=2) + "\n")
        return path


def _as_triple(value: float | tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value), float(value), float(value))
    a, b, c = value
    return (float(a), float(b), float(c))


def make_phantom_run(
    *,
    n_volumes: int = 200,
    tr_s: float = 2.0,
    shape: tuple[int, int, int] = (64, 64, 36),
    voxel_mm: float | tuple[float, float, float] = 3.0,
    orientation: Literal["axial", "oblique"] = "axial",
    vox2ras: npt.ArrayLike | None = None,
    motion: str | MotionSpec | None = "none",
    network_strength: float = 0.8,
    target_mni: tuple[float, float, float] = TARGET_MNI,
    region_radius_mm: float = 6.0,
    head_pose: HeadPose | None = None,
    thermal_sigma: float = 12.0,
    seed: int = 0,
) -> PhantomRun:
    """A simulated resting-state run with a planted sgACC-DLPFC anticorrelation.

    ``network_strength`` r in [0, 1]: the planted seed and target time courses
    correlate at -r (0 gives a null run). ``motion`` is a preset name
    ("none", "mild", "heavy") or a :class:`MotionSpec`. ``vox2ras`` overrides
    the slab that ``shape``/``voxel_mm``/``orientation`` describe.
    """
    if n_volumes < 1:
        raise SimulatorError(f"n_volumes must be at least 1, not {n_volumes}")
    if not (math.isfinite(tr_s) and tr_s > 0):
        raise SimulatorError(f"tr_s must be positive, not {tr_s}")
    if len(shape) != 3 or min(shape) < 1:
        raise SimulatorError(f"shape must be three positive voxel counts, not {tuple(shape)}")
    if not (math.isfinite(thermal_sigma) and thermal_sigma >= 0):
        raise SimulatorError(f"thermal_sigma must be zero or positive, not {thermal_sigma}")
    if not (math.isfinite(region_radius_mm) and region_radius_mm > 0):
        raise SimulatorError(f"region_radius_mm must be positive, not {region_radius_mm}")
    if not 0.0 <= network_strength <= 1.0:
        raise SimulatorError(f"network_strength must be in [0, 1], not {network_strength}")
    if isinstance(motion, str):
        if motion not in MOTION_PRESETS:
            raise SimulatorError(f"motion must be one of {sorted(MOTION_PRESETS)}, not {motion!r}")
        motion_name, spec = motion, MOTION_PRESETS[motion]
    else:
        motion_name, spec = ("custom" if motion is not None else "none"), motion
    voxel = _as_triple(voxel_mm)
    head_pose = head_pose if head_pose is not None else HeadPose()
    target = _as_triple(target_mni)
    if vox2ras is None and not all(math.isfinite(v) and v > 0 for v in voxel):
        raise SimulatorError(f"voxel_mm must be positive, not {voxel_mm}")
    grid = (
        np.asarray(vox2ras, dtype=np.float64)
        if vox2ras is not None
        else epi_grid(shape, voxel, orientation=orientation)
    )
    if (
        grid.shape != (4, 4)
        or not np.isfinite(grid).all()
        or abs(np.linalg.det(grid[:3, :3])) < 1e-9
    ):
        raise SimulatorError("vox2ras must be a finite, invertible 4x4 affine")
    model = _head_model(int(seed), float(region_radius_mm), target)
    rng = np.random.default_rng([seed, 2])
    n_comp = model.weights.shape[0]
    courses = _band_limited(rng, n_volumes, tr_s, n_comp)
    # CSF pulsation: aliased cardiac/respiratory noise, broadband.
    courses[-3] = rng.standard_normal(n_volumes)
    r = network_strength
    # The target's own part is made orthogonal to the seed course first, so the
    # planted pair correlates at exactly -r over this run (independent draws
    # of a few band-limited samples correlate at +-0.3 by chance, which would
    # plant a network in a null run).
    seed_course, own = courses[-2], courses[-1]
    norm = float(seed_course @ seed_course)
    if norm > 0:
        own = own - (own @ seed_course) / norm * seed_course
        own_std = float(own.std())
        own = own / own_std if own_std > 0 else own
    courses[-1] = -r * seed_course + math.sqrt(1.0 - r * r) * own
    courses32 = courses.astype(np.float32)
    params = make_motion(spec, n_volumes=n_volumes, tr_s=tr_s, rng=np.random.default_rng([seed, 3]))
    centre = (grid @ np.array([(n - 1) / 2.0 for n in shape] + [1.0]))[:3]
    mni2scanner = head_pose.mni2scanner()
    # EPI voxel -> template box voxel, before motion: box2mni^-1 @ scanner2mni @ vox2ras.
    scanner2box = np.linalg.inv(model.box2mni) @ np.linalg.inv(mni2scanner)
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    box_flat = np.zeros(int(np.prod(model.box_shape)), dtype=np.float32)
    sigma = float(thermal_sigma)

    def volume_fn(t: int) -> F32:
        signal = model.baseline * (1.0 + courses32[:, t] @ model.weights)
        box_flat[model.brain_index] = signal
        moved = np.linalg.inv(rigid_matrix(params[t], centre))
        affine = (scanner2box @ moved @ grid).astype(np.float32)
        coords = affine[:3, :3] @ ijk + affine[:3, 3:4]
        sampled = ndimage.map_coordinates(
            box_flat.reshape(model.box_shape), coords, order=1, output=np.float32, prefilter=False
        )
        noise_rng = np.random.default_rng([seed, 4, t])
        if sigma > 0:
            n = noise_rng.standard_normal((2, sampled.size), dtype=np.float32)
            n *= np.float32(sigma)
            sampled += n[0]
            np.hypot(sampled, n[1], out=sampled)
        out: F32 = sampled.reshape(shape)
        return out

    def scanner_of(mni: tuple[float, float, float]) -> dict[str, list[float]]:
        ras = (mni2scanner @ np.array([*mni, 1.0]))[:3]
        vox = np.linalg.solve(grid, np.array([*ras, 1.0]))[:3]
        return {
            "mni_mm": [float(v) for v in mni],
            "scanner_ras_mm": [round(float(v), 4) for v in ras],
            "scanner_lps_mm": [round(float(v), 4) for v in (-ras[0], -ras[1], ras[2])],
            "voxel_ijk": [round(float(v), 4) for v in vox],
        }

    truth: dict[str, Any] = {
        "generator": "boldstream.simulator.phantom",
        "seed": int(seed),
        "n_volumes": int(n_volumes),
        "tr_s": float(tr_s),
        "shape": [int(n) for n in shape],
        "voxel_mm": [float(v) for v in np.sqrt((grid[:3, :3] ** 2).sum(axis=0))],
        "orientation": orientation if vox2ras is None else "custom",
        "vox2ras": grid.tolist(),
        "head_pose": {
            "rotation_deg": list(head_pose.rotation_deg),
            "translation_mm": list(head_pose.translation_mm),
            "rotation_centre_mni_mm": list(BRAIN_CENTRE_MNI),
            "mni2scanner": mni2scanner.tolist(),
        },
        "network": {
            "strength": float(r),
            "expected_correlation": -float(r),
            "region_radius_mm": float(region_radius_mm),
            "seed": scanner_of(SEED_MNI),
            "target": scanner_of(target),
            "positions_at": "volume 0 (before motion)",
        },
        "motion": {
            "preset": motion_name,
            "spec": asdict(spec) if spec is not None else None,
            "columns": list(MOTION_COLUMNS),
            "units": ["mm", "mm", "mm", "rad", "rad", "rad"],
            "convention": "fMRIPrep: RAS+, about the volume centre, relative to volume 0; "
            "head point x (volume 0) is at R (x - c) + c + T in volume t, "
            "R = Rz(rot_z) Ry(rot_y) Rx(rot_x)",
            "centre_ras_mm": [float(v) for v in centre],
            "parameters": [[float(v) for v in row] for row in params],
        },
        "noise": {"thermal_sigma": sigma, "tissue_levels": dict(TISSUE_LEVELS)},
    }
    return PhantomRun(
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        vox2ras=grid,
        tr_s=tr_s,
        n_volumes=n_volumes,
        truth=truth,
        volume_fn=volume_fn,
    )


def run_from_nifti(path: str | Path, *, tr_s: float | None = None) -> PhantomRun:
    """A 4D NIfTI as a run (volumes read lazily); ``tr_s`` defaults to pixdim[4]."""
    path = Path(path)
    try:
        loaded = nib.load(str(path))
    except Exception as exc:
        raise SimulatorError(f"{path}: not a readable NIfTI image ({exc})") from None
    if not isinstance(loaded, nib.Nifti1Image | nib.Nifti2Image):
        raise SimulatorError(f"{path}: not a NIfTI image ({type(loaded).__name__})")
    img = loaded
    if len(img.shape) != 4:
        raise SimulatorError(f"{path} is not a 4D image (shape {img.shape})")
    header: Any = img.header
    zooms = header.get_zooms()
    tr = float(tr_s) if tr_s is not None else float(zooms[3]) if len(zooms) > 3 else 0.0
    if header.get_xyzt_units()[1] == "msec":
        tr = tr / 1000.0 if tr_s is None else tr
    if tr <= 0:
        raise SimulatorError(f"{path} states no repetition time; pass tr_s")
    shape = (int(img.shape[0]), int(img.shape[1]), int(img.shape[2]))
    vox2ras = np.asarray(img.affine, dtype=np.float64)
    proxy = img.dataobj

    def volume_fn(t: int) -> F32:
        return np.asarray(proxy[..., t], dtype=np.float32)

    truth: dict[str, Any] = {
        "generator": "boldstream.simulator.phantom.run_from_nifti",
        "source": str(path),
        "n_volumes": int(img.shape[3]),
        "tr_s": tr,
        "shape": list(shape),
        "vox2ras": vox2ras.tolist(),
    }
    return PhantomRun(
        shape=shape,
        vox2ras=vox2ras,
        tr_s=tr,
        n_volumes=int(img.shape[3]),
        truth=truth,
        volume_fn=volume_fn,
    )
