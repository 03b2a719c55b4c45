"""Query pooling, hierarchical matching, NMS and top-K on FeatureVolumes of known content."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cryosam.config import MatchingConfig
from cryosam.errors import CryosamError, InputError
from cryosam.features import FeatureVolume, turned
from cryosam.matching import (
    children,
    match,
    nms,
    nms_radius_from_masks,
    particle_radius_from_masks,
    pool_query,
)

C = 8  # channels per axis: features are 3 * C = 24 long
SHAPE = (48, 96, 96)
SIGMA = 4.0  # Gaussian width of a planted particle's features (voxels)
AMPLITUDE = 3.0  # planted vector's norm
BACKGROUND = 0.5  # norm of the background vector every voxel holds
TARGETS = np.array([[12, 20, 20], [12, 70, 30], [34, 24, 72], [36, 72, 74]], dtype=float)
OTHERS = np.array([[24, 48, 50], [12, 40, 76], [36, 30, 40]], dtype=float)


def _orthonormal(n: int, dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, n)))
    return q.T.astype(np.float32)


def planted_volume(centres: list[np.ndarray], vectors: list[np.ndarray], *,
                   shape: tuple[int, int, int] = SHAPE, noise: float = 0.02,
                   seed: int = 0) -> FeatureVolume:
    """Voxel-resolution stacks: background vector + noise + Gaussian blobs of given vectors.

    Every stack holds one cell per voxel, so the FeatureVolume's feature at a voxel is exactly
    the planted field there.
    """
    rng = np.random.default_rng(seed)
    dim = 3 * C
    basis = _orthonormal(1, dim, seed + 100)
    field = np.broadcast_to(BACKGROUND * basis[0], (*shape, dim)).copy()
    field += noise * rng.standard_normal(field.shape).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for points, vec in zip(centres, vectors, strict=True):
        for c in points:
            w = np.exp(-((grid - c) ** 2).sum(-1) / (2 * SIGMA**2)).astype(np.float32)
            field += w[..., None] * vec
    f = torch.from_numpy(field)
    stacks = {
        "z": f[..., :C].half(),
        "y": f[..., C : 2 * C].permute(1, 0, 2, 3).contiguous().half(),
        "x": f[..., 2 * C :].permute(2, 0, 1, 3).contiguous().half(),
    }
    return FeatureVolume(stacks, shape)


@pytest.fixture(scope="module")
def kinds() -> np.ndarray:
    """Two kinds' feature vectors, orthogonal to each other and to the background."""
    basis = _orthonormal(3, 3 * C, 100)  # row 0 is the background (same seed as above)
    return basis[1:] * AMPLITUDE


@pytest.fixture(scope="module")
def volume(kinds: np.ndarray) -> FeatureVolume:
    return planted_volume([TARGETS, OTHERS], [kinds[0], kinds[1]])


def ball(centre: np.ndarray, radius: float, shape=SHAPE) -> np.ndarray:
    """(n, 3) voxel coordinates of a ball inside the volume."""
    grid = np.argwhere(np.ones(shape, dtype=bool))
    return grid[((grid - centre) ** 2).sum(1) <= radius**2]


def cosine(fv: FeatureVolume, zyx: np.ndarray, queries: torch.Tensor) -> np.ndarray:
    f = torch.nn.functional.normalize(fv.sample(zyx), dim=1)
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    return (f @ q.T).amax(1).numpy()


