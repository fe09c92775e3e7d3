"""Small geometry helpers shared by the tests (not a test module)."""

from __future__ import annotations

import numpy as np

#: LPS <-> RAS: negate x and y.
FLIP = np.diag([-1.0, -1.0, 1.0])


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from three angles in degrees (x, then y, then z)."""
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx
