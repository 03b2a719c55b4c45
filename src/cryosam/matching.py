"""Find every particle like the prompted ones: query pooling, coarse-to-fine matching, NMS, top-K.

The query is the masked average of the FeatureVolume over the prompts' instance masks (the
paper's Eq. 4; ``query="max"`` keeps one query per prompt as well). Matching scores cells
of r-times coarser voxel grids by cosine similarity with the queries (max over the
queries): first every cell at the coarsest ratio, then only the children of the cells that
reached ``sim_threshold - coarse_margin``. Coarse levels are scored on features averaged
over each cell (``FeatureVolume.pooled``), not at one point that may miss a small particle.
The last level keeps cells >= ``sim_threshold``, scored exactly as the naive baseline scores
them, and (with ``grow``) follows each surviving region past the children of its coarse
cells to its rim, so a particle straddling a coarse-cell border is not cut. Its survivors go
through 3-D non-maximum suppression and the best ``top_k`` become proposals.

Scoring is a matmul of L2-normalised features with the queries on the chosen device (torch);
FAISS ``IndexFlatIP`` (on the GPU when FAISS has one) is available as ``backend="faiss"``. With a
handful of queries the search is a (n, dim) x (dim, Q) product: torch does it without the copies
FAISS needs and measured ~4-15x faster on CPU, and sampling the features dominates anyway.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from cryosam.config import QUERY_MODES, MatchingConfig
from cryosam.device import resolve_device
from cryosam.errors import InputError

BACKENDS = ("auto", "torch", "faiss")


class FeatureSource(Protocol):
    """What matching needs from :class:`cryosam.features.FeatureVolume`."""

    shape: tuple[int, int, int]
    dim: int

    def sample(self, zyx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features (N, dim) float32 at (N, 3) voxel coordinates (z, y, x), un-normalised."""
        ...

    def grid_shape(self, ratio: int) -> tuple[int, int, int]:
        """Shape of the ``ratio``-times coarser grid: ceil(D/r), ceil(H/r), ceil(W/r)."""
        ...

    def cell_centres(self, ratio: int, cells: np.ndarray) -> np.ndarray:
        """Voxel centres (n, 3) (z, y, x) of cells (n, 3) of the ``ratio``-times coarser grid."""
        ...

    def iter_grid(
        self, ratio: int, cells: np.ndarray | None = None, chunk_size: int = 65536
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Chunks of (cells (n, 3), features (n, dim)) of the ``ratio`` grid (``cells`` or all)."""
        ...

    def pooled(self, ratio: int) -> FeatureSource:
        """The same features averaged over ``ratio``-voxel cells (coarse levels)."""
        ...


@dataclass(frozen=True)
class LevelStats:
    """One matching level: how many cells were scored, how many reached the threshold."""

    ratio: int
    cells_scored: int
    survivors: int
    seconds: float
    cells_total: int = 0  # cells in this level's grid (scored or not)


@dataclass(frozen=True)
class MatchStats:
    """Where the time went (for the run record and the benchmark)."""

    levels: tuple[LevelStats, ...]
    nms_candidates: int  # cells of the last level that entered NMS
    nms_seconds: float
    total_seconds: float
    backend: str
    device: str
    naive: bool
    vectors_scored: int = 1  # query vectors each cell is scored against (its best counts)

    @property
    def cells_scored(self) -> int:
        """Total feature vectors scored over all levels."""
        return sum(level.cells_scored for level in self.levels)

    @property
    def share(self) -> float:
        """Share of the tomogram that looks like the query: the fraction of the finest
        grid's cells at or above the similarity threshold. A particle's query matches a few
        percent; one that matches most of the tomogram describes the background."""
        if not self.levels or self.levels[-1].cells_total == 0:
            return 0.0
        return self.levels[-1].survivors / self.levels[-1].cells_total

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        out = asdict(self)
        out["cells_scored"] = self.cells_scored
        out["share"] = round(self.share, 4)
        return out


@dataclass(frozen=True)
class Proposals:
    """Candidate particle centres, best first, in voxel coordinates of the full tomogram."""

    zyx: np.ndarray  # (K, 3) float64, (z, y, x) voxels
    scores: np.ndarray  # (K,) float32, max cosine similarity over the queries
    stats: MatchStats = field(repr=False)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


# --------------------------------------------------------------------------------------- query


def pool_query(
    fv: FeatureSource,
    masks: Sequence[np.ndarray],
    *,
    max_voxels: int = 4096,
    seed: int = 0,
    mode: str = "mean",
) -> torch.Tensor:
    """The query: masked average of the features over the prompts' masks, L2-normalised.

    ``masks`` holds each prompt's instance mask as (n_i, 3) voxel coordinates (z, y, x) (a
    boolean volume of ``fv.shape`` is accepted too). ``mode="mean"`` (the paper's Eq. 4)
    gives one vector, (1, dim): the average over every masked voxel of every prompt, so a
    big particle weighs by its voxels and one leaky click cannot dominate. ``mode="max"``
    gives each prompt's own query followed by their normalised mean, (Q + 1, dim); matching
    takes the best of them, so a match may resemble any one prompt. Masks larger than
    ``max_voxels`` are subsampled with a generator seeded by ``seed`` and the prompt's index
    (each subsample's mean still weighs by the full mask), so the query is reproducible.
    """
    if mode not in QUERY_MODES:
        raise InputError(f"query mode {mode!r} is not one of {', '.join(QUERY_MODES)}")
    if len(masks) == 0:
        raise InputError("no prompt masks to build a query from; give at least one prompt point")
    means, counts = [], []
    for i, mask in enumerate(masks):
        coords = _mask_coords(mask, fv.shape, i)
        counts.append(len(coords))
        if max_voxels > 0 and len(coords) > max_voxels:
            rng = np.random.default_rng([seed, i])
            coords = coords[np.sort(rng.choice(len(coords), size=max_voxels, replace=False))]
        feats = fv.sample(coords.astype(np.float32)).float()
        means.append(feats.mean(0))
    stacked = torch.stack(means)
    if mode == "mean":
        w = torch.tensor(counts, dtype=stacked.dtype, device=stacked.device)[:, None]
        return _normalise((stacked * w).sum(0, keepdim=True) / w.sum()).cpu()
    q = _normalise(stacked)
    if len(means) > 1:
        q = torch.cat([q, _normalise(q.mean(0, keepdim=True))])
    return q.cpu()


def similarity(fv: FeatureSource, zyx: np.ndarray, queries: torch.Tensor) -> np.ndarray:
    """(N,) the best cosine similarity of the features at the points ``zyx`` (voxels) with
    ``queries`` (Q, dim): how much each point looks like any of them."""
    pts = np.asarray(zyx, dtype=np.float32).reshape(-1, 3)
    if not len(pts):
        return np.zeros(0)
    scorer = _Scorer(_prepare_queries(queries, fv.dim), "torch", torch.device("cpu"))
    return scorer(fv.sample(pts).cpu()).astype(np.float64)


def _mask_coords(mask: np.ndarray, shape: Sequence[int], index: int) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype == bool and arr.ndim == 3 and tuple(arr.shape) == tuple(shape):
        arr = np.argwhere(arr)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(
            f"prompt {index}: mask must be (n, 3) z,y,x voxel coordinates or a boolean volume "
            f"of shape {tuple(shape)}, got an array of shape {arr.shape}"
        )
    if len(arr) == 0:
        raise InputError(
            f"prompt {index}: its instance mask is empty; move the point onto a particle"
        )
    return arr


def particle_radius_from_masks(masks: Sequence[np.ndarray]) -> float:
    """Median equivalent-sphere radius (voxels) of the prompt masks: (3n / 4 pi)^(1/3)."""
    if len(masks) == 0:
        raise InputError("no prompt masks to size the particles from; pass --nms-radius")
    counts = []
    for mask in masks:
        arr = np.asarray(mask)
        counts.append(int(arr.sum()) if arr.dtype == bool and arr.ndim == 3 else len(arr))
    return float((3.0 * float(np.median(counts)) / (4.0 * math.pi)) ** (1.0 / 3.0))


def nms_radius_from_masks(masks: Sequence[np.ndarray], *, factor: float = 1.5) -> float:
    """NMS radius in voxels: ``factor`` x the median equivalent-sphere radius of the masks.

    Centres of two particles that do not overlap are at least two radii apart, so 1.5 radii
    never merges two real particles (even with centre errors of a quarter radius each) while
    suppressing duplicate peaks on the same particle.
    """
    return max(1.0, factor * particle_radius_from_masks(masks))


# ------------------------------------------------------------------------------------ matching


def match(
    fv: FeatureSource,
    queries: torch.Tensor | np.ndarray,
    config: MatchingConfig,
    *,
    nms_radius: float,
    particle_radius: float | None = None,
    device: str | torch.device = "auto",
) -> Proposals:
    """Score the tomogram against the queries coarse-to-fine, then NMS and top-K.

    With ``config.naive`` every cell of the finest grid is scored in one pass instead (the
    baseline the hierarchy is measured against). Memory stays bounded: features are scored in
    chunks of ``config.chunk_size`` cells and only the cells that reach the threshold are kept.
    With ``particle_radius`` (voxels, e.g. :func:`particle_radius_from_masks`) and
    ``config.adapt_ratios``, levels coarser than the particle's diameter are skipped: a cell
    larger than the particle dilutes it among its surroundings and may lose it.
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # compares equal to fv.device
    ratios = _check_ratios(config.ratios)
    if particle_radius is not None and config.adapt_ratios:
        ratios = tuple(r for r in ratios[:-1] if r <= 2 * particle_radius) + ratios[-1:]
    if getattr(fv, "device", dev) != dev and hasattr(fv, "to"):
        fv = fv.to(dev)  # sample where the scoring runs (the GPU holds a 200x1000x1000 easily)
    prepared = _prepare_queries(queries, fv.dim)
    scorer = _Scorer(prepared, config.backend, dev)
    levels = (ratios[-1],) if config.naive else ratios
    tau = float(config.sim_threshold)

    stats: list[LevelStats] = []
    cells: np.ndarray | None = None  # None: every cell of the level's grid
    kept_cells = np.zeros((0, 3), dtype=np.int64)
    kept_scores = np.zeros(0, dtype=np.float32)
    for i, ratio in enumerate(levels):
        t0 = time.perf_counter()
        if i > 0:
            cells = children(fv, levels[i - 1], kept_cells, ratio, dilation=config.dilation)
        last = i == len(levels) - 1
        level_tau = tau if last else tau - float(config.coarse_margin)
        source = fv if last or not config.coarse_pooling else fv.pooled(ratio)
        kept_cells, kept_scores, n_scored = _score_level(
            source, ratio, cells, scorer, level_tau, config.chunk_size
        )
        if cells is not None and config.grow and last:
            kept_cells, kept_scores, n_grown = _grow(
                source, ratio, cells, (kept_cells, kept_scores), scorer, level_tau,
                config.chunk_size,
            )
            n_scored += n_grown
        stats.append(LevelStats(ratio, n_scored, len(kept_cells), time.perf_counter() - t0,
                                int(np.prod(fv.grid_shape(ratio)))))

    t0 = time.perf_counter()
    centres = np.asarray(fv.cell_centres(levels[-1], kept_cells), dtype=np.float64).reshape(-1, 3)
    keep = nms(centres, kept_scores, nms_radius, top_k=config.top_k)
    t_nms = time.perf_counter() - t0
    match_stats = MatchStats(
        levels=tuple(stats),
        nms_candidates=len(kept_cells),
        nms_seconds=t_nms,
        total_seconds=time.perf_counter() - t_start,
        backend=scorer.backend,
        device=str(dev),
        naive=bool(config.naive),
        vectors_scored=int(prepared.shape[0]),
    )
    return Proposals(centres[keep], kept_scores[keep].astype(np.float32), match_stats)


def _check_ratios(ratios: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(r) for r in ratios)
    if not out or min(out) < 1 or any(a <= b for a, b in zip(out, out[1:], strict=False)):
        raise InputError(
            f"matching ratios {tuple(ratios)} must be positive integers, coarse to fine "
            "(strictly decreasing), e.g. 16,8,4"
        )
    return out


def _prepare_queries(queries: torch.Tensor | np.ndarray, dim: int) -> torch.Tensor:
    q = torch.as_tensor(np.asarray(queries) if not torch.is_tensor(queries) else queries)
    q = q.detach().float().cpu()
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
        raise InputError(
            f"queries of shape {tuple(q.shape)} do not match the features' {dim} channels; "
            "build them with pool_query on the same FeatureVolume"
        )
    if not torch.isfinite(q).all():
        raise InputError("queries contain NaN or infinite values; check the prompt masks")
    return _normalise(q)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _Scorer:
    """Max cosine similarity of feature rows with the (normalised) queries."""

    def __init__(self, queries: torch.Tensor, backend: str, device: torch.device) -> None:
        if backend not in BACKENDS:
            raise InputError(f"matching backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.device = device
        self.backend = "torch" if backend == "auto" else backend
        if self.backend == "faiss":
            import faiss

            index = faiss.IndexFlatIP(queries.shape[1])
            index.add(np.ascontiguousarray(queries.numpy(), dtype=np.float32))
            if device.type == "cuda" and faiss.get_num_gpus() > 0:
                self._res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._res, device.index or 0, index)
                self.backend = "faiss-gpu"
            self._index = index
        else:
            self._q = queries.to(device).T.contiguous()  # (dim, Q)

    def __call__(self, feats: torch.Tensor) -> np.ndarray:
        if self.backend.startswith("faiss"):
            import faiss

            x = np.ascontiguousarray(feats.detach().float().cpu().numpy(), dtype=np.float32)
            faiss.normalize_L2(x)
            best, _ = self._index.search(x, 1)
            return best[:, 0]
        x = feats.detach().to(self.device, torch.float32)
        s = (x @ self._q).amax(1) / x.norm(dim=1).clamp_min(1e-12)
        return s.cpu().numpy()


def _score_level(
    fv: FeatureSource,
    ratio: int,
    cells: np.ndarray | None,
    scorer: _Scorer,
    tau: float,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Score ``cells`` (None: all) of the ratio-``ratio`` grid; keep those with score >= tau."""
    if cells is not None and len(cells) == 0:
        return np.zeros((0, 3), np.int64), np.zeros(0, np.float32), 0
    kept_c, kept_s, n = [], [], 0
    for chunk_cells, feats in fv.iter_grid(ratio, cells, chunk_size=chunk_size):
        s = scorer(feats)
        n += len(s)
        ok = s >= tau
        kept_c.append(np.asarray(chunk_cells, dtype=np.int64)[ok])
        kept_s.append(s[ok].astype(np.float32))
    if not kept_c:
        return np.zeros((0, 3), np.int64), np.zeros(0, np.float32), n
    return np.concatenate(kept_c), np.concatenate(kept_s), n


_NEIGHBOURS = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)


def _grow(
    fv: FeatureSource,
    ratio: int,
    cells: np.ndarray,
    kept: tuple[np.ndarray, np.ndarray],
    scorer: _Scorer,
    tau: float,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Extend the surviving cells to the whole connected regions >= tau they belong to.

    Repeatedly scores the not yet scored 26-neighbours of the newest survivors until no new
    cell survives: a particle whose region reaches past the children of its coarse cells is
    followed to its rim, at the cost of its region plus a one-cell rim (a fixed dilation pays
    a rim around every child instead). Every region >= tau that holds one scored child is
    then found whole, as the naive pass would find it.
    """
    shape = np.asarray(fv.grid_shape(ratio), dtype=np.int64)
    scored = np.zeros(int(np.prod(shape)), dtype=bool)
    scored[np.ravel_multi_index(cells.T, shape)] = True
    out_c, out_s = [kept[0]], [kept[1]]
    new, n = kept[0], 0
    while len(new):
        cand = (new[:, None, :] + _NEIGHBOURS[None]).reshape(-1, 3)
        cand = cand[np.all((cand >= 0) & (cand < shape), axis=1)]
        lin = np.unique(np.ravel_multi_index(cand.T, shape))
        lin = lin[~scored[lin]]
        if len(lin) == 0:
            break
        scored[lin] = True
        frontier = np.stack(np.unravel_index(lin, tuple(shape)), axis=1).astype(np.int64)
        new, s, m = _score_level(fv, ratio, frontier, scorer, tau, chunk_size)
        out_c.append(new)
        out_s.append(s)
        n += m
    return np.concatenate(out_c), np.concatenate(out_s), n


def children(
    fv: FeatureSource,
    coarse_ratio: int,
    coarse_cells: np.ndarray,
    fine_ratio: int,
    *,
    dilation: int = 0,
) -> np.ndarray:
    """Cells of the ``fine_ratio`` grid whose centres lie in one of ``coarse_cells``.

    ``dilation`` adds that many rings of neighbouring fine cells (3x3x3 steps), reaching just
    across the border of each surviving coarse cell. Returned in C order (z, then y, then x).
    """
    if len(coarse_cells) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    coarse = np.zeros(fv.grid_shape(coarse_ratio), dtype=bool)
    cc = np.asarray(coarse_cells, dtype=np.int64)
    coarse[cc[:, 0], cc[:, 1], cc[:, 2]] = True
    fine_shape = fv.grid_shape(fine_ratio)
    parents = []
    for axis, n in enumerate(fine_shape):
        idx = np.zeros((n, 3), dtype=np.int64)
        idx[:, axis] = np.arange(n)
        centre = np.asarray(fv.cell_centres(fine_ratio, idx), dtype=np.float64)[:, axis]
        parents.append(np.minimum(np.floor(centre / coarse_ratio).astype(np.int64),
                                  coarse.shape[axis] - 1))
    fine = coarse[np.ix_(*parents)]
    if dilation > 0:
        from scipy.ndimage import binary_dilation

        fine = binary_dilation(fine, structure=np.ones((3, 3, 3), bool), iterations=dilation)
    return np.argwhere(fine).astype(np.int64)


# ------------------------------------------------------------------------------------------ NMS


def nms(
    zyx: np.ndarray, scores: np.ndarray, radius: float, *, top_k: int | None = None
) -> np.ndarray:
    """Greedy 3-D non-maximum suppression; indices of the kept points, best first.

    A point is kept when no better kept point lies within ``radius`` (inclusive); ties go to the
    lower index. Stops after ``top_k`` keeps (None or <= 0: no cap), so the cost is one KD-tree
    build plus one ball query per kept point, whatever the number of candidates.
    """
    zyx = np.asarray(zyx, dtype=np.float64).reshape(-1, 3)
    scores = np.asarray(scores).reshape(-1)
    n = len(scores)
    limit = n if top_k is None or top_k <= 0 else min(int(top_k), n)
    order = np.lexsort((np.arange(n), -scores.astype(np.float64)))
    if n == 0 or radius <= 0:
        return order[:limit]
    from scipy.spatial import cKDTree

    tree = cKDTree(zyx)
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    pos = 0
    while pos < n and len(keep) < limit:
        pos = _next_free(order, suppressed, pos)
        if pos >= n:
            break
        i = int(order[pos])
        keep.append(i)
        suppressed[tree.query_ball_point(zyx[i], radius)] = True
        pos += 1
    return np.asarray(keep, dtype=np.int64)


def _next_free(order: np.ndarray, suppressed: np.ndarray, pos: int) -> int:
    """First position >= pos in ``order`` whose point is not suppressed (len(order) if none)."""
    window = 64
    n = len(order)
    while pos < n:
        free = np.flatnonzero(~suppressed[order[pos : pos + window]])
        if len(free):
            return pos + int(free[0])
        pos += window
        window = min(window * 4, 1 << 20)
    return n
