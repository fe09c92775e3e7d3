"""Exception types of the UniFuse core.

Every error a user can cause derives from :class:`UniFuseError` and carries a message that names the
problem and the fix. Front ends (CLI, Slicer module) catch ``UniFuseError`` and show ``str(error)`` as a
single readable line; anything else is a bug and is reported with a traceback.
"""

from __future__ import annotations


class UniFuseError(Exception):
    """Base class of all user-facing UniFuse errors."""


class InputImageError(UniFuseError, ValueError):
    """An input volume cannot be used (unreadable, wrong dimension, empty, non-finite, ...): a problem with the
    user's data. A programming error (arguments no user input can produce) raises a plain ``ValueError``."""


class GeometryError(UniFuseError, ValueError):
    """Reference and moving volumes are geometrically incompatible (e.g. no physical overlap)."""


class WeightsError(UniFuseError):
    """A weights file is missing, corrupt, of an unknown format, or does not match its checksum."""


class DeviceError(UniFuseError, RuntimeError):
    """The requested compute device is not available."""


class OutputExistsError(UniFuseError, FileExistsError):
    """An output file already exists and overwriting was not requested."""


class OutputLocationError(UniFuseError, OSError):
    """The output folder cannot be used (a file, not writable, too long a path, a pseudo-filesystem such as
    /proc, an empty path, an input or a folder where an output file would go)."""


class OutputLockedError(UniFuseError, OSError):
    """Another run is writing into the same output folder right now."""


class OutputWriteError(UniFuseError, OSError):
    """Writing or verifying an output file failed (disk full, file size limit, I/O error); nothing was
    changed in the output folder."""


class CancelledError(UniFuseError):
    """The run was cancelled by the user; no outputs were written."""


class ConfigError(UniFuseError, ValueError):
    """A model or training config has fields this version does not know (or lacks ones it needs)."""


class DatasetError(UniFuseError, ValueError):
    """A dataset folder is missing, empty, or does not follow the expected layout."""


class InsufficientMemoryError(UniFuseError, MemoryError):
    """Not enough memory (RAM or GPU) for the run, even at the smallest working grid and on the CPU."""
