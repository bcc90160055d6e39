#!/usr/bin/env python3
"""Derive boldstream's MNI152 template (2 mm) from the ICBM 2009 files nilearn ships.

Reproducible: the same nilearn wheel gives byte-identical outputs (gzip with
mtime 0, fixed header fields). Usage::

    pip download --no-deps nilearn==0.14.1 -d /tmp/nilearn
    python scripts/build_template.py --nilearn /tmp/nilearn/nilearn-0.14.1-py3-none-any.whl

``--nilearn`` also accepts an installed nilearn package directory; without it
the script uses an importable nilearn. Outputs go to analysis/templates/.

Source: nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz
(1 mm, 197x233x189, uint8 0..255, skull-stripped T1; ICBM 2009a nonlinear
symmetric, McConnell Brain Imaging Centre). Derivation:

- grid: the standard MNI 2 mm grid, 91x109x91, RAS+ affine diag(2,2,2) with
  origin (-90,-126,-72) mm; its voxel centres fall on 1 mm voxel centres.
- downsampling: a separable tent filter (1/4, 1/2, 1/4) per axis centred on each
  2 mm voxel, so probability maps keep their partial-volume fractions.
- brain mask: nilearn's rule (T1 / max > 0.2) at 1 mm with holes filled,
  then tent-filtered fraction >= 0.5 at 2 mm.
- CSF: nilearn does not ship the CSF map, so CSF = brain mask x clip(1 - GM - WM)
  at 1 mm (ventricles and sulcal CSF inside the skull-stripped brain).
- storage: uint8 with scl_slope 1/255 for T1/GM/WM/CSF (readers get 0..1), the
  mask as uint8 0/1.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

OUT_DIR = Path(__file__).resolve().parent.parent / "analysis" / "templates"
SOURCE_NAMES = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
NILEARN_LICENSE = "LICENSE"
SHAPE_2MM = (91, 109, 91)
ORIGIN_2MM = np.array([-90.0, -126.0, -72.0])
VOX2MNI_2MM = np.array(
    [
        [2.0, 0, 0, ORIGIN_2MM[0]],
        [0, 2.0, 0, ORIGIN_2MM[1]],
        [0, 0, 2.0, ORIGIN_2MM[2]],
        [0, 0, 0, 1],
    ]
)

ICBM_NOTICE = """\
Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University. Permission to use, copy,
modify, and distribute this software and its documentation for any purpose
and without fee is hereby granted, provided that the above copyright notice
appear in all copies. The authors and McGill University make no
representations about the suitability of this software for any purpose. It
is provided "as is" without express or implied warranty. The authors are not
responsible for any data loss, equipment damage, property loss, or injury to
subjects or patients resulting from the use or misuse of this software
package.
"""


def _read_sources(source: Path) -> tuple[dict[str, bytes], bytes, str]:
    """Bytes of the three template files, nilearn's licence and nilearn's version."""
    files: dict[str, bytes] = {}
    if source.is_file():
        with zipfile.ZipFile(source) as wheel:
            for key, name in SOURCE_NAMES.items():
                files[key] = wheel.read(name)
            lic = next(n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
            version = lic.split("/")[0].removesuffix(".dist-info").split("-")[1]
            return files, wheel.read(lic), version
    root = source if source.name == "nilearn" else source / "nilearn"
    for key, name in SOURCE_NAMES.items():
        files[key] = (root.parent / name).read_bytes()
    dist = sorted(root.parent.glob("nilearn-*.dist-info"))
    if not dist:
        raise SystemExit(f"no nilearn-*.dist-info beside {root}: cannot find nilearn's licence")
    version = dist[-1].name.removesuffix(".dist-info").split("-")[1]
    lic_path = dist[-1] / "licenses" / NILEARN_LICENSE
    if not lic_path.exists():
        lic_path = dist[-1] / NILEARN_LICENSE
    return files, lic_path.read_bytes(), version


def _load(raw: bytes) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    img = nib.Nifti1Image.from_bytes(gzip.decompress(raw))
    return np.asarray(img.dataobj, dtype=np.float64), np.asarray(img.affine, dtype=np.float64)


def _to_2mm(
    data: npt.NDArray[np.float64], affine_1mm: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Tent-filter the 1 mm array and pick the voxels at the 2 mm grid's centres."""
    if not np.allclose(affine_1mm[:3, :3], np.eye(3)):
        raise SystemExit("expected a 1 mm RAS+ source grid")
    start = np.round(ORIGIN_2MM - affine_1mm[:3, 3]).astype(int)
    smooth = data
    for axis in range(3):
        smooth = ndimage.correlate1d(smooth, [0.25, 0.5, 0.25], axis=axis, mode="constant")
    idx = tuple(slice(int(s), int(s) + 2 * n - 1, 2) for s, n in zip(start, SHAPE_2MM, strict=True))
    out = smooth[idx]
    if out.shape != SHAPE_2MM:
        raise SystemExit(f"source grid too small for the 2 mm grid: got {out.shape}")
    return out


