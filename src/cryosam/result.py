"""What a run produces: one :class:`Instance` record per segmented object and the
:class:`SegmentationResult` that :func:`cryosam.export.write_outputs` writes to disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from cryosam.backends import Target
from cryosam.instance_mask import InstanceMask
from cryosam.io import Tomogram


@dataclass
class Instance:
    """One segmented particle (or membrane piece) and where it came from."""

    mask: InstanceMask
    seed: np.ndarray  # (3,) the click or proposal (z, y, x voxels) it grew from
    similarity: float  # matching similarity with the query, turned or not (1 for clicks)
    confidence: float  # segmenter confidence, clipped to [0, 1]
    click_row: int = -1  # row of its click in the points file; -1 for a match
    agreement: float = 1.0  # with the clicked particles' size, shape, density (1 for clicks)
    similarity_term: float = 1.0  # similarity above the matching threshold, in (0, 1]
    # density outside the clicked kind's own range (3+ clicks, score.density_range): its score
    # is tiny and it takes no part in choosing the automatic cut
    outside: bool = False
    # rows of other clicks whose masks were merged into this one (two clicks on one object)
    merged_clicks: tuple[int, ...] = ()

    @property
    def is_prompt(self) -> bool:
        """True for a clicked instance."""
        return self.click_row >= 0

    @property
    def click_rows(self) -> tuple[int, ...]:
        """Every click row that ended in this instance: its own, then those merged into it."""
        return ((self.click_row,) if self.is_prompt else ()) + self.merged_clicks

    @property
    def score(self) -> float:
        """How sure the pick is: its similarity above the matching threshold x the segmenter's
        confidence x its agreement with the clicked particles (see :mod:`cryosam.score`)."""
        return self.similarity_term * self.confidence * self.agreement

    @property
    def n_voxels(self) -> int:
        """Size of its mask in voxels (0 only for a click whose mask came out empty)."""
        return self.mask.n_voxels

    def position(self) -> np.ndarray:
        """Where the pick is reported: the mask's centroid, or the seed for an empty mask."""
        return self.mask.centroid() if self.mask.n_voxels else np.asarray(self.seed, float)


@dataclass
class SegmentationResult:
    """Everything a run produced; :func:`cryosam.export.write_outputs` writes it to disk.

    ``instances`` are in label order (``instances[i]`` is label ``i + 1`` in ``labels``):
    clicks first, then matches by score.
    """

    tomogram: Tomogram
    tomo_name: str
    target: Target
    prompt_zyx: np.ndarray  # (P, 3) clicked points, voxels
    instances: list[Instance]
    semantic: np.ndarray  # (D, H, W) int8, 1 = segmented
    labels: np.ndarray  # (D, H, W) int16/int32 instance ids (1..I), 0 = background
    proposals_zyx: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    proposal_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    record: dict[str, Any] = field(default_factory=dict)
    below_cut: list[Instance] = field(default_factory=list)  # matches under the score cut

    @cached_property
    def below_cut_zyx(self) -> np.ndarray:
        """(M, 3) positions of the matches below the score cut, best score first."""
        return np.array([i.position() for i in self.below_cut], dtype=float).reshape(-1, 3)

    def every_scored_pick(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pick the run scored, written or below the cut, as (zyx, ranking scores):
        what a best-F1-over-cuts or average-precision evaluation ranks. Clicks rank first
        (their ranking score is raised above every match's)."""
        zyx = np.vstack([self.picks_zyx, self.below_cut_zyx])
        ranking = np.concatenate([self.pick_scores + 2.0 * self.pick_is_prompt,
                                  [i.score for i in self.below_cut]])
        return zyx, ranking

    # per instance, in label order
    @property
    def instance_scores(self) -> np.ndarray:
        """:attr:`Instance.score` of every instance, clicks included, in label order."""
        return np.array([i.score for i in self.instances], dtype=float)

    # picks: one per instance at its centroid, best score first (particles only)
    @cached_property
    def _pick_order(self) -> np.ndarray:
        if self.target != "particle":
            return np.zeros(0, dtype=int)
        return np.argsort(-self.instance_scores, kind="stable")

    def _picked(self, attr: str, dtype: type) -> np.ndarray:
        return np.array([getattr(self.instances[i], attr) for i in self._pick_order],
                        dtype=dtype)

    @cached_property
    def picks_zyx(self) -> np.ndarray:
        """(N, 3) pick positions in voxels (z, y, x), best score first; a click whose mask
        came out empty is reported at the click itself."""
        if not len(self._pick_order):
            return np.zeros((0, 3))
        return np.array([self.instances[i].position() for i in self._pick_order], dtype=float)

    @property
    def pick_scores(self) -> np.ndarray:
        """:attr:`Instance.score` of each pick, best first."""
        return self._picked("score", float)

    @property
    def pick_similarity(self) -> np.ndarray:
        """Matching similarity of each pick with the query (1 for clicks), in pick order."""
        return self._picked("similarity", float)

    @property
    def pick_confidence(self) -> np.ndarray:
        """Segmenter confidence of each pick, in [0, 1], in pick order."""
        return self._picked("confidence", float)

    @property
    def pick_is_prompt(self) -> np.ndarray:
        """True for each pick that is a click rather than a match, in pick order."""
        return self._picked("is_prompt", bool)

    @property
    def pick_click_row(self) -> np.ndarray:
        """Row of each pick's click in the points file (0-based), -1 for matches."""
        return self._picked("click_row", np.int64)

    @property
    def pick_instance_ids(self) -> np.ndarray:
        """Label of each pick in ``instances.mrc``."""
        return self._pick_order + 1

    @cached_property
    def pick_n_voxels(self) -> np.ndarray:
        """Mask size of each pick in voxels, in pick order (napari sizes its points by it)."""
        return self._picked("n_voxels", np.int64)


def negatives_summary(record: dict[str, Any]) -> str:
    """What a run's negative clicks did, for a status line ("" without negatives): shared by
    the CLI's summary and napari's widget."""
    report = record.get("negatives")
    if not report:
        return ""
    empty = report["clicks"] - report["masks"]
    return (f"; {report['clicks']} negative click(s) dropped "
            f"{sum(report['dropped'].values())} candidate match(es) (not all would have "
            "been picks)"
            + (f" ({empty} gave no mask and exclude nothing: put them on the structure)"
               if empty else ""))
