"""The alignment guard: keep a stage's result only if it measurably improves on the previous one.

Each alignment stage (affine, network, refinement) proposes a candidate: the moving volume on the working
grid after the candidate's transform, with the mask of working-grid voxels where the moving volume has data.
The guard scores a candidate against the reference without ground truth — the mean MIND-SSC descriptor
difference (:func:`unifuse.registration.mind.alignment_score`, lower is better) over the reference's
foreground (and the optional user mask) where BOTH competing candidates have moving data — and keeps it only
if its score is lower than the current one's by at least ``min_gain`` (relative). Comparing on the shared
mask matters: a transform that pushes the moving volume out of the field of view would otherwise score well
on a smaller region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .registration.mind import alignment_score

__all__ = ["Candidate", "AlignmentGuard", "REFINE_MIN_GAIN"]

#: Relative score improvement the MIND-SSC refinement must reach to be kept (the other stages need
#: ``AlignmentGuard.min_gain``). The refinement optimises (nearly) the guard's own score, so it lowers that
#: score even where it only fits noise and the bias of the descriptors. Chosen on the 24 real-anatomy
#: *training* cases (12 with the shipped recipe's 0.6–1.1 mm non-affine residual, 12 rebuilt with 1.5–3.6 mm;
#: docs/probes/large_deformation_cases.py): every case the refinement made worse had a gain below 10.4 %,
#: and 10 of the 11 it improved had 11.9 % or more (docs/benchmark.md, "Refinement and the guard").
REFINE_MIN_GAIN: float = 0.11


@dataclass
class Candidate:
    """A proposed alignment on the working grid.

    Attributes:
        name: the stage that proposed it.
        moving: (1, 1, D, H, W) the moving volume resampled through the candidate, normalised to [0, 1].
        valid: (1, 1, D, H, W) 1 where the moving volume has data under the candidate, else 0.
    """

    name: str
    moving: torch.Tensor
    valid: torch.Tensor


class AlignmentGuard:
    """Scores and accepts candidates against one fixed volume on the working grid.

    Args:
        fixed: (1, 1, D, H, W) reference on the working grid, [0, 1].
        region: (1, 1, D, H, W) 1 inside the reference's foreground (and user mask), else 0.
        enabled: when False every candidate is accepted (scores are still computed and reported).
        min_gain: relative score improvement a candidate needs (0.002 = 0.2 %) — below that the difference
            is within the score's noise and the simpler, earlier result is kept.
    """

    def __init__(self, fixed: torch.Tensor, region: torch.Tensor, enabled: bool = True, min_gain: float = 0.002):
        self.fixed = fixed
        self.region = region > 0.5
        self.enabled = enabled
        self.min_gain = float(min_gain)

    def score(self, candidate: Candidate, other: Optional[Candidate] = None) -> float:
        """The candidate's score over the region where it (and ``other``, if given) has moving data."""
        mask = self.region & (candidate.valid > 0.5)
        if other is not None:
            mask = mask & (other.valid > 0.5)
        return float(alignment_score(self.fixed, candidate.moving, mask.float()))

    def compare(self, current: Candidate, proposed: Candidate,
                min_gain: Optional[float] = None) -> Tuple[bool, float, float]:
        """Whether to keep ``proposed`` over ``current``, with both scores on their shared mask.

        Args:
            min_gain: the relative improvement this comparison needs (default: the guard's ``min_gain``; the
                refinement uses :data:`REFINE_MIN_GAIN`).

        Returns:
            (keep, score of current, score of proposed).
        """
        before = self.score(current, proposed)
        after = self.score(proposed, current)
        better = after < before * (1.0 - (self.min_gain if min_gain is None else float(min_gain)))
        return (better or not self.enabled), before, after
