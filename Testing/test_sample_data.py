"""The sample pair shipped in the Slicer module is the deterministic demo case (regenerated and compared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from unifuse.demo import write_sample_data

SHIPPED = Path(__file__).resolve().parents[1] / "UniFuseSlicer" / "Resources" / "SampleData"


def test_shipped_sample_pair_matches_regeneration(tmp_path):
    fresh = write_sample_data(tmp_path)
    for name, path in fresh.items():
        shipped = sitk.ReadImage(str(SHIPPED / path.name))
        again = sitk.ReadImage(str(path))
        assert shipped.GetSize() == again.GetSize(), name
        assert np.allclose(shipped.GetSpacing(), again.GetSpacing())
        assert np.allclose(shipped.GetOrigin(), again.GetOrigin())
        assert np.allclose(shipped.GetDirection(), again.GetDirection())
        assert np.allclose(sitk.GetArrayFromImage(shipped), sitk.GetArrayFromImage(again), atol=1e-4), name
    ref, mov = (sitk.ReadImage(str(SHIPPED / n)) for n in ("reference.nii.gz", "moving.nii.gz"))
    assert ref.GetSize() != mov.GetSize()  # a real second scan: its own grid
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 4 * 2**20  # small enough to ship in the module
