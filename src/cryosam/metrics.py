"""Picking and mask metrics: one-to-one matching within a radius, P/R/F1, best F1, AP, Dice, IoU.

Matching. A pick and a true particle may be paired when their centres are at most ``radius``
voxels apart; each pick and each particle is used at most once. :func:`match_points` finds a
pairing with the most pairs and, among those, the smallest total distance (Hungarian
assignment, ``scipy.optimize.linear_sum_assignment``, run per connected group of nearby
points so large files stay cheap). TP = pairs, FP = unpaired picks, FN = unpaired particles.

Ranked picks. With a score per pick, :func:`ranked_metrics` sorts the picks by descending
score and, at every distinct score threshold ``t`` (picks with score >= t kept), counts TP as
the largest one-to-one pairing of the kept picks (optimal, not greedy: a high-scoring pick
between two particles never blocks a lower one). From that curve it reports the best F1 (and
its threshold) and the average precision ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the
thresholds in descending order (the step-wise area under the precision-recall curve, no
interpolation; scikit-learn's ``average_precision_score`` definition).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cryosam.errors import InputError


@dataclass(frozen=True)
class MatchResult:
    """One-to-one matching of picks to truth within ``radius`` (voxels)."""

    radius: float
    n_picks: int
    n_truth: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_distance: float  # over matched pairs (nan when none)
    pick_index: np.ndarray  # (tp,) index into picks of each pair
    truth_index: np.ndarray  # (tp,) index into truth of each pair
    distances: np.ndarray  # (tp,) voxels

    def summary(self) -> dict[str, Any]:
        """The scalar fields, for tables and JSON."""
        d = asdict(self)
        for key in ("pick_index", "truth_index", "distances"):
            d.pop(key)
        return d


@dataclass(frozen=True)
class RankedResult:
    """Precision-recall over score thresholds (see the module docstring)."""

    radius: float
    n_picks: int
    n_truth: int
    best_f1: float
    best_threshold: float  # keep picks with score >= this for best_f1 (inf when none)
    best_precision: float
    best_recall: float
    average_precision: float
    thresholds: np.ndarray  # distinct scores, descending
    precision: np.ndarray  # at each threshold
    recall: np.ndarray  # at each threshold
    tp: np.ndarray  # at each threshold

    def summary(self) -> dict[str, Any]:
        """The scalar fields, for tables and JSON."""
        d = asdict(self)
        for key in ("thresholds", "precision", "recall", "tp"):
            d.pop(key)
        return d


@dataclass(frozen=True)
class MaskMetrics:
    """Overlap of two binary masks; both empty counts as perfect agreement."""

    dice: float
    iou: float
    n_pred: int
    n_truth: int
    n_intersection: int

    def summary(self) -> dict[str, Any]:
        """The fields, for tables and JSON."""
        return asdict(self)


def _as_points(points: np.ndarray | Any, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"{name}: expected an (N, 3) array of z,y,x points, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinite coordinates")
    return arr


def _check_radius(radius: float) -> float:
    r = float(radius)
    if not (r > 0 and np.isfinite(r)):
        raise InputError(f"--radius {radius}: must be a positive number of voxels")
    return r


def _prf(tp: int, n_picks: int, n_truth: int) -> tuple[float, float, float]:
    precision = tp / n_picks if n_picks else 0.0
    recall = tp / n_truth if n_truth else 0.0
    f1 = 2 * tp / (n_picks + n_truth) if (n_picks + n_truth) else 0.0
    return precision, recall, f1


def match_points(picks: np.ndarray, truth: np.ndarray, radius: float) -> MatchResult:
    """Pair picks with true centres one-to-one within ``radius`` (max pairs, then min distance).

    ``picks`` and ``truth`` are (N, 3) arrays in the same frame (z, y, x voxels).
    """
    r = _check_radius(radius)
    p = _as_points(picks, "picks")
    t = _as_points(truth, "truth")
    pi_all: list[np.ndarray] = []
    ti_all: list[np.ndarray] = []
    if len(p) and len(t):
        rows, cols = _pairs_within(p, t, r)
        dist = np.linalg.norm(p[rows] - t[cols], axis=1)
        if len(rows):
            n_p = len(p)
            graph = coo_matrix((np.ones(len(rows)), (rows, n_p + cols)),
                               shape=(n_p + len(t),) * 2)
            _, comp = connected_components(graph, directed=False)
            edge_comp = comp[rows]
            order = np.argsort(edge_comp, kind="stable")
            bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
            for grp in np.split(order, bounds):
                gr, gc, gd = rows[grp], cols[grp], dist[grp]
                ur, ir = np.unique(gr, return_inverse=True)
                uc, ic = np.unique(gc, return_inverse=True)
                big = (len(ur) + len(uc) + 1) * r * 10.0 + 1.0
                cost = np.full((len(ur), len(uc)), big)
                cost[ir, ic] = gd
                a, b = linear_sum_assignment(cost)
                ok = cost[a, b] < big
                pi_all.append(ur[a[ok]])
                ti_all.append(uc[b[ok]])
    pick_index = np.concatenate(pi_all).astype(np.int64) if pi_all else np.zeros(0, np.int64)
    truth_index = np.concatenate(ti_all).astype(np.int64) if ti_all else np.zeros(0, np.int64)
    order = np.argsort(pick_index, kind="stable")
    pick_index, truth_index = pick_index[order], truth_index[order]
    distances = (np.linalg.norm(p[pick_index] - t[truth_index], axis=1) if len(pick_index)
                 else np.zeros(0))
    tp = int(len(pick_index))
    precision, recall, f1 = _prf(tp, len(p), len(t))
    return MatchResult(
        radius=r, n_picks=len(p), n_truth=len(t), tp=tp, fp=len(p) - tp, fn=len(t) - tp,
        precision=precision, recall=recall, f1=f1,
        mean_distance=float(distances.mean()) if tp else float("nan"),
        pick_index=pick_index, truth_index=truth_index, distances=distances)


def _pairs_within(p: np.ndarray, t: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (pick, truth) whose distance is at most ``r``."""
    lists = cKDTree(p).query_ball_tree(cKDTree(t), r)
    rows = np.repeat(np.arange(len(p)), [len(js) for js in lists])
    cols = np.fromiter((j for js in lists for j in js), dtype=np.int64, count=len(rows))
    return rows.astype(np.int64), cols