def _nifti_bytes(data: npt.NDArray[np.uint8], *, slope: float, description: str) -> bytes:
    img = nib.Nifti1Image(data, VOX2MNI_2MM)
    hdr = img.header
    hdr.set_data_dtype(np.uint8)
    hdr.set_xyzt_units("mm")
    hdr.set_qform(VOX2MNI_2MM, code=4)  # 4 = MNI152
    hdr.set_sform(VOX2MNI_2MM, code=4)
    hdr["descrip"] = description.encode()[:79]
    img.header.set_slope_inter(slope, 0.0)
    # Fixed gzip mtime: the same inputs give byte-identical files.
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)


def _quantise(p: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    return np.round(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)


def build(source: Path, out_dir: Path) -> dict[str, str]:
    files, nilearn_licence, version = _read_sources(source)
    t1, affine = _load(files["t1"])
    gm, _ = _load(files["gm"])
    wm, _ = _load(files["wm"])
    t1 /= t1.max()
    gm /= 255.0
    wm /= 255.0
    mask_1mm = ndimage.binary_fill_holes(t1 > 0.2)
    csf = np.where(mask_1mm, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0)
    mask_2mm = _to_2mm(mask_1mm.astype(np.float64), affine) >= 0.5
    maps = {
        "t1": _to_2mm(t1, affine),
        "gm": _to_2mm(gm, affine),
        "wm": _to_2mm(wm, affine),
        "csf": _to_2mm(csf, affine),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}

    def put(name: str, payload: bytes) -> None:
        (out_dir / name).write_bytes(payload)
        written[name] = hashlib.sha256(payload).hexdigest()

    for key, values in maps.items():
        put(
            f"mni152_2mm_{key}.nii.gz",
            _nifti_bytes(
                _quantise(values), slope=1.0 / 255.0, description=f"ICBM152 2009a {key} 2mm"
            ),
        )
    put(
        "mni152_2mm_brainmask.nii.gz",
        _nifti_bytes(
            mask_2mm.astype(np.uint8), slope=1.0, description="ICBM152 2009a brain mask 2mm"
        ),
    )
    sources = {key: hashlib.sha256(raw).hexdigest() for key, raw in files.items()}
    provenance = {
        "source": f"nilearn {version} (PyPI), files {sorted(SOURCE_NAMES.values())}",
        "source_sha256": sources,
        "grid": {"shape": list(SHAPE_2MM), "vox2mni": VOX2MNI_2MM.tolist()},
        "outputs_sha256": dict(sorted(written.items())),
        "script": "scripts/build_template.py",
    }
    (out_dir / "SOURCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out_dir / "LICENSE").write_text(
        "The template files in this folder are derived from the ICBM 2009a Nonlinear\n"
        "Symmetric MNI152 template (McConnell Brain Imaging Centre, MNI, McGill\n"
        "University) as redistributed by nilearn. The original notice:\n\n"
        + ICBM_NOTICE
        + "\nFonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear\n"
        "average age-appropriate brain templates from birth to adulthood. NeuroImage\n"
        "47 (Suppl 1), S102, 2009. Fonov VS et al. Unbiased average age-appropriate\n"
        "atlases for pediatric studies. NeuroImage 54(1), 313-327, 2011.\n\n"
        f"nilearn {version}, whose wheel carried these files, is distributed under\n"
        "this licence:\n\n" + nilearn_licence.decode()
    )
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nilearn", type=Path, help="nilearn wheel (.whl) or installed package dir"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    source = args.nilearn
    if source is None:
        spec = importlib.util.find_spec("nilearn")
        if spec is None or spec.origin is None:
            raise SystemExit("nilearn not found: pass --nilearn path/to/nilearn-*.whl")
        source = Path(spec.origin).parent
    for name, digest in build(source, args.out).items():
        size = (args.out / name).stat().st_size
        print(f"{name:32s} {size:9d} bytes  sha256 {digest[:16]}")


if __name__ == "__main__":
    main()