def nearest(points: np.ndarray, zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``points``: distance to and index of the nearest of ``zyx``."""
    d = np.linalg.norm(points[:, None, :] - zyx[None, :, :], axis=-1)
    return d.min(1), d.argmin(1)


def min_separation() -> float:
    points = np.concatenate([TARGETS, OTHERS])
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return float(d[np.triu_indices(len(points), 1)].min())


def reach(query: torch.Tensor, kind: np.ndarray, tau: float = 0.5) -> float:
    """Distance from a particle's centre out to which the noise-free similarity is >= tau."""
    background = torch.from_numpy(BACKGROUND * _orthonormal(1, 3 * C, 100)[0])
    d = torch.linspace(0, 40, 4001)
    w = torch.exp(-(d**2) / (2 * SIGMA**2))
    f = background[None] + w[:, None] * torch.from_numpy(kind)[None]
    sims = torch.nn.functional.normalize(f, dim=1) @ query[0]
    return float(d[sims >= tau].max())


CONFIG = MatchingConfig(sim_threshold=0.5, top_k=512)
RADIUS = 15.0  # NMS radius: covers a particle's similarity blob (asserted below)
OFFSET = 2 * np.sqrt(3)  # farthest a ratio-4 cell centre lies from a particle's centre


# ------------------------------------------------------------------------------------ query


def test_pool_query_is_the_normalised_mask_mean(volume: FeatureVolume) -> None:
    mask = ball(TARGETS[0], 4)
    q = pool_query(volume, [mask])
    assert q.shape == (1, volume.dim)
    expected = volume.sample(mask.astype(np.float32)).mean(0)
    assert torch.allclose(q[0], expected / expected.norm(), atol=1e-5)
    assert torch.isclose(q.norm(), torch.tensor(1.0))


def test_pool_query_mean_weighs_every_masked_voxel(volume: FeatureVolume) -> None:
    """The paper's query (Eq. 4): one vector, the mean over all masked voxels of all clicks,
    so a click with a bigger mask weighs more (not the mean of per-click means)."""
    small, big = ball(TARGETS[0], 3), ball(OTHERS[0], 6)
    q = pool_query(volume, [small, big])
    assert q.shape == (1, volume.dim)
    both = np.concatenate([small, big]).astype(np.float32)
    expected = volume.sample(both).mean(0)
    assert torch.allclose(q[0], expected / expected.norm(), atol=1e-4)
    per_click = torch.stack([volume.sample(m.astype(np.float32)).mean(0) for m in (small, big)])
    unweighted = per_click.mean(0)
    assert not torch.allclose(q[0], unweighted / unweighted.norm(), atol=1e-3)
    with pytest.raises(InputError, match="query mode"):
        pool_query(volume, [small], mode="median")


def test_pool_query_several_prompts_and_subsampling(volume: FeatureVolume, kinds) -> None:
    masks = [ball(TARGETS[0], 4), ball(OTHERS[0], 6)]
    q = pool_query(volume, masks, max_voxels=100, seed=3, mode="max")
    assert q.shape == (3, volume.dim)
    assert torch.allclose(q.norm(dim=1), torch.ones(3), atol=1e-5)
    mean = q[:2].mean(0)
    assert torch.allclose(q[2], mean / mean.norm(), atol=1e-5)
    # deterministic for a seed, different subsample for another one, close to the full mean
    assert torch.equal(q, pool_query(volume, masks, max_voxels=100, seed=3, mode="max"))
    assert not torch.equal(q, pool_query(volume, masks, max_voxels=100, seed=4, mode="max"))
    full = pool_query(volume, masks, mode="max")
    assert float((q[:2] * full[:2]).sum(1).min()) > 0.99
    # each query points at its own kind
    k = torch.from_numpy(kinds / np.linalg.norm(kinds, axis=1, keepdims=True))
    sims = q[:2] @ k.T
    assert sims[0, 0] > 0.5 > sims[0, 1] and sims[1, 1] > 0.5 > sims[1, 0]


def test_pool_query_rejects_empty_and_malformed(volume: FeatureVolume) -> None:
    with pytest.raises(InputError, match="empty"):
        pool_query(volume, [np.zeros((0, 3), dtype=int)])
    with pytest.raises(InputError):
        pool_query(volume, [])
    with pytest.raises(InputError, match="shape"):
        pool_query(volume, [np.zeros((5, 2), dtype=int)])
    vol_mask = np.zeros(SHAPE, dtype=bool)
    vol_mask[10:14, 18:22, 18:22] = True
    assert torch.allclose(pool_query(volume, [vol_mask]),
                          pool_query(volume, [np.argwhere(vol_mask)]))


def test_radius_from_masks() -> None:
    mask = ball(np.array([24.0, 48, 48]), 6)
    assert particle_radius_from_masks([mask]) == pytest.approx(6, rel=0.05)
    assert nms_radius_from_masks([mask]) == pytest.approx(9, rel=0.05)
    assert nms_radius_from_masks([mask, ball(np.array([24.0, 48, 48]), 2),
                                  ball(np.array([24.0, 48, 48]), 6)]) == pytest.approx(9, rel=0.05)


# ---------------------------------------------------------------------------------- matching


def test_share_says_how_much_of_the_tomogram_looks_like_the_query(volume) -> None:
    """A particle's query matches a few cells; one pooled over empty space matches nearly
    all of them (the automatic cut then writes no match: :func:`cryosam.cut.background_cut`)."""
    particle = match(volume, pool_query(volume, [ball(TARGETS[0], 4)]), CONFIG,
                     nms_radius=RADIUS).stats
    empty = match(volume, pool_query(volume, [ball(np.array([24.0, 80, 12]), 4)]), CONFIG,
                  nms_radius=RADIUS).stats
    assert 0 < particle.share < 0.05
    assert empty.share > 0.9
    last = particle.levels[-1]
    assert last.cells_total == int(np.prod(volume.grid_shape(last.ratio)))
    assert particle.to_dict()["share"] == pytest.approx(particle.share, abs=1e-4)


def test_proposals_hit_every_target_once_and_nothing_below_threshold(volume, kinds) -> None:
    q = pool_query(volume, [ball(TARGETS[0], 4)])
    blob = reach(q, kinds[0])
    # one proposal per particle survives NMS, and NMS never joins two particles
    assert 5 < blob < RADIUS - OFFSET and RADIUS + 2 * OFFSET < min_separation()
    props = match(volume, q, CONFIG, nms_radius=RADIUS, device="cpu")
    # one proposal per planted target (NMS), none on the other kind or the background
    assert len(props) == len(TARGETS)
    dist, idx = nearest(TARGETS, props.zyx)
    assert np.all(dist <= 3.5)  # within half a ratio-4 cell diagonal of the centre
    assert sorted(idx) == list(range(len(TARGETS)))
    assert nearest(OTHERS, props.zyx)[0].min() > 20
    # scores are the true cosine similarities there, best first, all >= the threshold
    assert np.all(props.scores >= CONFIG.sim_threshold)
    assert np.all(np.diff(props.scores) <= 0)
    np.testing.assert_allclose(props.scores, cosine(volume, props.zyx, q), atol=1e-4)
    # and every scored cell at or above the threshold lies on a target
    naive = match(volume, q, dataclasses.replace(CONFIG, top_k=0), nms_radius=0.0)
    assert len(naive) == naive.stats.nms_candidates > len(TARGETS)
    assert nearest(naive.zyx, TARGETS)[0].max() <= blob + 1.0


def test_without_nms_every_cell_above_threshold_is_returned(volume) -> None:
    q = pool_query(volume, [ball(TARGETS[1], 4)])
    cfg = dataclasses.replace(CONFIG, naive=True, top_k=0)
    props = match(volume, q, cfg, nms_radius=0.0)
    cells = np.argwhere(np.ones(volume.grid_shape(4), dtype=bool))
    scores = cosine(volume, volume.cell_centres(4, cells), q)
    assert len(props) == int((scores >= 0.5).sum())
    np.testing.assert_allclose(np.sort(props.scores), np.sort(scores[scores >= 0.5]), atol=1e-4)


def test_top_k_caps_the_count(volume) -> None:
    q = pool_query(volume, [ball(TARGETS[0], 4)])
    full = match(volume, q, CONFIG, nms_radius=RADIUS)
    capped = match(volume, q, dataclasses.replace(CONFIG, top_k=2), nms_radius=RADIUS)
    assert len(capped) == 2
    np.testing.assert_array_equal(capped.zyx, full.zyx[:2])
    np.testing.assert_array_equal(capped.scores, full.scores[:2])


def test_several_queries_take_the_max(volume, kinds) -> None:
    qa = pool_query(volume, [ball(TARGETS[0], 4)])
    qb = pool_query(volume, [ball(OTHERS[0], 4)])
    assert max(reach(qa, kinds[0]), reach(qb, kinds[1])) < RADIUS - OFFSET
    a = match(volume, qa, CONFIG, nms_radius=RADIUS)
    b = match(volume, qb, CONFIG, nms_radius=RADIUS)
    both = match(volume, torch.cat([qa, qb]), CONFIG, nms_radius=RADIUS)
    assert len(a) == len(TARGETS) and len(b) == len(OTHERS)
    assert len(both) == len(TARGETS) + len(OTHERS)
    assert nearest(np.concatenate([TARGETS, OTHERS]), both.zyx)[0].max() <= 3.5
    expected = np.maximum(cosine(volume, both.zyx, qa), cosine(volume, both.zyx, qb))
    np.testing.assert_allclose(both.scores, expected, atol=1e-4)
    # the union of the single-query proposals, with the same scores
    single = {tuple(p): s for p, s in zip(np.concatenate([a.zyx, b.zyx]),
                                           np.concatenate([a.scores, b.scores]), strict=True)}
    assert {tuple(p): s for p, s in zip(both.zyx, both.scores, strict=True)} == pytest.approx(
        single, abs=1e-5)
    # pool_query with the two prompts (each query + their mean) finds both kinds too
    two = pool_query(volume, [ball(TARGETS[0], 4), ball(OTHERS[0], 4)], mode="max")
    assert len(match(volume, two, CONFIG, nms_radius=RADIUS)) == len(TARGETS) + len(OTHERS)


def test_turned_queries_find_the_particle_lying_another_way() -> None:
    """A particle turned by 90 degrees about z shows the clicked one's two side views (the y
    and x plane blocks) swapped: only the turned query finds it, as well as the clicked kind."""
    abc = _orthonormal(3, C, 7) * AMPLITUDE  # the z, y, x views: orthogonal to each other
    view = np.concatenate(abc)
    lying = np.concatenate(abc[[0, 2, 1]])
    fv = planted_volume([TARGETS, OTHERS], [view, lying])
    q = pool_query(fv, [ball(TARGETS[0], 4)])
    turns = turned(q)
    assert turns.shape == (2, 3 * C) and torch.equal(turns[:1], q)
    z, y, x = q.reshape(3, C)
    assert torch.equal(turns[1], torch.cat([z, x, y]))
    plain = match(fv, q, CONFIG, nms_radius=RADIUS)
    assert len(plain) == len(TARGETS)
    assert nearest(TARGETS, plain.zyx)[0].max() <= 3.5
    both = match(fv, turns, CONFIG, nms_radius=RADIUS)
    assert len(both) == len(TARGETS) + len(OTHERS) and both.stats.vectors_scored == 2
    assert nearest(np.concatenate([TARGETS, OTHERS]), both.zyx)[0].max() <= 3.5
    with pytest.raises(CryosamError, match="three equal plane blocks"):
        turned(torch.zeros(1, 3 * C + 1))


def test_the_query_and_its_negatives_are_turned_together() -> None:
    """What match_query scores: with turns, the positive and the negative vectors both gain
    their turned copies (a negative must meet a turned look-alike as the positive does)."""
    from cryosam.stages import Query

    rng = np.random.default_rng(0)
    vectors = torch.from_numpy(rng.standard_normal((1, 3 * C)).astype(np.float32))
    negatives = torch.from_numpy(rng.standard_normal((2, 3 * C)).astype(np.float32))
    query = Query(vectors, 5.0, 3.0, negatives)
    scored = query.matched(True)
    assert torch.equal(scored.vectors, turned(vectors))
    assert scored.negatives is not None and torch.equal(scored.negatives, turned(negatives))
    assert scored.nms_radius == query.nms_radius and query.matched(False) is query
    assert Query(vectors, 5.0, 3.0).matched(True).negatives is None


@pytest.mark.parametrize(("grow", "dilation"), [(True, 0), (False, 1), (False, 0)])
def test_hierarchical_agrees_with_naive(volume, grow: bool, dilation: int) -> None:
    q = pool_query(volume, [ball(TARGETS[2], 4), ball(OTHERS[1], 4)], mode="max")
    cfg = dataclasses.replace(CONFIG, grow=grow, dilation=dilation)
    hier = match(volume, q, cfg, nms_radius=RADIUS)
    naive = match(volume, q, dataclasses.replace(cfg, naive=True), nms_radius=RADIUS)
    assert [lv.ratio for lv in hier.stats.levels] == [16, 8, 4]
    assert [lv.ratio for lv in naive.stats.levels] == [4]
    assert naive.stats.levels[0].cells_scored == np.prod(volume.grid_shape(4))
    assert hier.stats.cells_scored < naive.stats.cells_scored / 2
    assert len(naive) == len(TARGETS) + len(OTHERS)
    np.testing.assert_array_equal(hier.zyx, naive.zyx)
    np.testing.assert_allclose(hier.scores, naive.scores, atol=1e-6)
    # the candidates before NMS: a subset of the naive ones (all of them when growing the
    # surviving regions or dilating the children of survivors)
    cfg = dataclasses.replace(cfg, top_k=0)
    hier = match(volume, q, cfg, nms_radius=0.0)
    naive = match(volume, q, dataclasses.replace(cfg, naive=True), nms_radius=0.0)
    assert set(map(tuple, hier.zyx)) <= set(map(tuple, naive.zyx))
    if grow or dilation:
        assert len(hier) == len(naive)


def test_faiss_backend_gives_the_same_proposals(volume) -> None:
    q = pool_query(volume, [ball(TARGETS[0], 4)])
    ref = match(volume, q, CONFIG, nms_radius=RADIUS)
    got = match(volume, q, dataclasses.replace(CONFIG, backend="faiss"), nms_radius=RADIUS)
    assert got.stats.backend.startswith("faiss")
    np.testing.assert_allclose(got.zyx, ref.zyx)
    np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)