def _incremental_matching_sizes(neighbours: list[np.ndarray], n_truth: int) -> np.ndarray:
    """Size of a maximum one-to-one matching of the first k picks, for every k.

    Kuhn's algorithm with the picks added in order, one augmenting-path search per new pick.
    A pick with no augmenting path when it is added never gains one later, so after pick k
    the matching is maximum for picks 0..k.
    """
    match_truth = np.full(n_truth, -1, dtype=np.int64)  # truth -> pick
    match_pick = np.full(len(neighbours), -1, dtype=np.int64)  # pick -> truth
    sizes = np.zeros(len(neighbours), dtype=np.int64)
    size = 0
    for k, nbrs in enumerate(neighbours):
        if len(nbrs):
            parent: dict[int, int] = {}  # truth -> the pick it was reached from
            frontier, found = [k], -1
            while frontier and found < 0:
                nxt: list[int] = []
                for pick in frontier:
                    for tr in neighbours[pick].tolist():
                        if tr in parent:
                            continue
                        parent[tr] = pick
                        if match_truth[tr] < 0:
                            found = tr
                            break
                        nxt.append(int(match_truth[tr]))
                    if found >= 0:
                        break
                frontier = nxt
            if found >= 0:  # flip the alternating path back to pick k
                tr = found
                while True:
                    pick = parent[tr]
                    old = int(match_pick[pick])
                    match_truth[tr], match_pick[pick] = pick, tr
                    if pick == k:
                        break
                    tr = old
                size += 1
        sizes[k] = size
    return sizes


def ranked_metrics(picks: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                   radius: float) -> RankedResult:
    """Best F1 over score thresholds and average precision (see the module docstring)."""
    r = _check_radius(radius)
    p = _as_points(picks, "picks")
    t = _as_points(truth, "truth")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(p):
        raise InputError(f"scores: {len(s)} values for {len(p)} picks")
    if not np.isfinite(s).all():
        raise InputError("scores: contains NaN or infinite values")
    order = np.argsort(-s, kind="stable")
    p, s = p[order], s[order]
    if len(p) and len(t):
        lists = cKDTree(p).query_ball_tree(cKDTree(t), r)
        neighbours = [np.asarray(sorted(js), dtype=np.int64) for js in lists]
    else:
        neighbours = [np.zeros(0, np.int64) for _ in range(len(p))]
    sizes = _incremental_matching_sizes(neighbours, len(t))
    # evaluate at the last pick of each group of equal scores
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if len(s) else np.zeros(0, np.int64)
    kept = last + 1
    tp = sizes[last] if len(last) else np.zeros(0, np.int64)
    precision = tp / np.maximum(kept, 1)
    recall = tp / len(t) if len(t) else np.zeros(len(tp))
    f1 = 2 * tp / (kept + len(t))
    prev_recall = np.r_[0.0, recall[:-1]]
    ap = float(np.sum((recall - prev_recall) * precision)) if len(t) else 0.0
    if len(f1) and f1.max() > 0:
        best = int(np.argmax(f1))
        best_f1, best_thr = float(f1[best]), float(s[last[best]])
        best_p, best_r = float(precision[best]), float(recall[best])
    else:
        best_f1, best_thr, best_p, best_r = 0.0, float("inf"), 0.0, 0.0
    return RankedResult(
        radius=r, n_picks=len(p), n_truth=len(t), best_f1=best_f1, best_threshold=best_thr,
        best_precision=best_p, best_recall=best_r, average_precision=ap,
        thresholds=s[last] if len(last) else np.zeros(0), precision=precision, recall=recall,
        tp=tp)


