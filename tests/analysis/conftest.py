"""Synthetic EPI head series with known rigid motion, for motion and QC tests.

The head is an analytic function of world position (RAS+ mm), so every
volume is sampled exactly at its moved position with no interpolation of a
template: a scalp shell, CSF around a brain ellipsoid, a grey-matter ribbon
whose inner boundary is folded by a few 3D cosines (gyri-like), white
matter with a smooth texture, two ventricles. Edges are smooth over about
half a voxel (partial volume). A coil sensitivity bias field stays fixed in
the scanner frame (it does not move with the head), and Rician noise is
added, as in magnitude images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from boldstream.analysis._rigid import params_to_matrix, rotation_matrix, volume_centre

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def _smooth_step(x: F64, width: float) -> F64:
    """0 -> 1 across x = 0 over about ``width`` mm."""
    out: F64 = 0.5 * (1.0 + np.tanh(x / (0.5 * width)))
    return out


@dataclass(frozen=True)
class HeadModel:
    """An analytic EPI-like head centred at ``origin`` (RAS+ mm)."""

    origin: tuple[float, float, float] = (2.0, -6.0, 4.0)
    seed: int = 7

    def intensity(self, world: F64, *, edge_mm: float) -> F64:
        """Noise-free intensity at world points (3, N)."""
        rng = np.random.default_rng(self.seed)
        d = world - np.asarray(self.origin)[:, None]
        x, y, z = d

        def field(n: int, shortest: float, longest: float) -> F64:
            """Sum of random plane waves, unit variance."""
            out = np.zeros_like(x)
            for _ in range(n):
                k = rng.normal(size=3)
                k *= 2 * math.pi / rng.uniform(shortest, longest) / np.linalg.norm(k)
                out += np.cos(k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 2 * math.pi))
            out *= math.sqrt(2.0 / n)
            return out

        def depth(
            ax: float, ay: float, az: float, cx: float = 0, cy: float = 0, cz: float = 0
        ) -> F64:
            """Approximate depth (mm) inside an ellipsoid, negative outside."""
            r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2)
            out: F64 = (1.0 - r) * (ax * ay * az) ** (1.0 / 3.0)
            return out

        folds = field(10, 16.0, 34.0)
        sulci = field(12, 12.0, 26.0)
        texture = field(8, 10.0, 30.0)

        in_head = _smooth_step(depth(74, 92, 76, 0, -2, -8), edge_mm)
        in_skull = _smooth_step(depth(70, 88, 72, 0, -2, -8), edge_mm)
        brain_depth = depth(66, 82, 60)
        in_brain = _smooth_step(brain_depth, edge_mm)
        # White matter starts 4-14 mm under the brain surface (gyri and sulci).
        in_wm = _smooth_step(brain_depth - 9.0 - 5.0 * folds, edge_mm) * in_brain
        # Thin CSF-filled sulci cut through the cortex.
        cortex = in_brain - in_wm
        sulcus = (
            0.8 * np.exp(-((sulci / (0.2 * edge_mm)) ** 2)) * _smooth_step(18.0 - brain_depth, 4.0)
        )
        vent = np.maximum(
            _smooth_step(depth(8, 24, 10, -10, 4, 8), edge_mm),
            _smooth_step(depth(8, 24, 10, 10, 4, 8), edge_mm),
        )
        nuclei = np.maximum(
            _smooth_step(depth(9, 14, 11, -20, -4, -2), edge_mm),
            _smooth_step(depth(9, 14, 11, 20, -4, -2), edge_mm),
        )

        csf_val, gm_val = 1.5, 1.0 + 0.05 * texture
        wm_val = 0.68 + 0.05 * texture
        img = 0.2 * (in_head - in_skull) + csf_val * (in_skull - in_brain)
        img = img + cortex * (gm_val * (1.0 - sulcus) + csf_val * sulcus)
        deep = wm_val * (1.0 - nuclei) + 0.92 * nuclei
        img = img + in_wm * (deep * (1.0 - vent) + csf_val * vent)
        out: F64 = img
        return out


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, int, int]
    vox2ras: F64

    @property
    def centre(self) -> F64:
        return volume_centre(self.vox2ras, self.shape)


def make_geometry(
    shape: tuple[int, int, int],
    voxel: tuple[float, float, float],
    *,
    oblique_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Geometry:
    """Grid centred near the scanner isocentre, optionally oblique."""
    rot = rotation_matrix(*(math.radians(a) for a in oblique_deg))
    lin = rot @ np.diag(voxel)
    aff = np.eye(4)
    aff[:3, :3] = lin
    mid = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    aff[:3, 3] = np.array([1.5, -3.0, 6.0]) - lin @ mid
    return Geometry(shape=shape, vox2ras=aff)


def motion_trace(n: int, *, seed: int, max_trans: float = 3.0, max_rot_deg: float = 3.0) -> F64:
    """Slow drift plus sudden jerks, volume 0 at rest; (n, 6) params."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n)
    p = np.zeros((n, 6))
    for j in range(6):
        amp = rng.uniform(0.3, 0.7)
        p[:, j] = amp * (
            t * rng.choice([-1, 1]) + 0.4 * np.sin(2 * math.pi * t * rng.uniform(0.5, 2))
        )
    # Jerks: a sudden move that mostly stays (head settles in a new place).
    for at in rng.choice(np.arange(3, n), size=max(2, n // 10), replace=False):
        jerk = rng.uniform(-0.6, 0.6, size=6)
        p[at:, :] += 0.7 * jerk
        p[at, :] += 0.3 * jerk
    p -= p[0]
    peak = np.abs(p).max(axis=0)
    p[:, :3] *= max_trans / max(peak[:3].max(), 1e-9)
    p[:, 3:] *= math.radians(max_rot_deg) / max(peak[3:].max(), 1e-9)
    return p


def render(
    model: HeadModel,
    geom: Geometry,
    params: F64,
    *,
    noise: float,
    rng: np.random.Generator,
    bias: bool = True,
) -> F32:
    """One volume of the head moved by ``params`` (about the grid centre)."""
    m = params_to_matrix(params, centre=geom.centre)
    grid = np.indices(geom.shape, dtype=np.float64).reshape(3, -1)
    world = geom.vox2ras[:3, :3] @ grid + geom.vox2ras[:3, 3:4]
    inv = np.linalg.inv(m)
    head_pts = inv[:3, :3] @ world + inv[:3, 3:4]
    edge = float(np.sqrt((geom.vox2ras[:3, :3] ** 2).sum(axis=0)).mean())
    img = 100.0 * model.intensity(head_pts, edge_mm=edge)
    if bias:
        w = world / 100.0
        img *= 1.0 + 0.06 * w[0] - 0.04 * w[1] + 0.05 * w[2] - 0.03 * w[0] * w[2]
    re = img + rng.normal(0.0, noise, img.shape)
    im = rng.normal(0.0, noise, img.shape)
    out: F32 = np.sqrt(re * re + im * im).astype(np.float32).reshape(geom.shape)
    return out


@dataclass(frozen=True)
class Series:
    geometry: Geometry
    truth: F64  # (n, 6)
    volumes: list[F32]


def make_series(geom: Geometry, n: int, *, seed: int, noise: float = 1.5) -> Series:
    rng = np.random.default_rng(seed)
    truth = motion_trace(n, seed=seed)
    model = HeadModel()
    vols = [render(model, geom, truth[i], noise=noise, rng=rng) for i in range(n)]
    return Series(geometry=geom, truth=truth, volumes=vols)


@pytest.fixture(scope="session")
def series_64() -> Series:
    """64x64x36 at 3 mm, axis-aligned."""
    return make_series(make_geometry((64, 64, 36), (3.0, 3.0, 3.0)), 40, seed=1)


@pytest.fixture(scope="session")
def series_64_oblique() -> Series:
    """64x64x36 at 3x3x3.3 mm, oblique (15 deg about x, 8 deg about z)."""
    geom = make_geometry((64, 64, 36), (3.0, 3.0, 3.3), oblique_deg=(15.0, 0.0, 8.0))
    return make_series(geom, 40, seed=2)


@pytest.fixture(scope="session")
def series_90() -> Series:
    """90x90x60 at 2.4 mm (ABCD-like), slightly oblique."""
    geom = make_geometry((90, 90, 60), (2.4, 2.4, 2.4), oblique_deg=(-10.0, 4.0, 0.0))
    return make_series(geom, 30, seed=3)
