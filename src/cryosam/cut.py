"""The automatic score cut: which matches are written as picks.

Among the matches of one tomogram, the particles of the clicked kind and everything else
form two groups of scores. A two-component Gaussian mixture on the log-scores (started from
Otsu's split, fitted by EM) says whether there are two groups — their means more than
``MIN_SEPARATION`` pooled standard deviations apart — and where the upper group lies. The
cut is then the middle of the widest empty stretch of log-scores between ``FLOOR`` and the
upper group's mean: the place where the tomogram's own scores thin out between the two.
Without two groups (or with fewer than ``MIN_MATCHES`` matches) every match at or above
``FLOOR`` is kept. Matches beyond the clicked kind's density range (three or more clicks,
:mod:`cryosam.score`) are decided already and take no part in the fit. When the query
matches more than ``score.background_share`` of the tomogram, no match is written
(:func:`background_cut`): the clicked particle looks like the background to the encoder.
``--min-score`` replaces all of this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from cryosam.config import ScoreConfig

FLOOR = 1e-3  # a match scoring below this is never written by the automatic cut
ABOVE_EVERY_SCORE = 1.000001  # scores are products of terms in [0, 1]
BACKGROUND = "query matches background"  # the method of :func:`background_cut`
MIN_SEPARATION = 1.5  # pooled standard deviations between the two groups' means
MIN_MATCHES = 4  # fewer matches than this: no distribution to cut, the floor decides
EM_STEPS = 100


@dataclass(frozen=True)
class Cut:
    """The score threshold and how it was chosen."""

    threshold: float
    method: str  # "widest gap", "one group", "few matches", "given", "query matches background"
    separation: float | None = None  # the mixture's separation in pooled stds

    def report(self) -> dict[str, object]:
        """The cut for the run record's ``score.cut``: threshold (6 decimals), method, and the
        mixture's separation in pooled stds (None when no mixture was fitted)."""
        return {"threshold": round(self.threshold, 6), "method": self.method,
                "separation": None if self.separation is None else round(self.separation, 3)}


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of 1-D ``values``: the split maximising the between-group variance."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n < 2 or v[0] == v[-1]:
        return float(v[0]) if n else 0.0
    csum = np.cumsum(v)
    k = np.arange(1, n)
    mean_lo = csum[:-1] / k
    mean_hi = (csum[-1] - csum[:-1]) / (n - k)
    between = k * (n - k) * (mean_hi - mean_lo) ** 2
    best = int(np.argmax(between))
    return float(0.5 * (v[best] + v[best + 1]))


def _mixture(x: np.ndarray, split: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EM fit of two Gaussians to ``x`` started from the groups either side of ``split``:
    weights, means, standard deviations (lower component first)."""
    lo, hi = x[x <= split], x[x > split]
    w = np.array([len(lo), len(hi)], dtype=np.float64) / len(x)
    mu = np.array([lo.mean(), hi.mean()])
    floor = 0.05 * float(x.std()) + 1e-6
    sd = np.array([max(float(lo.std()), floor), max(float(hi.std()), floor)])
    for _ in range(EM_STEPS):
        dens = w / sd * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2)
        resp = dens / np.maximum(dens.sum(1, keepdims=True), 1e-300)
        nk = resp.sum(0) + 1e-9
        new_mu = (resp * x[:, None]).sum(0) / nk
        sd = np.maximum(np.sqrt((resp * (x[:, None] - new_mu) ** 2).sum(0) / nk), floor)
        w = nk / nk.sum()
        done = np.allclose(new_mu, mu, atol=1e-7)
        mu = new_mu
        if done:
            break
    order = np.argsort(mu)
    return w[order], mu[order], sd[order]


def automatic_cut(scores: np.ndarray) -> Cut:
    """The threshold that separates the matches' two score groups (see the module)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) < MIN_MATCHES:
        return Cut(FLOOR, "few matches")
    x = np.log(np.maximum(s, 0.1 * FLOOR))
    if float(x.max() - x.min()) < 1e-9:
        return Cut(FLOOR, "one group")
    _, mu, sd = _mixture(x, otsu(x))
    pooled = math.sqrt(0.5 * (sd[0] ** 2 + sd[1] ** 2))
    separation = float((mu[1] - mu[0]) / pooled)
    if separation < MIN_SEPARATION:
        return Cut(FLOOR, "one group", separation)
    # the widest empty stretch of log-scores between the floor and the upper group's mean
    v = np.sort(np.append(x[(x > math.log(FLOOR)) & (x <= mu[1])], math.log(FLOOR)))
    if len(v) < 2:
        return Cut(FLOOR, "widest gap", separation)
    g = int(np.argmax(np.diff(v)))
    return Cut(float(max(math.exp(0.5 * (v[g] + v[g + 1])), FLOOR)), "widest gap", separation)


def background_cut() -> Cut:
    """No match is written: the query matches most of the tomogram, so its matches are
    background as likely as particles (scores never exceed 1)."""
    return Cut(ABOVE_EVERY_SCORE, BACKGROUND)


class ScoredMatch(Protocol):
    """What the cut needs of a match (:class:`cryosam.result.Instance` is one)."""

    @property
    def score(self) -> float:
        """The match's score in [0, 1] (:mod:`cryosam.score`), the value the cut is placed among."""
        ...

    outside: bool  # beyond the clicked kind's density range: decided already


def choose_cut(matches: Sequence[ScoredMatch], share: float, cfg: ScoreConfig) -> Cut:
    """The cut of one run's ``matches`` (clicks excluded): ``cfg.min_score`` when given; none
    written when the query matched more than ``cfg.background_share`` of the tomogram
    (``MatchStats.share``); otherwise the automatic cut of the scores of the matches not
    ``outside`` the clicked kind's density range (those are decided already)."""
    if cfg.min_score is not None:
        return given_cut(cfg.min_score)
    if len(matches) and share > cfg.background_share:
        return background_cut()
    return automatic_cut(np.array([m.score for m in matches if not m.outside], dtype=float))


def background_message(share: float, matches: int) -> str:
    """Why a background cut wrote none of the ``matches`` (shared by the CLI and napari)."""
    return (f"the query matches {share:.0%} of the tomogram: to the encoder the clicked "
            f"particle looks like the background, so none of its {matches} matches is "
            "written (they are kept below the cut); click the particle's densest part or "
            "add clicks")


def given_cut(min_score: float) -> Cut:
    """The user's ``--min-score``."""
    return Cut(float(min_score), "given")
