"""Classical registration baselines of the benchmark (DESIGN §8), all behind one small interface.

Every method registers a ``moving`` volume (its own grid) onto a ``reference`` volume and returns the
**fixed -> moving point map** ``T`` (ITK's resampling convention, LPS mm), so that the aligned volume is
``aligned(x) = moving(T(x))`` and the displacement field on the reference grid is ``U(x) = T(x) − x``
(pull-back, LPS mm, the same convention as the pipeline's output). Intensities given to the registrations
are the pipeline's robust normalisation to [0, 1] (:func:`unifuse.intensity.normalize_image`), so every
method sees the same inputs; the final warp is applied by the caller to the ORIGINAL moving data.

Methods:

* ``none`` — identity (header geometry only): the floor.
* ``sitk-rigid`` — SimpleITK ``ImageRegistrationMethod``: Mattes mutual information, rigid (Euler) transform,
  multi-resolution (image pyramid with Gaussian smoothing): the first stage of ``sitk-bspline`` alone.
* ``sitk-affine`` — ``sitk-rigid`` then a full affine stage with the same metric and pyramid (the benchmark's
  own SimpleITK code, independent of the pipeline's :mod:`unifuse.registration.affine`).
* ``sitk-bspline`` — ``sitk-rigid`` then a cubic B-spline stage (Mattes MI, gradient descent with bounded
  steps, multi-resolution).
* ``ants-syn`` — ANTs ``SyN`` (affine + symmetric normalisation, Mattes MI) via ``antspyx``.
* ``elastix-bspline`` — elastix rigid + B-spline (Advanced Mattes MI, multi-resolution) via ``itk-elastix``.

``ants-syn`` and ``elastix-bspline`` need optional packages; :meth:`RegistrationMethod.availability` says
whether they import and, if not, why (the benchmark lists them as unavailable, never fakes them).

Interpreters: every baseline other than ``none`` runs in a child process (:func:`register_isolated`). ``antspyx``
0.6.x pins numpy/scipy versions older than this project's, so it lives in its own virtual environment
(``.venv-ants/``, made by ``make bench-deps``) and ``ants-syn``'s child runs with THAT interpreter
(:func:`baseline_interpreter`: ``--ants-python``, else ``$UNIFUSE_ANTS_PYTHON``, else ``.venv-ants/bin/python``
at the repository root when it exists, else this interpreter). The child imports this package from its source
folder (``PYTHONPATH``) and needs only numpy, scipy, SimpleITK and the toolkit; inputs and outputs are plain
numpy arrays and tuples in pickle files, readable across numpy 2.x versions.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..intensity import normalize_image
from .measure import Measurement, measure

if TYPE_CHECKING:  # optional toolkits: imported only where used
    import ants
    import itk

__all__ = [
    "RegistrationSettings",
    "QUICK_SETTINGS",
    "FULL_SETTINGS",
    "REAL_SETTINGS",
    "RegistrationMethod",
    "NoRegistration",
    "SimpleITKRigid",
    "SimpleITKAffine",
    "SimpleITKBSpline",
    "sitk_rigid",
    "sitk_affine",
    "AntsSyN",
    "ElastixBSpline",
    "REGISTRATION_METHODS",
    "registration_method",
    "normalized_for_registration",
    "register_isolated",
    "ANTS_PYTHON_ENV",
    "ANTS_VENV",
    "baseline_interpreter",
]

#: Environment variable naming the Python interpreter that has ``antspyx`` (overridden by ``--ants-python``).
ANTS_PYTHON_ENV = "UNIFUSE_ANTS_PYTHON"
#: The separate virtual environment of ``antspyx`` (``make bench-deps``), relative to the repository root.
ANTS_VENV = ".venv-ants"
#: Folder holding the ``unifuse`` package (put on the child's PYTHONPATH, so a foreign interpreter finds it).
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RegistrationSettings:
    """Effort settings of the registration baselines (``--quick`` uses :data:`QUICK_SETTINGS`).

    Attributes:
        threads: CPU threads each toolkit may use.
        sitk_rigid_iterations: gradient-descent iterations per level of the SimpleITK rigid stage.
        sitk_rigid_shrink: pyramid shrink factors of the rigid stage (coarse first); smoothing σ = factor/2 voxels.
        sitk_affine_iterations: iterations per level of the affine stage of ``sitk-affine`` (same pyramid).
        sitk_bspline_iterations: gradient-descent iterations per level of the SimpleITK B-spline stage.
        sitk_bspline_shrink: pyramid shrink factors of the B-spline stage (coarse first).
        sitk_mesh_size: B-spline control-mesh cells per axis (the same mesh at every pyramid level).
        sitk_sampling: fraction of voxels sampled (random, seeded) by the Mattes MI metric.
        ants_reg_iterations: SyN iterations per level (ANTs ``reg_iterations``; the affine stage is ANTs' default).
        elastix_resolutions: pyramid levels of the elastix stages.
        elastix_iterations: maximum iterations per level of the elastix stages.
        elastix_grid_spacing_mm: final B-spline control-point spacing of elastix (mm).
        seed: seed of the random metric sampling (results are reproducible for a given thread count).
    """

    threads: int = 1
    sitk_rigid_iterations: int = 100
    sitk_rigid_shrink: Tuple[int, ...] = (4, 2, 1)
    sitk_affine_iterations: int = 100
    sitk_bspline_iterations: int = 20
    sitk_bspline_shrink: Tuple[int, ...] = (2, 1)
    sitk_mesh_size: int = 4
    sitk_sampling: float = 0.1
    ants_reg_iterations: Tuple[int, ...] = (40, 20, 0)
    elastix_resolutions: int = 3
    elastix_iterations: int = 250
    elastix_grid_spacing_mm: float = 16.0
    seed: int = 7

    def with_threads(self, threads: int) -> "RegistrationSettings":
        """A copy with ``threads`` (at least 1) CPU threads."""
        return replace(self, threads=max(1, int(threads)))


#: Full benchmark settings (64³ brain phantom: seconds to a minute per case on 2 CPU cores).
FULL_SETTINGS = RegistrationSettings()
#: ``--quick`` settings: few iterations and levels, for smoke runs on 32³ volumes.
QUICK_SETTINGS = RegistrationSettings(
    sitk_rigid_iterations=40,
    sitk_rigid_shrink=(2, 1),
    sitk_affine_iterations=40,
    sitk_bspline_iterations=10,
    sitk_bspline_shrink=(1,),
    sitk_mesh_size=4,
    sitk_sampling=0.2,
    ants_reg_iterations=(20, 10, 0),
    elastix_resolutions=2,
    elastix_iterations=30,
    elastix_grid_spacing_mm=24.0,
)


#: ``--real`` settings (real anatomy at 1–2 mm, 10⁶–10⁷ voxels): 2 % metric sampling (still ≥ 20 000 samples
#: per level at full resolution), an 8-cell B-spline mesh (~25 mm control spacing over a head) with a 3-level
#: pyramid and 30 iterations per level; ANTs and elastix as in the full settings.
REAL_SETTINGS = RegistrationSettings(
    sitk_sampling=0.02,
    sitk_mesh_size=8,
    sitk_bspline_shrink=(4, 2, 1),
    sitk_bspline_iterations=30,
)


def normalized_for_registration(image: sitk.Image) -> sitk.Image:
    """The pipeline's robust [0, 1] normalisation of ``image`` as a float32 image with the same geometry.

    CT (auto-detected) uses the fixed HU window, MR/PET the 0.5–99.5 percentiles of the nonzero voxels.
    """
    array, _ = normalize_image(image)
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.CopyInformation(image)
    return out


class RegistrationMethod:
    """A registration baseline. Subclasses set :attr:`name`, :attr:`description` and implement
    :meth:`register` (and :meth:`availability` when they need optional packages)."""

    name: str = ""
    description: str = ""

    def availability(self, python: Optional[str] = None) -> Tuple[bool, str]:
        """``(True, "")`` when the method can run here (with interpreter ``python``, see
        :func:`baseline_interpreter`), else ``(False, reason)``."""
        return True, ""

    def prepare(self) -> None:
        """Import and initialise the toolkit (so that one-off library loading is not timed as registration)."""

    def register(self, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
        """Register ``moving`` onto ``reference``.

        Args:
            reference: fixed volume (float32, normalised to [0, 1], its own grid, LPS).
            moving: moving volume (float32, normalised to [0, 1], its own grid, LPS).
            settings: effort settings.

        Returns:
            The fixed -> moving point map ``T`` (LPS mm): ``aligned(x) = moving(T(x))``.
        """
        raise NotImplementedError


class NoRegistration(RegistrationMethod):
    """Identity: the volumes are compared where their headers place them (the floor of every table)."""

    name = "none"
    description = "no registration: header geometry only (identity transform)"

    def register(self, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
        return sitk.Transform(3, sitk.sitkIdentity)


def _sitk_method(settings: RegistrationSettings, shrink: Tuple[int, ...]) -> sitk.ImageRegistrationMethod:
    """Mattes MI (32 bins, seeded random sampling), linear interpolation, a pyramid with σ = factor/2 voxels."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(settings.sitk_sampling), int(settings.seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([f / 2.0 for f in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetNumberOfThreads(int(settings.threads))
    return reg


def sitk_rigid(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Euler3DTransform:
    """The rigid stage: Euler transform about the reference centre, from identity (the headers share one
    physical frame), regular-step gradient descent with physical-shift parameter scales."""
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(geometry.physical_center(fixed).tolist())
    reg = _sitk_method(settings, settings.sitk_rigid_shrink)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=int(settings.sitk_rigid_iterations),
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(rigid, inPlace=True)
    reg.Execute(fixed, moving)
    return rigid


class SimpleITKRigid(RegistrationMethod):
    """The rigid stage of :class:`SimpleITKBSpline` alone (shows what the B-spline stage adds)."""

    name = "sitk-rigid"
    description = ("SimpleITK ImageRegistrationMethod, Mattes MI (32 bins, random sampling), rigid Euler transform "
                   "(regular-step gradient descent, physical-shift scales, pyramid): the first stage of sitk-bspline")

    def register(self, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
        return sitk_rigid(sitk.Cast(reference, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32), settings)


def sitk_affine(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.AffineTransform:
    """:func:`sitk_rigid`, then a 12-parameter affine stage started from it (same metric, sampling and pyramid;
    regular-step gradient descent with physical-shift scales)."""
    rigid = sitk_rigid(fixed, moving, settings)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    reg = _sitk_method(settings, settings.sitk_rigid_shrink)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=int(settings.sitk_affine_iterations),
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, moving)
    return affine


class SimpleITKAffine(RegistrationMethod):
    """``sitk-rigid`` followed by an affine stage (the classical global registration)."""

    name = "sitk-affine"
    description = ("SimpleITK ImageRegistrationMethod, Mattes MI (32 bins, random sampling): the sitk-rigid stage, "
                   "then a 12-parameter affine stage from it (regular-step gradient descent, physical-shift scales, "
                   "the same pyramid); the benchmark's own code, not the pipeline's affine stage")

    def register(self, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
        return sitk_affine(sitk.Cast(reference, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32), settings)


class SimpleITKBSpline(RegistrationMethod):
    """SimpleITK Mattes-MI rigid + B-spline registration (multi-resolution)."""

    name = "sitk-bspline"
    description = ("SimpleITK ImageRegistrationMethod, Mattes MI (32 bins, random sampling): the sitk-rigid stage, "
                   "then a cubic B-spline stage (gradient descent, physical-shift scales, steps ≤ 0.2 voxel, one "
                   "control mesh for all pyramid levels)")

    def register(self, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
        fixed = sitk.Cast(reference, sitk.sitkFloat32)
        mov = sitk.Cast(moving, sitk.sitkFloat32)
        rigid = sitk_rigid(fixed, mov, settings)

        shrink = settings.sitk_bspline_shrink
        bspline = sitk.BSplineTransformInitializer(fixed, [int(settings.sitk_mesh_size)] * 3, 3)
        reg = _sitk_method(settings, shrink)
        # Learning rate estimated (at the start of each level) so that no control point moves more than a fifth of
        # a voxel per step: with SimpleITK's default (one voxel per step) the first iterations throw the mesh
        # several mm off and the stage ends far worse than its rigid start (measured on the benchmark pairs).
        reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=int(settings.sitk_bspline_iterations),
                                          convergenceMinimumValue=1e-6, convergenceWindowSize=10,
                                          estimateLearningRate=reg.Once,
                                          maximumStepSizeInPhysicalUnits=0.2 * min(fixed.GetSpacing()))
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetMovingInitialTransform(rigid)
        reg.SetInitialTransformAsBSpline(bspline, inPlace=True, scaleFactors=[1] * len(shrink))
        reg.Execute(fixed, mov)
        # The moving initial transform is applied after the optimised one: T(x) = rigid(bspline(x)).
        # sitk.CompositeTransform applies its list last-first, hence [rigid, bspline].
        return sitk.CompositeTransform([rigid, bspline])


def _import_error(module: str, package: str) -> Optional[str]:
    try:
        __import__(module)
    except Exception as exc:  # ImportError, or a binary wheel that fails to load
        return f"{package} is not installed or does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); install it with `pip install {package}`"
    return None


def _repository_root() -> Path:
    """The checkout holding this package (``UniFuseSlicer/unifuse`` -> the folder above ``UniFuseSlicer``)."""
    return _PACKAGE_PARENT.parent


def baseline_interpreter(name: str, override: Optional[str] = None) -> str:
    """The Python interpreter whose child process runs baseline ``name``.

    ``ants-syn``: ``override`` (``--ants-python``), else ``$UNIFUSE_ANTS_PYTHON``, else the separate environment
    ``.venv-ants/bin/python`` at the repository root when it exists, else this interpreter. Every other
    baseline: this interpreter.
    """
    if name != AntsSyN.name:
        return sys.executable
    if override:
        return str(override)
    if os.environ.get(ANTS_PYTHON_ENV):
        return os.environ[ANTS_PYTHON_ENV]
    venv = _repository_root() / ANTS_VENV / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _child_env(threads: int) -> Dict[str, str]:
    """Environment of a baseline child: thread counts, and this package's folder first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(int(threads)), OMP_NUM_THREADS=str(int(threads)),
                PYTHONPATH=str(_PACKAGE_PARENT) + (os.pathsep + path if path else ""))


@functools.lru_cache(maxsize=None)
def _foreign_import_error(python: str, module: str, package: str) -> Optional[str]:
    """Why ``python`` cannot run a ``module`` baseline child (None: it can); checked once per interpreter."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return (f"the interpreter {python} for {package} does not exist; run `make bench-deps` (it installs {package} "
                f"into {ANTS_VENV}/) or pass --ants-python / set {ANTS_PYTHON_ENV} to a Python that has it")
    code = f"import {module}, SimpleITK, scipy; import unifuse.bench.baselines"
    try:
        proc = subprocess.run([python, "-c", code], env=_child_env(1), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, errors="replace", timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the interpreter {python} for {package} could not be started ({type(exc).__name__}: {exc})"
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no error output"]
        return (f"{package} does not import with {python} ({last[0].strip()}); run `make bench-deps` or install "
                f"{package}, SimpleITK and scipy into that environment")
    return None


class AntsSyN(RegistrationMethod):
    """ANTs SyN (``antspyx``): affine + symmetric diffeomorphic normalisation, Mattes MI."""

    name = "ants-syn"
    description = ("ANTs antsRegistration via antspyx 0.6 `registration(type_of_transform='SyN')`: centre-of-mass "
                   "start; Affine[0.25] with Mattes MI (32 bins, 20 % regular sampling), 2100x1200x1200x0 iterations, "
                   "shrink 4x2x2x1, smoothing 3x2x1x0 voxels; then SyN[0.2, 3, 0] with Mattes MI (32 bins, all "
                   "voxels), the settings' reg_iterations at shrink 4x2x1 / smoothing 2x1x0 voxels; single precision, "
                   "fixed random seed; run in the separate antspyx environment")

    def availability(self, python: Optional[str] = None) -> Tuple[bool, str]:
        interpreter = baseline_interpreter(self.name, python)
        # compare the paths as given: a venv's python is a symlink to the same base binary as any other venv's
        if os.path.abspath(interpreter) == os.path.abspath(sys.executable):
            reason = _import_error("ants", "antspyx")
            if reason is not None:
                reason += (f"; antspyx pins numpy/scipy versions older than this environment's, so install it "
                           f"separately with `make bench-deps` ({ANTS_VENV}/) or point --ants-python / "
                           f"{ANTS_PYTHON_ENV} at a Python that has it")
        else:
            reason = _foreign_import_error(interpreter, "ants", "antspyx")
        return (reason is None), (reason or "")

    def prepare(self) -> None:
        import ants

        ants.registration  # noqa: B018 - resolve the lazily loaded entry points

    def register(self, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
        import ants

        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(settings.threads))
        # antspyx 0.6 ignores a random_seed= argument; it passes --random-seed from ants.config._random_seed
        # (set_ants_deterministic() would also force one thread, so the seed is set directly)
        if hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
            ants.config._random_seed = int(settings.seed)
        work = tempfile.mkdtemp(prefix="unifuse-bench-ants-")
        try:
            fixed_a, moving_a = _to_ants(reference), _to_ants(moving)
            out = ants.registration(fixed=fixed_a, moving=moving_a, type_of_transform="SyN",
                                    reg_iterations=tuple(settings.ants_reg_iterations),
                                    outprefix=os.path.join(work, "reg_"))
            composed = ants.apply_transforms(fixed=fixed_a, moving=moving_a, transformlist=out["fwdtransforms"],
                                             compose=os.path.join(work, "field_"))
            if composed is None:
                raise RuntimeError("antsApplyTransforms did not write the composed displacement field")
            field = sitk.ReadImage(composed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return _displacement_transform(field, reference)


def _to_ants(image: sitk.Image) -> "ants.ANTsImage":
    """A SimpleITK scalar image as an ANTs image with the same LPS geometry (ANTs arrays are (x, y, z))."""
    import ants

    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).transpose(2, 1, 0).copy()
    return ants.from_numpy(array, origin=list(image.GetOrigin()), spacing=list(image.GetSpacing()),
                           direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3))


def _displacement_transform(field: sitk.Image, reference: sitk.Image) -> sitk.Transform:
    """A displacement field written by a toolkit (vector image, LPS mm, fixed -> moving) as a transform,
    after checking it lies on the reference grid."""
    if field.GetNumberOfComponentsPerPixel() != 3:
        raise RuntimeError(f"expected a 3-component displacement field; got {field.GetNumberOfComponentsPerPixel()}")
    if not geometry.on_same_grid(field, reference):
        raise RuntimeError("the toolkit's displacement field is not on the reference grid")
    vec = sitk.Cast(field, sitk.sitkVectorFloat64)
    vec.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(vec)


class ElastixBSpline(RegistrationMethod):
    """elastix rigid + B-spline (``itk-elastix``), Advanced Mattes MI, multi-resolution."""

    name = "elastix-bspline"
    description = ("elastix via itk-elastix: default 'rigid' then 'bspline' parameter maps (Advanced Mattes MI, "
                   "adaptive stochastic gradient descent, multi-resolution)")

    def availability(self, python: Optional[str] = None) -> Tuple[bool, str]:
        reason = _import_error("itk", "itk-elastix")
        if reason is not None:
            return False, reason
        import itk

        if not hasattr(itk, "elastix_registration_method"):
            return False, "the `itk` package imports but has no elastix (install `itk-elastix`)"
        return True, ""

    def prepare(self) -> None:
        import itk

        # itk loads its wrapped modules lazily on first attribute access (seconds): do it before timing
        for attr in ("ParameterObject", "elastix_registration_method", "transformix_deformation_field",
                     "image_from_array", "matrix_from_array", "MultiThreaderBase"):
            getattr(itk, attr)

    def parameter_maps(self, settings: RegistrationSettings) -> List[Dict[str, List[str]]]:
        """The rigid and B-spline parameter maps (elastix defaults with the settings' effort)."""
        import itk

        po = itk.ParameterObject.New()
        maps = []
        for kind in ("rigid", "bspline"):
            pm = po.GetDefaultParameterMap(kind, int(settings.elastix_resolutions))
            pm["MaximumNumberOfIterations"] = [str(int(settings.elastix_iterations))]
            pm["RandomSeed"] = [str(int(settings.seed))]
            if kind == "bspline":
                pm["FinalGridSpacingInPhysicalUnits"] = [str(float(settings.elastix_grid_spacing_mm))]
            maps.append(pm)
        return maps

    def register(self, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
        import itk

        po = itk.ParameterObject.New()
        for pm in self.parameter_maps(settings):
            po.AddParameterMap(pm)
        fixed_i, moving_i = _to_itk(reference), _to_itk(moving)
        # itk-elastix 0.25 segfaults here with number_of_threads=2 (measured); ITK's global default is safe
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(settings.threads))
        _, tp = itk.elastix_registration_method(fixed_i, moving_i, parameter_object=po, log_to_console=False)
        # transformix writes deformationField.nii into its output directory (the working directory by default)
        work = tempfile.mkdtemp(prefix="unifuse-bench-elastix-")
        try:
            field_i = itk.transformix_deformation_field(moving_i, tp, output_directory=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        arr = itk.array_from_image(field_i).astype(np.float64)  # (z, y, x, 3), LPS mm, fixed -> moving
        field = sitk.GetImageFromArray(arr, isVector=True)
        field.SetOrigin(tuple(float(v) for v in field_i.GetOrigin()))
        field.SetSpacing(tuple(float(v) for v in field_i.GetSpacing()))
        field.SetDirection(tuple(itk.array_from_matrix(field_i.GetDirection()).ravel().tolist()))
        return _displacement_transform(field, reference)


def _to_itk(image: sitk.Image) -> "itk.Image":
    """A SimpleITK scalar image as an ``itk.Image[F, 3]`` with the same LPS geometry."""
    import itk

    out = itk.image_from_array(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)))
    out.SetOrigin(list(image.GetOrigin()))
    out.SetSpacing(list(image.GetSpacing()))
    out.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)))
    return out


