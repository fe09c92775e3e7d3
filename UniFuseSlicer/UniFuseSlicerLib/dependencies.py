"""What the UniFuse core needs in Slicer's Python, and how to install it without breaking Slicer.

* **torch** comes from Slicer's *PyTorch* extension (``PyTorchUtils``), which picks the right CUDA/CPU
  wheel for the machine.
* Other packages the core imports at inference time (:data:`PIP_REQUIREMENTS`) are installed when missing,
  with lower-bound versions only: through ``slicer.pydeps.pip_ensure`` where the Slicer version has it
  (Slicer 5.11+; also looked up as ``slicer.packaging``), else ``slicer.util.pip_install``.
* Packages Slicer ships itself (:data:`PROTECTED_PACKAGES`: numpy, SimpleITK, vtk) are never installed,
  upgraded or replaced: every pip call gets a constraints file pinning their installed versions.

The user is asked **once** (by the widget, with :meth:`InstallationPlan.describe`); :func:`install` then
runs every step without further questions. Nothing here imports torch or needs Qt: the Slicer API is
passed in (``slicer_api``), so the steps are tested with stand-ins.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

__all__ = [
    "MINIMUM_TORCH_VERSION",
    "PIP_REQUIREMENTS",
    "PROTECTED_PACKAGES",
    "InstallationPlan",
    "installed_version",
    "version_at_least",
    "torch_status",
    "missing_pip_requirements",
    "constraints_text",
    "write_constraints_file",
    "pip_install_arguments",
    "installation_plan",
    "install",
    "DependencyError",
    "torch_unavailable_reason",
]

#: Lowest torch the core supports (``pyproject.toml``: ``torch>=2.1``).
MINIMUM_TORCH_VERSION = "2.1"
#: import name -> pip requirement, for packages the core imports at inference time besides torch.
#: nibabel: the CLI (the module's background process) verifies every NIfTI it writes with it (unifuse/io.py).
PIP_REQUIREMENTS: Dict[str, str] = {
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "SimpleITK": "SimpleITK>=2.3",
    "nibabel": "nibabel>=4",
}
#: Distributions shipped by Slicer that must never be replaced by pip.
PROTECTED_PACKAGES: Tuple[str, ...] = ("numpy", "SimpleITK", "vtk")


def installed_version(distribution: str) -> Optional[str]:
    """Installed version of a distribution (pip name), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum`` by PEP 440 (local suffixes such as ``+cpu`` are ignored)."""
    from packaging.version import Version

    return Version(Version(version).base_version) >= Version(minimum)


class DependencyError(RuntimeError):
    """A dependency could not be installed; the message says what to do."""


def _find_spec(module: str) -> bool:
    """True when ``module`` can be imported (without importing it); False also for a broken finder."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def torch_status() -> Tuple[bool, Optional[str]]:
    """(usable, installed version): usable when torch is importable and >= :data:`MINIMUM_TORCH_VERSION`.

    Does not import torch (the package metadata and the import system's finders are asked).
    """
    if not _find_spec("torch"):
        return False, None
    version = installed_version("torch")
    try:
        usable = version is not None and version_at_least(version, MINIMUM_TORCH_VERSION)
    except ValueError:  # an unparsable version string: let the import decide at run time
        usable = True
    return usable, version


def torch_unavailable_reason() -> Optional[str]:
    """Why the network cannot run in this Python (None when it can); for skipping the self-test's network part."""
    usable, version = torch_status()
    if usable:
        return None
    if version is None:
        return "PyTorch is not installed (install the PyTorch extension, or press Apply once to install it)"
    return f"PyTorch {version} is older than the {MINIMUM_TORCH_VERSION} UniFuse needs"


def missing_pip_requirements(requirements: Optional[Dict[str, str]] = None) -> List[str]:
    """pip requirements of :data:`PIP_REQUIREMENTS` whose module cannot be imported.

    A protected package that is importable is never reported, whatever its version (Slicer's copy wins).
    """
    missing = []
    for module, requirement in (requirements or PIP_REQUIREMENTS).items():
        if not _find_spec(module):
            missing.append(requirement)
    return missing


