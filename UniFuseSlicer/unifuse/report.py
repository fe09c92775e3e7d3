"""The run report of :func:`unifuse.fuse`: one record per stage, the guard's decisions, and warnings.

``RunReport.to_dict()`` is the JSON written as ``report.json`` (its keys are documented in
``docs/architecture.md``). Alignment stages carry the guard's ground-truth-free score (mean MIND-SSC
difference over the overlap and foreground; lower is better) and whether the stage was kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["StageRecord", "RunReport", "NOT_IMPROVED_WARNING"]

NOT_IMPROVED_WARNING = (
    "the alignment is not better than the header geometry by the pipeline's own ground-truth-free score "
    "(every alignment stage was rejected or made it worse); check the result against the source images — "
    "a partial field of view, very different anatomy or a failed header may need a mask (--reference-mask / "
    "--moving-mask) or a manual pre-alignment"
)


@dataclass
class StageRecord:
    """One stage of a run.

    Attributes:
        name: stage name (``read``, ``load_model``, ``header``, ``affine``, ``working_grid``, ``network``,
            ``refine``, ``fusion``, ``warp``, ``maps``).
        seconds: wall time of the stage.
        kept: alignment stages: whether the guard kept the stage's result (None for other stages, or when
            the stage did not run).
        score: alignment stages: the guard's score of the stage's result (lower is better).
        previous_score: the score of the result it competed with, on the same mask.
        details: stage-specific, JSON-ready facts (parameters, iterations, sizes, ...).
    """

    name: str
    seconds: float = 0.0
    kept: Optional[bool] = None
    score: Optional[float] = None
    previous_score: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class RunReport:
    """Everything a run reports; :meth:`to_dict` is ``report.json``.

    ``sections`` holds the JSON sections other than the stages (model, device, grids, normalisation,
    degradation, displacement, folding, error maps, ...), filled by the pipeline as it goes.
    """

    stages: List[StageRecord] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    sections: Dict[str, Any] = field(default_factory=dict)
    total_seconds: float = 0.0

    def stage(self, name: str) -> Optional[StageRecord]:
        """The record of stage ``name`` (None if it did not run)."""
        return next((s for s in self.stages if s.name == name), None)

    @property
    def final_alignment_stage(self) -> str:
        """Name of the last alignment stage whose result was kept (``header`` when none was)."""
        kept = [s.name for s in self.stages if s.kept]
        return kept[-1] if kept else "header"

    def to_dict(self) -> Dict[str, Any]:
        timings = {s.name: round(s.seconds, 4) for s in self.stages}
        timings["total"] = round(self.total_seconds, 4)
        alignment_stages = [s for s in self.stages if s.score is not None or s.kept is not None]
        out: Dict[str, Any] = dict(self.sections)
        out["stages"] = [s.to_dict() for s in self.stages]
        out["alignment"] = {
            "final_stage": self.final_alignment_stage,
            "stages": {s.name: {"kept": s.kept, "score": s.score, "previous_score": s.previous_score}
                       for s in alignment_stages},
            "score": "mean MIND-SSC descriptor difference over overlap and foreground (lower is better)",
        }
        out["notes"] = list(self.notes)
        out["timings_s"] = timings
        if self.warnings:
            out["warnings"] = list(self.warnings)
            out["warning"] = " | ".join(self.warnings)
        return out