def _payload(image: sitk.Image) -> Dict[str, Any]:
    """A picklable copy of a scalar image: (z, y, x) float32 array + geometry."""
    return {"array": sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)), "origin": image.GetOrigin(),
            "spacing": image.GetSpacing(), "direction": image.GetDirection()}


def _from_payload(payload: Dict[str, Any]) -> sitk.Image:
    image = sitk.GetImageFromArray(payload["array"])
    image.SetOrigin(payload["origin"])
    image.SetSpacing(payload["spacing"])
    image.SetDirection(payload["direction"])
    return image


def _run_job(job_path: str, result_path: str) -> None:
    """Body of :func:`register_isolated` in the child process: read the job, register, write the result."""
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    settings = RegistrationSettings(**job["settings"])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(settings.threads))
    ref, mov = _from_payload(job["reference"]), _from_payload(job["moving"])
    method = registration_method(job["name"])
    method.prepare()
    with measure() as m:
        transform = method.register(ref, mov, settings)
        field = geometry.transform_to_displacement(transform, ref)
    with open(result_path, "wb") as f:
        pickle.dump({"field": sitk.GetArrayFromImage(field), "measurement": m.to_dict()}, f)


def register_isolated(name: str, reference: sitk.Image, moving: sitk.Image, settings: RegistrationSettings,
                      python: Optional[str] = None) -> Tuple[sitk.Image, "Measurement"]:
    """Run one baseline in a fresh Python process and return its displacement field.

    The child is ``PYTHON -m unifuse.bench.baselines JOB RESULT`` with ``PYTHON`` = ``python`` or
    :func:`baseline_interpreter` (``ants-syn`` runs in its own environment), inputs and outputs going through
    pickle files of plain numpy arrays, tuples and numbers in a temporary folder, so toolkit output on stdout
    cannot interfere. Isolation keeps a toolkit crash
    (a segfault inside a C++ library) from ending the benchmark, keeps the toolkits' libraries apart
    (antspyx and itk-elastix each bundle their own ITK) and gives every method the same clean process for
    its memory measurement (:mod:`unifuse.bench.measure`, taken inside the child around the registration).

    Args:
        name: a :data:`REGISTRATION_METHODS` key.
        reference, moving: the normalised volumes (as :meth:`RegistrationMethod.register`).
        settings: effort settings (``threads`` also sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` and
            ``OMP_NUM_THREADS`` of the child).
        python: the child's interpreter (None: :func:`baseline_interpreter` of ``name``).

    Returns:
        (field, measurement): the displacement field of the fixed -> moving map on ``reference``'s grid
        (``sitkVectorFloat64``, LPS mm) and the child's time/memory of registration + field conversion.

    Raises:
        RuntimeError: the child failed (the registration raised, or the process died, e.g. by a segfault);
            the message ends with the child's last error line.
    """
    registration_method(name)  # validate the name before starting a process
    interpreter = python or baseline_interpreter(name)
    with tempfile.TemporaryDirectory(prefix="unifuse-bench-") as tmp:
        job, result = os.path.join(tmp, "job.pkl"), os.path.join(tmp, "result.pkl")
        with open(job, "wb") as f:
            pickle.dump({"name": name, "reference": _payload(reference), "moving": _payload(moving),
                         "settings": dict(settings.__dict__)}, f)
        proc = subprocess.run([interpreter, "-m", "unifuse.bench.baselines", job, result],
                              env=_child_env(settings.threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, errors="replace")
        if proc.returncode != 0 or not os.path.exists(result):
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with code {proc.returncode}")
            last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no error output"]
            raise RuntimeError(f"the {name} process {how}: {last[0].strip()}")
        with open(result, "rb") as f:
            out = pickle.load(f)
    field = sitk.GetImageFromArray(np.asarray(out["field"], dtype=np.float64), isVector=True)
    field.CopyInformation(reference)
    return field, Measurement(**out["measurement"])


#: Every registration baseline by name, in table order.
REGISTRATION_METHODS: Dict[str, RegistrationMethod] = {
    m.name: m for m in (NoRegistration(), SimpleITKRigid(), SimpleITKAffine(), SimpleITKBSpline(), AntsSyN(),
                        ElastixBSpline())
}


def registration_method(name: str) -> RegistrationMethod:
    """Look a baseline up by name (``none``, ``sitk-rigid``, ``sitk-affine``, ``sitk-bspline``, ``ants-syn``,
    ``elastix-bspline``)."""
    try:
        return REGISTRATION_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown registration baseline {name!r}; choose from {', '.join(REGISTRATION_METHODS)}") from None


if __name__ == "__main__":  # the child process of register_isolated()
    _run_job(sys.argv[1], sys.argv[2])