def test_particle_radius_drops_coarser_levels(volume) -> None:
    q = pool_query(volume, [ball(TARGETS[0], 4)])
    props = match(volume, q, CONFIG, nms_radius=RADIUS, particle_radius=5.0)
    assert [lv.ratio for lv in props.stats.levels] == [8, 4]
    assert len(props) == len(TARGETS)
    kept = match(volume, q, dataclasses.replace(CONFIG, adapt_ratios=False), nms_radius=RADIUS,
                 particle_radius=5.0)
    assert [lv.ratio for lv in kept.stats.levels] == [16, 8, 4]


def test_bad_queries_and_ratios_are_input_errors(volume) -> None:
    with pytest.raises(InputError, match="channels"):
        match(volume, torch.ones(2, 5), CONFIG, nms_radius=RADIUS)
    q = pool_query(volume, [ball(TARGETS[0], 4)])
    for ratios in [(4, 8), (), (8, 0)]:
        with pytest.raises(InputError, match="ratios"):
            match(volume, q, dataclasses.replace(CONFIG, ratios=ratios), nms_radius=RADIUS)
    with pytest.raises(InputError, match="backend"):
        match(volume, q, dataclasses.replace(CONFIG, backend="annoy"), nms_radius=RADIUS)


# ----------------------------------------------------------------------- children, pooling