def fraction_picked(points: np.ndarray, picks: np.ndarray, radius: float) -> float:
    """Share of ``points`` (e.g. distractors) with any pick within ``radius`` (not one-to-one):
    how often a picker fires on things it should not."""
    pts = _as_points(points, "points")
    pk = _as_points(picks, "picks")
    r = _check_radius(radius)
    if not len(pts) or not len(pk):
        return 0.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(pk).query(pts, k=1, distance_upper_bound=r * (1 + 1e-12))
    return float(np.isfinite(dist).mean())


def mask_metrics(pred: np.ndarray, truth: np.ndarray) -> MaskMetrics:
    """Dice and IoU of two boolean masks of the same shape (non-zero = inside)."""
    a = np.asarray(pred)
    b = np.asarray(truth)
    if a.shape != b.shape:
        raise InputError(f"masks differ in shape: {a.shape} vs {b.shape}")
    a = a.astype(bool, copy=False)
    b = b.astype(bool, copy=False)
    n_a, n_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    inter = int(np.count_nonzero(a & b))
    union = n_a + n_b - inter
    dice = 2 * inter / (n_a + n_b) if (n_a + n_b) else 1.0
    iou = inter / union if union else 1.0
    return MaskMetrics(dice=float(dice), iou=float(iou), n_pred=n_a, n_truth=n_b,
                       n_intersection=inter)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A|+|B|) of two masks (1.0 when both are empty)."""
    return mask_metrics(pred, truth).dice


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union |A∩B| / |A∪B| of two masks (1.0 when both are empty)."""
    return mask_metrics(pred, truth).iou


@dataclass(frozen=True)
class PickEvaluation:
    """Matching of all picks plus, when scores are given, the ranked metrics."""

    match: MatchResult
    ranked: RankedResult | None = None

    @property
    def precision(self) -> float:
        """TP / picks over all picks, whatever their score (0 without picks)."""
        return self.match.precision

    @property
    def recall(self) -> float:
        """TP / true particles over all picks (0 without particles)."""
        return self.match.recall

    @property
    def f1(self) -> float:
        """2 TP / (picks + true particles) over all picks (0 when both are empty)."""
        return self.match.f1

    @property
    def tp(self) -> int:
        """Picks paired one-to-one with a true particle within the radius."""
        return self.match.tp

    @property
    def fp(self) -> int:
        """Picks left without a true particle (false positives)."""
        return self.match.fp

    @property
    def fn(self) -> int:
        """True particles left without a pick (missed)."""
        return self.match.fn

    @property
    def best_f1(self) -> float | None:
        """Best F1 over score thresholds (None without scores)."""
        return self.ranked.best_f1 if self.ranked is not None else None

    @property
    def average_precision(self) -> float | None:
        """Average precision (None without scores)."""
        return self.ranked.average_precision if self.ranked is not None else None

    def summary(self) -> dict[str, Any]:
        """All scalar figures in one flat dict (for tables, JSON and run records)."""
        out = self.match.summary()
        if self.ranked is not None:
            out.update({k: v for k, v in self.ranked.summary().items()
                        if k not in ("radius", "n_picks", "n_truth")})
        return out


def evaluate_picks(picks: np.ndarray, truth: np.ndarray, radius: float,
                   scores: np.ndarray | None = None) -> PickEvaluation:
    """:func:`match_points` on all picks, plus :func:`ranked_metrics` when ``scores`` given."""
    match = match_points(picks, truth, radius)
    ranked = ranked_metrics(picks, scores, truth, radius) if scores is not None else None
    return PickEvaluation(match=match, ranked=ranked)


def mean_per_kind(runs: Sequence[Mapping[str, Mapping[str, float]]], parts: Sequence[str],
                  kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per part, per kind: the mean over the ``runs`` (e.g. seeds) that measured it, and
    ``"mean"`` over those kinds; a part no run measured is left out. The benchmark scripts'
    tables (``docs/benchmarks/ceiling.py``, ``losses.py``)."""
    out: dict[str, dict[str, float]] = {}
    for part in parts:
        per_kind = {k: float(np.mean([r[part][k] for r in runs if k in r[part]]))
                    for k in kinds if any(k in r[part] for r in runs)}
        if per_kind:
            out[part] = {**per_kind, "mean": float(np.mean(list(per_kind.values())))}
    return out
