"""The shipped MNI152 template: present, on the MNI grid, anatomically sensible."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from boldstream.analysis.template import load_template


def _mni_value(arr: np.ndarray, vox2mni: np.ndarray, xyz: tuple[float, float, float]) -> float:
    ijk = np.linalg.solve(vox2mni, np.array([*xyz, 1.0]))[:3]
    return float(arr[tuple(np.round(ijk).astype(int))])


def test_grid_and_types() -> None:
    tpl = load_template()
    assert tpl.shape == (91, 109, 91)
    np.testing.assert_allclose(tpl.voxel_size, [2.0, 2.0, 2.0])
    # MNI origin (anterior commissure) falls on voxel (45, 63, 36).
    np.testing.assert_allclose(tpl.vox2mni @ [45, 63, 36, 1], [0, 0, 0, 1])
    for arr in (tpl.t1, tpl.gm, tpl.wm, tpl.csf):
        assert arr.dtype == np.float32 and arr.shape == tpl.shape
        assert arr.min() >= 0.0 and arr.max() <= 1.0
        assert not arr.flags.writeable
    assert tpl.brain_mask.dtype == np.bool_
    assert load_template() is tpl


def test_anatomy() -> None:
    tpl = load_template()
    volume_ml = tpl.brain_mask.sum() * 8 / 1000
    assert 1500 < volume_ml < 2100
    # Tissue fractions sum to at most 1 and fill the brain.
    total = tpl.gm + tpl.wm + tpl.csf
    assert total.max() <= 1.0 + 2 / 255
    assert np.median(total[tpl.brain_mask]) > 0.95
    assert float(total[~tpl.brain_mask].mean()) < 0.05
    # Grey matter at the sgACC seed and in left DLPFC, white matter in the
    # centrum semiovale, CSF in the lateral ventricle, nothing outside the head.
    assert _mni_value(tpl.gm, tpl.vox2mni, (6, 16, -10)) > 0.5
    assert _mni_value(tpl.gm, tpl.vox2mni, (-44, 40, 29)) > 0.3
    assert _mni_value(tpl.wm, tpl.vox2mni, (-26, -10, 30)) > 0.8
    assert _mni_value(tpl.csf, tpl.vox2mni, (-4, 10, 14)) > 0.5
    assert not tpl.brain_mask[0, 0, 0]
    # Left and right hemispheres mirror each other (a symmetric template).
    assert (
        abs(int(tpl.brain_mask[:45].sum()) - int(tpl.brain_mask[46:].sum()))
        < 0.02 * tpl.brain_mask.sum()
    )


def test_licence_and_provenance_ship_beside_the_data() -> None:
    folder = resources.files("boldstream.analysis").joinpath("templates")
    licence = folder.joinpath("LICENSE").read_text()
    assert "Louis Collins" in licence and "Permission to use, copy" in licence
    assert "Redistribution and use in source and binary forms" in licence
    provenance = json.loads(folder.joinpath("SOURCE.json").read_text())
    total = 0
    for name in provenance["outputs_sha256"]:
        size = len(folder.joinpath(name).read_bytes())
        total += size
    assert total < 3_000_000


@pytest.mark.parametrize("key", ["gm", "wm", "csf"])
def test_probability_maps_are_smooth_partial_volumes(key: str) -> None:
    tpl = load_template()
    arr = getattr(tpl, key)
    inside = arr[tpl.brain_mask]
    # Partial volume: a fair share of brain voxels is neither 0 nor 1.
    assert 0.1 < float(((inside > 0.05) & (inside < 0.95)).mean()) < 0.9