def test_children_of_survivors(volume) -> None:
    kids = children(volume, 16, np.array([[1, 2, 3]]), 8)
    expected = {(z, y, x) for z in (2, 3) for y in (4, 5) for x in (6, 7)}
    assert set(map(tuple, kids)) == expected
    dilated = set(map(tuple, children(volume, 16, np.array([[1, 2, 3]]), 8, dilation=1)))
    grid = volume.grid_shape(8)
    assert dilated == {(z, y, x) for z in range(1, min(5, grid[0])) for y in range(3, 7)
                       for x in range(5, 9)}
    # non-nested ratios: each fine cell belongs to the coarse cell holding its centre
    kids = children(volume, 12, np.array([[0, 0, 0]]), 5)
    centres = volume.cell_centres(5, kids)
    assert len(kids) == 2**3 and np.all(centres < 12)  # centres 2 and 7 (12 is the next's)
    assert len(children(volume, 16, np.zeros((0, 3), int), 8)) == 0


def test_pooled_volume_averages_each_cell(volume) -> None:
    pv = volume.pooled(8)
    assert pv.shape == volume.shape and pv.dim == volume.dim
    cell = np.array([[2, 3, 5]])
    centre = pv.cell_centres(8, cell)
    lo = cell[0] * 8
    block = np.argwhere(np.ones((8, 8, 8), bool)) + lo
    mean = volume.sample(block.astype(np.float32)).mean(0)
    got = pv.sample(centre)[0]
    # voxel-resolution stacks: an 8^3 average exactly (up to fp16 storage)
    assert torch.allclose(got, mean, atol=2e-2 * float(mean.abs().max()))


