"""The extension ships what inference needs and nothing else.

UniFuseSlicer/CMakeLists.txt lists the core modules explicitly. This test evaluates that file with CMake,
copies exactly the packaged files into an empty folder (the layout of an installed extension), and runs a
real ``unifuse fuse`` there - the command the module's background process runs - with the default
alignment stages, plus the in-process API (``unifuse.fuse``). The run must succeed from the copy alone, and
the ``unifuse`` modules it imports must be exactly the packaged ones: no training, benchmark or
data-synthesis code that inference does not load.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_slicer_ui import MODULE_DIR, _cmake_packaged_files  # noqa: E402

RUN = textwrap.dedent(r'''
    import sys, tempfile
    import numpy as np, SimpleITK as sitk
    import unifuse
    from unifuse import cli
    from unifuse.options import FuseOptions

    z, y, x = np.mgrid[:20, :22, :24].astype(np.float32)
    blob = (100 * np.exp(-((x - 12) ** 2 + (y - 11) ** 2 + (z - 10) ** 2) / 40) + x).astype(np.float32)
    reference, moving = sitk.GetImageFromArray(blob), sitk.GetImageFromArray(np.roll(blob, 1, axis=2))
    work = tempfile.mkdtemp()
    sitk.WriteImage(reference, work + "/reference.nrrd")
    sitk.WriteImage(moving, work + "/moving.nrrd")
    code = cli.main(["fuse", "--reference", work + "/reference.nrrd", "--moving", work + "/moving.nrrd",
                     "--out", work + "/out", "--device", "cpu", "--config", "tiny", "--spacing", "4",
                     "--machine-progress", "--quiet"])
    assert code == 0, code
    # the API with every optional stage the GUI offers (the refinement is off by default)
    unifuse.fuse(reference, moving, FuseOptions(device="cpu", config="tiny", spacing_mm=4.0, refine="fast"))
    print("CORE", unifuse.__file__)
    for name in sorted(m for m in sys.modules if m == "unifuse" or m.startswith("unifuse.")):
        print("MODULE", name)
''')


def _module_file(name: str, root: Path) -> str:
    rel = name.replace(".", "/")
    return rel + "/__init__.py" if (root / rel).is_dir() else rel + ".py"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_packaged_core_is_exactly_what_inference_imports(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "cmake").mkdir()
    scripts, resources, _, _ = _cmake_packaged_files(tmp_path / "cmake")
    install = tmp_path / "qt-scripted-modules"
    for rel in [*scripts, *resources]:
        (install / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODULE_DIR / rel, install / rel)
    out = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "PYTHONPATH": str(install)}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    core = next(line.split(" ", 1)[1] for line in lines if line.startswith("CORE "))
    assert Path(core).resolve().is_relative_to(install.resolve()), f"the run used {core}, not the packaged copy"
    imported = {_module_file(line.split(" ", 1)[1], install) for line in lines if line.startswith("MODULE ")}
    packaged = {s for s in scripts if s.startswith("unifuse/")}
    assert not packaged - imported, f"packaged but not imported by inference: {sorted(packaged - imported)}"
    assert not imported - packaged, f"imported but not packaged: {sorted(imported - packaged)}"
    for left_out in ("unifuse/train/trainer.py", "unifuse/data/synthetic.py", "unifuse/data/anatomy.py",
                     "unifuse/demo.py", "unifuse/snapshots.py", "unifuse/model/complexity.py"):
        assert left_out not in packaged, left_out
    assert "Resources/Models/unifuse_default.pt" in resources  # the shipped weights
