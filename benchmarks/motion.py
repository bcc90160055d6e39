"""Motion correction + QC per volume, against SimpleITK and python-rtspm, same run.

Data: the project's simulated scanner (``boldstream.simulator.phantom``, the
MNI152 head, "heavy" motion, oblique slab) at 64x64x36 / 3 mm and
90x90x60 / 2.4 mm. Each method registers every volume to volume 0 and
reslices it; error is the RMS displacement from the true motion over a 50 mm
sphere about the volume centre (mm). Prints a Markdown table.

    python benchmarks/motion.py                 # everything, 40 volumes each
    python benchmarks/motion.py --sizes 64 --methods ours,sitk --volumes 20

Not a test: timings on a shared 2-core machine are noisy, which is why all
methods run in the same process, interleaved volume by volume.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line, numerics_line

from boldstream.analysis.motion import (
    MotionCorrector,
    foreground_mask,
    matrix_to_params,
    rms_displacement_mm,
    volume_centre,
)
from boldstream.analysis.qc import QCAccumulator
from boldstream.simulator.phantom import make_phantom_run

# name: (matrix, voxel mm, TR s), SPEC section 7
SIZES: dict[str, tuple[tuple[int, int, int], float, float]] = {
    "64": ((64, 64, 36), 3.0, 2.0),
    "90": ((90, 90, 60), 2.4, 0.8),
}


class Ours:
    name = "boldstream motion + QC"

    def __init__(self, ref: Any, vox2ras: Any, tr_s: float) -> None:
        self.mc = MotionCorrector(ref, vox2ras)
        self.qc = QCAccumulator(foreground_mask(ref), tr_s=tr_s)

    def __call__(self, vol: Any) -> Any:
        est = self.mc.register(vol)
        self.qc.update(est.corrected, est.params, usable=not est.flagged)
        return self.mc.params_to_world(est.params)


class OursMotionOnly(Ours):
    name = "boldstream motion only"

    def __call__(self, vol: Any) -> Any:
        return self.mc.params_to_world(self.mc.register(vol).params)


class Sitk:
    """SimpleITK Euler3D, mean squares, linear interpolation, 2 levels, + linear reslice."""

    name = "SimpleITK rigid + reslice"

    def __init__(self, ref: Any, vox2ras: Any, tr_s: float) -> None:
        import SimpleITK as sitk  # noqa: N813 (the package's own spelling)

        self.sitk = sitk
        lin = vox2ras[:3, :3]
        self.spacing = [float(s) for s in np.sqrt((lin**2).sum(axis=0))]
        self.direction = [float(d) for d in (lin / np.sqrt((lin**2).sum(axis=0))).ravel()]
        self.origin = [float(o) for o in vox2ras[:3, 3]]
        self.centre = volume_centre(vox2ras, ref.shape)
        self.fixed = self.image(ref)
        self.mask = self.image(foreground_mask(ref, dilate=2).astype(np.uint8))
        self.last = sitk.Euler3DTransform()
        self.last.SetCenter([float(c) for c in self.centre])

    def image(self, a: Any) -> Any:
        img = self.sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(a).transpose(2, 1, 0)))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def __call__(self, vol: Any) -> Any:
        sitk = self.sitk
        moving = self.image(vol.astype(np.float32))
        tx = sitk.Euler3DTransform(self.last)  # start from the previous estimate
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        reg.SetMetricFixedMask(self.mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=200, relaxationFactor=0.6
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(self.fixed, moving)
        sitk.Resample(moving, self.fixed, tx, sitk.sitkLinear, 0.0)
        self.last = tx
        a = np.array(tx.GetMatrix()).reshape(3, 3)
        c = np.array(tx.GetCenter())
        m = np.eye(4)
        m[:3, :3] = a
        m[:3, 3] = np.array(tx.GetTranslation()) + c - a @ c
        return m


class Rtspm:
    """python-rtspm (OpenNFT's SPM realign/reslice), with OpenNFT's flags."""

    name = "python-rtspm realign + reslice"

    def __init__(self, ref: Any, vox2ras: Any, tr_s: float) -> None:
        import rtspm

        self.rtspm = rtspm
        # SPM's mat maps 1-based voxel indices to mm.
        shift = np.eye(4)
        shift[:3, 3] = -1.0
        self.mat = vox2ras @ shift
        self.dim = np.array(ref.shape)
        self.r = [
            {"mat": self.mat.copy(), "dim": self.dim, "Vol": np.asfortranarray(ref, np.float64)},
            {"mat": self.mat.copy(), "dim": self.dim, "Vol": None},
        ]
        self.flags = {
            "quality": 0.9,
            "fwhm": 5,
            "sep": 4,
            "interp": 4,
            "wrap": np.zeros((3, 1)),
            "rtm": 0,
            "PW": "",
            "lkp": np.arange(6),
        }
        self.reslice_flags = {
            "quality": 0.9,
            "fwhm": 5,
            "sep": 4,
            "interp": 4,
            "wrap": np.zeros((3, 1)),
            "mask": 1,
            "mean": 0,
            "which": 2,
        }
        self.state: tuple[Any, ...] = (None,) * 6
        self.count = 0

    def __call__(self, vol: Any) -> Any:
        self.count += 1
        self.r[1] = {
            "mat": self.mat.copy(),
            "dim": self.dim,
            "Vol": np.asfortranarray(vol, np.float64),
        }
        a0, x1, x2, x3, deg, b = self.state
        out = self.rtspm.spm_realign_rt(self.r, self.flags, self.count, 1, a0, x1, x2, x3, deg, b)
        self.r, a0, x1, x2, x3, deg, b, _ = out
        self.state = (a0, x1, x2, x3, deg, b)
        self.rtspm.spm_reslice_rt(self.r, self.reslice_flags)
        # The realigned image's mat places its voxels where the reference's are:
        # head motion (reference -> moved) is mat0 @ inv(mat_new).
        return self.mat @ np.linalg.inv(self.r[1]["mat"])


METHODS: dict[str, Callable[..., Any]] = {
    "ours": Ours,
    "ours-motion": OursMotionOnly,
    "sitk": Sitk,
    "rtspm": Rtspm,
}


def run(size: str, methods: list[str], n: int, seed: int) -> list[list[str]]:
    shape, voxel_mm, tr_s = SIZES[size]
    sim = make_phantom_run(
        n_volumes=n,
        tr_s=tr_s,
        shape=shape,
        voxel_mm=voxel_mm,
        orientation="oblique",
        motion="heavy",
        seed=seed,
    )
    truth = np.asarray(sim.truth["motion"]["parameters"])
    vols = list(sim.iter_volumes())
    centre = volume_centre(sim.vox2ras, sim.shape)
    runners: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name in methods:
        try:
            runners[name] = METHODS[name](vols[0], sim.vox2ras, sim.tr_s)
        except Exception as exc:  # record why a peer cannot run, keep going
            notes[name] = f"{type(exc).__name__}: {exc}"
    times: dict[str, list[float]] = {k: [] for k in runners}
    errs: dict[str, list[float]] = {k: [] for k in runners}
    for t, vol in enumerate(vols):
        for name, fn in runners.items():
            if name in notes:
                continue
            try:
                start = time.perf_counter()
                m = fn(vol)
                times[name].append((time.perf_counter() - start) * 1e3)
            except Exception as exc:
                notes[name] = f"{type(exc).__name__} at volume {t}: {exc}"
                continue
            errs[name].append(rms_displacement_mm(matrix_to_params(m, centre=centre), truth[t]))
    rows = []
    label = "x".join(str(s) for s in sim.shape) + f" / {voxel_mm} mm"
    for name in methods:
        if name in notes or not times.get(name):
            rows.append([label, name, "-", "-", "-", "-", notes.get(name, "no result")])
            continue
        ms = np.array(times[name][1:])  # volume 0 includes set-up for some peers
        e = np.array(errs[name])
        rows.append(
            [
                label,
                runners[name].name,
                f"{np.median(ms):.1f}",
                f"{np.percentile(ms, 95):.1f}",
                f"{e.mean():.4f}",
                f"{e.max():.4f}",
                "",
            ]
        )
    return rows


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "| " + " | ".join("{:<" + str(w) + "}" for w in widths) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt.format(*headers), sep, *(fmt.format(*r) for r in rows)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="64,90", help="comma list of 64, 90")
    ap.add_argument("--methods", default="ours,ours-motion,sitk,rtspm", help="comma list")
    ap.add_argument("--volumes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    rows: list[list[str]] = []
    for size in args.sizes.split(","):
        rows += run(size, args.methods.split(","), args.volumes, args.seed)
    print(f"{machine_line()}, {numerics_line()}")
    print()
    headers = ["grid", "method", "median ms", "p95 ms", "mean err mm", "max err mm", "note"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