def constraints_text(protected: Tuple[str, ...] = PROTECTED_PACKAGES) -> str:
    """pip constraints pinning every installed protected distribution (``name==version`` lines)."""
    lines = []
    for name in protected:
        version = installed_version(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_constraints_file(directory: Union[str, Path]) -> Path:
    """Write :func:`constraints_text` to ``<directory>/unifuse-constraints.txt`` and return the path."""
    path = Path(directory) / "unifuse-constraints.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(constraints_text(), encoding="utf-8")
    return path


def pip_install_arguments(requirements: List[str], constraints_file: Union[str, Path]) -> List[str]:
    """Arguments for ``slicer.util.pip_install``: the requirements plus ``--constraint <file>``."""
    if not requirements:
        raise ValueError("nothing to install")
    return [*requirements, "--constraint", str(constraints_file)]


@dataclass
class InstallationPlan:
    """What must happen before the core can run in this Python."""

    torch_ok: bool
    torch_version: Optional[str]
    pip_requirements: List[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.torch_ok and not self.pip_requirements

    def describe(self) -> str:
        """One paragraph for the confirmation dialog."""
        parts = []
        if not self.torch_ok:
            found = f" (found torch {self.torch_version})" if self.torch_version else ""
            parts.append(f"PyTorch >= {MINIMUM_TORCH_VERSION}{found}, via the PyTorch extension")
        if self.pip_requirements:
            parts.append(", ".join(self.pip_requirements) + " from PyPI")
        if not parts:
            return "All UniFuse dependencies are installed."
        return "UniFuse needs " + "; ".join(parts) + ". This may take several minutes."


def installation_plan() -> InstallationPlan:
    """Inspect this Python and return the :class:`InstallationPlan`."""
    torch_ok, torch_version = torch_status()
    return InstallationPlan(torch_ok=torch_ok, torch_version=torch_version,
                            pip_requirements=missing_pip_requirements())


def _pip_ensure(slicer_api: Any) -> Optional[Callable[..., Any]]:
    """Slicer's ``pip_ensure`` (``slicer.pydeps``, Slicer 5.11+; ``slicer.packaging`` in some previews), or None."""
    for name in ("pydeps", "packaging"):
        module = getattr(slicer_api, name, None)
        if module is None and getattr(slicer_api, "__name__", None) == "slicer":
            try:
                module = importlib.import_module(f"slicer.{name}")
            except ImportError:
                module = None
        ensure = getattr(module, "pip_ensure", None)
        if callable(ensure):
            return ensure
    return None


def install(
    plan: InstallationPlan,
    slicer_api: Any,
    constraints_dir: Union[str, Path],
    import_module: Callable[[str], Any] = importlib.import_module,
    log: Optional[Callable[[str], None]] = None,
    requester: str = "UniFuse",
) -> InstallationPlan:
    """Run every step of ``plan`` without asking (the caller asked the user once) and return the new plan.

    Args:
        plan: from :func:`installation_plan`.
        slicer_api: the ``slicer`` module (``slicer.util.pip_install``; ``slicer.pydeps.pip_ensure`` if any).
        constraints_dir: where the constraints file pinning Slicer's own packages is written.
        import_module: imports ``PyTorchUtils`` (the PyTorch extension's module).
        log: progress lines for the user.

    Raises:
        DependencyError: the PyTorch extension is missing, or PyTorch was not installed.
    """
    say = log or (lambda text: None)
    if not plan.torch_ok:
        try:
            pytorch_utils = import_module("PyTorchUtils")
        except ImportError as error:
            raise DependencyError(
                "UniFuse needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer "
                "and press Apply again."
            ) from error
        say(f"Installing PyTorch >= {MINIMUM_TORCH_VERSION} with the PyTorch extension")
        torch = pytorch_utils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
        if torch is None:
            raise DependencyError("PyTorch was not installed; UniFuse cannot run without it.")
    if plan.pip_requirements:
        constraints = write_constraints_file(constraints_dir)
        ensure = _pip_ensure(slicer_api)
        say("Installing " + ", ".join(plan.pip_requirements))
        if ensure is not None:
            from packaging.requirements import Requirement

            ensure([Requirement(r) for r in plan.pip_requirements], constraints=str(constraints), requester=requester)
        else:
            slicer_api.util.pip_install(pip_install_arguments(plan.pip_requirements, constraints))
    importlib.invalidate_caches()
    return installation_plan()