# --------------------------------------------------------------------------------------- NMS


def _greedy_reference(zyx: np.ndarray, scores: np.ndarray, radius: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(np.linalg.norm(zyx[i] - zyx[j]) > radius for j in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_brute_force_greedy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    zyx = rng.uniform(0, 40, (400, 3))
    scores = rng.integers(0, 50, 400).astype(np.float32)  # many ties: lower index wins
    for radius in (0.0, 3.0, 7.5):
        ref = _greedy_reference(zyx, scores, radius)
        assert nms(zyx, scores, radius).tolist() == ref
        assert nms(zyx, scores, radius, top_k=5).tolist() == ref[:5]
    assert len(nms(np.zeros((0, 3)), np.zeros(0), 5.0)) == 0


def test_nms_scales_to_many_candidates() -> None:
    rng = np.random.default_rng(0)
    zyx = rng.uniform(0, 1000, (200_000, 3))
    scores = rng.random(200_000)
    keep = nms(zyx, scores, 10.0, top_k=512)
    assert len(keep) == 512
    kept = zyx[keep]
    d = np.linalg.norm(kept[:, None] - kept[None], axis=-1)
    assert d[np.triu_indices(len(kept), 1)].min() > 10.0


# --------------------------------------------------------------------------- CLI benchmark


def test_bench_matching_cli(run_cli) -> None:
    code, out, err = run_cli("bench", "matching", "--shape", "24,64,64", "--dim", "24",
                             "--patches", "16", "--targets", "3", "--distractors", "2",
                             "--radius", "5", "--device", "cpu")
    assert code == 0, err
    assert "hierarchical:" in out and "naive:" in out
    assert "recall of the" in out and "speed-up" in out
    assert "2 query vector(s)" in out  # the query and its turned copy, as segment scores
    code, out, err = run_cli("bench", "matching", "--shape", "24,64,64", "--dim", "24",
                             "--patches", "16", "--targets", "3", "--distractors", "2",
                             "--radius", "5", "--device", "cpu", "--no-turns", "--repeats", "1")
    assert code == 0, err
    assert "1 query vector(s)" in out


def test_bench_matching_rejects_bad_shape(run_cli) -> None:
    code, _, err = run_cli("bench", "matching", "--shape", "24,64")
    assert code == 2 and "--shape" in err


# --------------------------------------------------------- filter bank on a simulated tomogram


def test_filterbank_query_from_one_target_finds_most_targets() -> None:
    simulate_mod = pytest.importorskip("cryosam.simulate")
    filterbank = pytest.importorskip("cryosam.encoders.filterbank")
    from cryosam.features import extract_features

    sim = simulate_mod.simulate(simulate_mod.SimulationConfig(shape=(40, 96, 96), seed=1))
    fv = extract_features(sim.volume, filterbank.FilterBankEncoder())
    mask = np.argwhere(sim.labels == sim.prompt_ids[0])
    props = match(fv, pool_query(fv, [mask]), MatchingConfig(),
                  nms_radius=nms_radius_from_masks([mask]),
                  particle_radius=particle_radius_from_masks([mask]), device="cpu")
    targets = [p for p in sim.particles if p.kind == sim.target_kind]
    assert len(targets) >= 5 and 0 < len(props) <= MatchingConfig().top_k
    dist, _ = nearest(np.array([p.zyx for p in targets]), props.zyx)
    found = np.mean(dist <= np.array([p.radius for p in targets]))
    assert found >= 0.9, f"only {found:.0%} of the targets have a proposal within their radius"

