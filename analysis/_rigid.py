"""Rigid-body parameters in RAS+ world millimetres, and displacements between them.

Convention (the one :mod:`boldstream.analysis.motion` reports, fMRIPrep's
confound names): ``params = (trans_x, trans_y, trans_z, rot_x, rot_y, rot_z)``,
translations in mm along RAS+ axes, rotations in radians about the RAS+ axes
through a centre ``c`` (the centre of the volume). The matrix is

    M(p) = T(c + t) @ R @ T(-c),   R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x)

(scipy's extrinsic ``"xyz"`` Euler angles, as in
:mod:`boldstream.simulator.phantom`). ``M`` describes the head motion: a point at
world position ``x`` in the reference volume is found at ``M @ x`` in the
moved volume, so resampling ``I_moved(M @ x)`` on the reference grid undoes
the motion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "displacement_mm",
    "matrix_to_params",
    "params_to_matrix",
    "rms_displacement_mm",
    "rotation_matrix",
    "volume_centre",
]

FloatArray = npt.NDArray[np.float64]
ParamsLike = Sequence[float] | npt.NDArray[np.floating]


def rotation_matrix(rot_x: float, rot_y: float, rot_z: float) -> FloatArray:
    """``Rz @ Ry @ Rx`` for angles in radians (3x3)."""
    cx, sx = math.cos(rot_x), math.sin(rot_x)
    cy, sy = math.cos(rot_y), math.sin(rot_y)
    cz, sz = math.cos(rot_z), math.sin(rot_z)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    out: FloatArray = rz @ ry @ rx
    return out


def _as_params(params: ParamsLike) -> FloatArray:
    p = np.asarray(params, dtype=np.float64).reshape(-1)
    if p.shape != (6,):
        raise ValueError(f"expected 6 rigid parameters, got shape {np.shape(params)}")
    return p


def params_to_matrix(params: ParamsLike, *, centre: ParamsLike = (0.0, 0.0, 0.0)) -> FloatArray:
    """4x4 world matrix of ``params`` rotating about ``centre`` (mm)."""
    p = _as_params(params)
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    r = rotation_matrix(p[3], p[4], p[5])
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + p[:3] - r @ c
    return m


def matrix_to_params(matrix: npt.ArrayLike, *, centre: ParamsLike = (0.0, 0.0, 0.0)) -> FloatArray:
    """Inverse of :func:`params_to_matrix` (``rot_y`` in [-pi/2, pi/2])."""
    m = np.asarray(matrix, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    r = m[:3, :3]
    rot_y = -math.asin(max(-1.0, min(1.0, float(r[2, 0]))))
    rot_x = math.atan2(float(r[2, 1]), float(r[2, 2]))
    rot_z = math.atan2(float(r[1, 0]), float(r[0, 0]))
    t = m[:3, 3] + r @ c - c
    return np.array([t[0], t[1], t[2], rot_x, rot_y, rot_z])


def volume_centre(vox2ras: npt.ArrayLike, shape: Sequence[int]) -> FloatArray:
    """World (RAS+ mm) position of the centre of a voxel grid."""
    a = np.asarray(vox2ras, dtype=np.float64)
    mid = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    out: FloatArray = a[:3, :3] @ mid + a[:3, 3]
    return out


def displacement_mm(a: ParamsLike, b: ParamsLike, *, radius: float = 50.0) -> float:
    """Power et al. (2012) framewise displacement between two parameter sets.

    ``|dx| + |dy| + |dz| + radius * (|d rot_x| + |d rot_y| + |d rot_z|)``:
    rotations become arc lengths on a sphere of ``radius`` mm.
    """
    d = np.abs(_as_params(b) - _as_params(a))
    return float(d[:3].sum() + radius * d[3:].sum())


def rms_displacement_mm(a: ParamsLike, b: ParamsLike, *, radius: float = 50.0) -> float:
    """RMS distance between where ``a`` and ``b`` put the points of a ball.

    The ball has ``radius`` mm about the centre the parameters rotate about.
    Exact for any pair of rigid transforms (as in Jenkinson 1999): with
    ``A = R_b - R_a`` and ``t = t_b - t_a`` in centred coordinates,
    ``E|A x + t|^2 = radius**2 / 5 * trace(A.T @ A) + t @ t`` over the ball.
    """
    ma = params_to_matrix(a)
    mb = params_to_matrix(b)
    rot = mb[:3, :3] - ma[:3, :3]
    t = mb[:3, 3] - ma[:3, 3]
    return float(math.sqrt(radius**2 / 5.0 * float(np.sum(rot * rot)) + float(t @ t)))
