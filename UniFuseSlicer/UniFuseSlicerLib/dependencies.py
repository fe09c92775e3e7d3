"""What the UniFuse core needs in Slicer's Python, and how to install it without breaking Slicer.

* **torch** comes from Slicer's *PyTorch* extension (``PyTorchUtils``), which picks the right CUDA/CPU
  wheel for the machine; the module asks the user before installing it.
* Other packages the core imports at inference time (:data:`PIP_REQUIREMENTS`) are installed with
  ``slicer.util.pip_install`` when missing, with lower-bound versions only.
* Packages Slicer ships itself (:data:`PROTECTED_PACKAGES`: numpy, SimpleITK, vtk) are never installed,
  upgraded or replaced: every pip call gets a constraints file pinning their installed versions.

Nothing here needs Qt; the module's widget calls :func:`installation_plan` and then runs the steps.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

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
]

#: Lowest torch the core supports (``pyproject.toml``: ``torch>=2.1``).
MINIMUM_TORCH_VERSION = "2.1"
#: import name -> pip requirement, for packages the core imports at inference time besides torch.
PIP_REQUIREMENTS: Dict[str, str] = {
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "SimpleITK": "SimpleITK>=2.3",
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


def torch_status() -> Tuple[bool, Optional[str]]:
    """(usable, installed version): usable when torch is importable and >= :data:`MINIMUM_TORCH_VERSION`."""
    if importlib.util.find_spec("torch") is None:
        return False, None
    version = installed_version("torch")
    return (version is not None and version_at_least(version, MINIMUM_TORCH_VERSION)), version


def missing_pip_requirements(requirements: Optional[Dict[str, str]] = None) -> List[str]:
    """pip requirements of :data:`PIP_REQUIREMENTS` whose module cannot be imported.

    A protected package that is importable is never reported, whatever its version (Slicer's copy wins).
    """
    missing = []
    for module, requirement in (requirements or PIP_REQUIREMENTS).items():
        if importlib.util.find_spec(module) is None:
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
