"""Regions of interest for the sgACC-anticorrelation target, built from coordinates.

Nothing here is hand-drawn: every region is computed on the shipped MNI152
2 mm grid (:func:`~boldstream.analysis.template.load_template`) from the
coordinates of SPEC section 5.

- Seed: a 10 mm sphere at MNI (6, 16, -10), the subgenual cingulate
  (Fox et al. 2012), masked to the brain.
- Search region: left DLPFC as the union of 20 mm spheres about four
  published stimulation sites, masked to the brain:
  BA9 (-36, 39, 43), BA46 (-44, 40, 29), the "5 cm rule" (-41, 16, 54)
  and F3 (-37, 26, 49) (coordinates in MNI mm, RAS+).
- Nuisance masks: white matter (WM probability >= 0.9, eroded once) and CSF
  (CSF probability >= 0.9), whose mean signals are regressors (SPEC 4).

All masks share the template's ``vox2mni``; map them into a subject's EPI
grid with :func:`boldstream.analysis.registration.map_to_native`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from boldstream.analysis.template import Template, load_template
from boldstream.errors import AnalysisError

__all__ = [
    "SEARCH_CENTRES_MNI",
    "SEED_MNI",
    "TemplateRois",
    "sphere_mask",
    "template_rois",
]

Mask = npt.NDArray[np.bool_]
F64 = npt.NDArray[np.float64]

#: sgACC seed centre (Fox et al. 2012), MNI mm.
SEED_MNI: tuple[float, float, float] = (6.0, 16.0, -10.0)
#: Left-DLPFC stimulation sites whose 20 mm spheres make the search region (SPEC 5).
SEARCH_CENTRES_MNI: Mapping[str, tuple[float, float, float]] = {
    "BA9": (-36.0, 39.0, 43.0),
    "BA46": (-44.0, 40.0, 29.0),
    "5cm": (-41.0, 16.0, 54.0),
    "F3": (-37.0, 26.0, 49.0),
}


def sphere_mask(
    shape: tuple[int, int, int], vox2world: npt.ArrayLike, centre: npt.ArrayLike, radius_mm: float
) -> Mask:
    """Voxels of a grid whose centres lie within ``radius_mm`` of ``centre`` (world mm)."""
    if not radius_mm > 0:
        raise AnalysisError(f"a sphere needs a positive radius, not {radius_mm}")
    affine = np.asarray(vox2world, dtype=np.float64)
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    d2 = ((world - np.asarray(centre, dtype=np.float64).reshape(3, 1)) ** 2).sum(axis=0)
    out: Mask = (d2 <= radius_mm * radius_mm).reshape(shape)
    return out


@dataclass(frozen=True, slots=True, eq=False)
class TemplateRois:
    """The analysis masks on the template grid (all share ``vox2mni``)."""

    brain: Mask
    seed: Mask
    search: Mask
    wm: Mask
    csf: Mask
    vox2mni: F64
    #: The coordinates and radii the masks were built from (for reports).
    seed_mni: tuple[float, float, float]
    seed_radius_mm: float
    search_centres_mni: Mapping[str, tuple[float, float, float]]
    search_radius_mm: float

    def masks(self) -> dict[str, Mask]:
        """Every mask by name: brain, seed, search, wm, csf."""
        return {
            "brain": self.brain,
            "seed": self.seed,
            "search": self.search,
            "wm": self.wm,
            "csf": self.csf,
        }


def template_rois(
    template: Template | None = None,
    *,
    seed_mni: tuple[float, float, float] = SEED_MNI,
    seed_radius_mm: float = 10.0,
    search_centres_mni: Mapping[str, tuple[float, float, float]] = SEARCH_CENTRES_MNI,
    search_radius_mm: float = 20.0,
    wm_threshold: float = 0.9,
    csf_threshold: float = 0.9,
) -> TemplateRois:
    """Seed, search region and nuisance masks on the template grid (see the module doc)."""
    tpl = template if template is not None else load_template()
    brain = np.asarray(tpl.brain_mask, dtype=bool)
    shape = tpl.shape
    seed = sphere_mask(shape, tpl.vox2mni, seed_mni, seed_radius_mm) & brain
    if not search_centres_mni:
        raise AnalysisError("the search region needs at least one centre")
    search = np.zeros(shape, dtype=bool)
    for centre in search_centres_mni.values():
        search |= sphere_mask(shape, tpl.vox2mni, centre, search_radius_mm)
    search &= brain
    wm = ndimage.binary_erosion(np.asarray(tpl.wm) >= wm_threshold) & brain
    csf = (np.asarray(tpl.csf) >= csf_threshold) & brain
    for name, mask in (("seed", seed), ("search", search), ("wm", wm), ("csf", csf)):
        if not mask.any():
            raise AnalysisError(f"the {name} region is empty on the template grid")
    return TemplateRois(
        brain=brain,
        seed=seed,
        search=search,
        wm=np.asarray(wm, dtype=bool),
        csf=np.asarray(csf, dtype=bool),
        vox2mni=np.asarray(tpl.vox2mni, dtype=np.float64),
        seed_mni=seed_mni,
        seed_radius_mm=float(seed_radius_mm),
        search_centres_mni=dict(search_centres_mni),
        search_radius_mm=float(search_radius_mm),
    )
