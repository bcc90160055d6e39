"""The MNI152 template (ICBM 2009a, 2 mm) that ships as package data.

:func:`load_template` reads the T1, brain mask and grey/white/CSF probability
maps from ``boldstream/analysis/templates`` (see the README and LICENSE
there; ``scripts/build_template.py`` derives them). Arrays are read-only and
the result is cached, so every caller shares one copy.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from importlib import resources

import nibabel as nib
import numpy as np
import numpy.typing as npt

from boldstream.errors import AnalysisError

__all__ = ["Template", "load_template"]

_PACKAGE = "boldstream.analysis"
_FILES = {
    "t1": "mni152_2mm_t1.nii.gz",
    "gm": "mni152_2mm_gm.nii.gz",
    "wm": "mni152_2mm_wm.nii.gz",
    "csf": "mni152_2mm_csf.nii.gz",
    "brain_mask": "mni152_2mm_brainmask.nii.gz",
}


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    """MNI152 maps on one 2 mm RAS+ grid; all arrays share ``vox2mni``."""

    #: Skull-stripped T1, scaled 0..1.
    t1: npt.NDArray[np.float32]
    brain_mask: npt.NDArray[np.bool_]
    #: Tissue probabilities, 0..1.
    gm: npt.NDArray[np.float32]
    wm: npt.NDArray[np.float32]
    csf: npt.NDArray[np.float32]
    #: 4x4 voxel -> MNI (mm).
    vox2mni: npt.NDArray[np.float64]

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.t1.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def voxel_size(self) -> npt.NDArray[np.float64]:
        sizes: npt.NDArray[np.float64] = np.sqrt((self.vox2mni[:3, :3] ** 2).sum(axis=0))
        return sizes


def _read(name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    resource = resources.files(_PACKAGE).joinpath("templates", name)
    try:
        raw = resource.read_bytes()
    except FileNotFoundError as exc:
        raise AnalysisError(f"template file {name} is missing from the installed package") from exc
    img = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
    data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    data.setflags(write=False)
    return data, affine


@functools.cache
def load_template() -> Template:
    """The shipped MNI152 2 mm template (cached; arrays are read-only)."""
    arrays: dict[str, npt.NDArray[np.float32]] = {}
    affine: npt.NDArray[np.float64] | None = None
    for key, name in _FILES.items():
        data, aff = _read(name)
        if affine is not None and not np.allclose(aff, affine):
            raise AnalysisError(f"template file {name} is not on the common grid")
        affine = aff
        arrays[key] = data
    assert affine is not None
    affine.setflags(write=False)
    mask = arrays.pop("brain_mask") > 0.5
    mask.setflags(write=False)
    return Template(brain_mask=mask, vox2mni=affine, **arrays)
