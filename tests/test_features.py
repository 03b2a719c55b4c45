"""FeatureVolume sampling, coarse grids, memory, persistence, extraction and the cache."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cryosam.backends import FilterBankOptions
from cryosam.config import EncoderConfig
from cryosam.encoders.filterbank import FilterBankEncoder
from cryosam.errors import CryosamError, InputError
from cryosam.features import (
    PLANE_DIMS,
    SLICE_DIM,
    FeatureVolume,
    SparseStack,
    cache_path,
    estimate_nbytes,
    extract_features,
    slice_positions,
)
from cryosam.normalise import normalise_volume
from cryosam.utils import AXES

SHAPE = (11, 17, 23)


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth(zyx: np.ndarray) -> np.ndarray:
    """A smooth function of voxel coordinates, 4 channels: linear in z, y, x, and a wave."""
    z, y, x = zyx[..., 0], zyx[..., 1], zyx[..., 2]
    return np.stack([0.5 * z, 0.5 * y - 2, 0.25 * x + 1, np.sin(z / 4 + y / 7 - x / 9)], -1)


def centres(extent: int, cells: int) -> np.ndarray:
    return (np.arange(cells) + 0.5) * extent / cells - 0.5


def known_volume(grids: dict[str, tuple[int, int]], positions: dict[str, np.ndarray] | None = None
                 ) -> FeatureVolume:
    """Stacks holding ``smooth`` at each map cell's centre (slice position, cell centres)."""
    stacks = {}
    for a in AXES:
        s, (p, q) = SLICE_DIM[a], PLANE_DIMS[a]
        pos = positions[a] if positions else np.arange(SHAPE[s], dtype=float)
        cp, cq = centres(SHAPE[p], grids[a][0]), centres(SHAPE[q], grids[a][1])
        pts = np.zeros((len(pos), len(cp), len(cq), 3))
        pts[..., s] = pos[:, None, None]
        pts[..., p] = cp[None, :, None]
        pts[..., q] = cq[None, None, :]
        stacks[a] = torch.from_numpy(smooth(pts)).to(torch.float16)
    return FeatureVolume(stacks, SHAPE, positions)


def expected(fv: FeatureVolume, zyx: np.ndarray, grids: dict[str, tuple[int, int]]) -> np.ndarray:
    """``smooth`` at each stack's clamped coordinates, concatenated z | y | x."""
    parts = []
    for a in AXES:
        s, (p, q) = SLICE_DIM[a], PLANE_DIMS[a]
        c = zyx.copy()
        pos = fv.positions[a]
        c[:, s] = np.clip(c[:, s], pos[0], pos[-1])
        for d, n in ((p, grids[a][0]), (q, grids[a][1])):
            cc = centres(SHAPE[d], n)
            c[:, d] = np.clip(c[:, d], cc[0], cc[-1])
        parts.append(smooth(c))
    return np.concatenate(parts, axis=1)


GRIDS = {"z": (6, 8), "y": (4, 8), "x": (4, 6)}


def test_sampling_returns_the_function_on_all_axes_and_borders() -> None:
    fv = known_volume(GRIDS)
    assert fv.dim == 12 and fv.channels == 4
    rng = np.random.default_rng(0)
    inside = rng.uniform(0, np.array(SHAPE) - 1, size=(300, 3))
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in SHAPE], indexing="ij")).reshape(3, -1).T
    faces = np.repeat(inside[:60], 1, axis=0)
    faces[np.arange(60), np.arange(60) % 3] = np.where(np.arange(60) % 2, 0,
                                                       np.array(SHAPE)[np.arange(60) % 3] - 1)
    outside = corners + np.array([-0.7, 0.4, 0.9])  # beyond the borders: clamped
    pts = np.concatenate([inside, corners, faces, outside.astype(float)])
    got = fv.sample(pts).numpy()
    assert got.shape == (len(pts), 12) and got.dtype == np.float32
    want = expected(fv, pts, GRIDS)
    linear = [c for a in range(3) for c in (4 * a, 4 * a + 1, 4 * a + 2)]
    np.testing.assert_allclose(got[:, linear], want[:, linear], atol=0.03)  # exact up to fp16
    wave = [3, 7, 11]  # smooth but not linear: within interpolation error
    np.testing.assert_allclose(got[:, wave], want[:, wave], atol=0.08)
    # plain values at the voxel that holds a cell centre exactly
    assert fv.sample(np.array([[0.0, 0.0, 0.0]])).shape == (1, 12)


def test_strided_slices_interpolate_linearly_across() -> None:
    positions = {a: slice_positions(SHAPE[SLICE_DIM[a]], 4) for a in AXES}
    assert positions["z"].tolist() == [0, 4, 8, 10]
    fv = known_volume(GRIDS, positions)
    pts = np.random.default_rng(1).uniform(-1, np.array(SHAPE), size=(200, 3))
    got = fv.sample(pts).numpy()
    want = expected(fv, pts, GRIDS)
    linear = [c for a in range(3) for c in (4 * a, 4 * a + 1, 4 * a + 2)]
    np.testing.assert_allclose(got[:, linear], want[:, linear], atol=0.03)


@pytest.mark.parametrize("ratio", [1, 4, 6])
def test_coarse_grid_chunks_agree_with_point_sampling(ratio: int) -> None:
    fv = known_volume(GRIDS)
    grid = fv.grid_shape(ratio)
    assert grid == tuple(-(-s // ratio) for s in SHAPE)
    chunks = list(fv.iter_grid(ratio, chunk_size=37))
    cells = np.concatenate([c for c, _ in chunks])
    feats = torch.cat([f for _, f in chunks])
    assert len(cells) == np.prod(grid) and cells.dtype == np.int64
    assert len(chunks) == -(-len(cells) // 37)
    np.testing.assert_array_equal(cells, np.argwhere(np.ones(grid, bool)))
    ctr = fv.cell_centres(ratio, cells)
    assert ctr.max(0).tolist() == [min(s - 1, (g - 1) * ratio + (ratio - 1) / 2)
                                   for s, g in zip(SHAPE, grid, strict=True)]
    torch.testing.assert_close(feats, fv.sample(ctr))
    subset = cells[::5][::-1].copy()
    sub = list(fv.iter_grid(ratio, subset, chunk_size=4))
    np.testing.assert_array_equal(np.concatenate([c for c, _ in sub]), subset)
    torch.testing.assert_close(torch.cat([f for _, f in sub]), fv.sample(fv.cell_centres(
        ratio, subset)))


def test_feature_volume_validates_and_roundtrips(tmp_path) -> None:
    fv = known_volume(GRIDS, {a: slice_positions(SHAPE[SLICE_DIM[a]], 3) for a in AXES})
    fv.meta["encoder"] = "test"
    fv.save(tmp_path / "f.pt")
    back = FeatureVolume.load(tmp_path / "f.pt")
    assert back.shape == SHAPE and back.meta == {"encoder": "test"}
    assert back.nbytes == fv.nbytes == sum(2 * s.numel() for s in fv.stacks.values())
    pts = np.array([[3.3, 7.7, 11.1], [0, 0, 22]])
    torch.testing.assert_close(back.sample(pts), fv.sample(pts))
    assert not list(tmp_path.glob("*.part*"))
    (tmp_path / "bad.pt").write_bytes(b"not a feature file")
    with pytest.raises(CryosamError, match="bad.pt"):
        FeatureVolume.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        FeatureVolume({"z": fv.stacks["z"][:3], "y": fv.stacks["y"], "x": fv.stacks["x"]},
                      SHAPE)


def test_normalise_volume_is_robust() -> None:
    vol = np.random.default_rng(2).normal(size=(8, 30, 30)).astype(np.float32)
    vol[0, 0, 0] = 1e6  # a hot pixel must not squash the rest
    out = normalise_volume(vol, (1, 99))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < float(np.median(out)) < 0.6 and out.std() > 0.15
    with pytest.raises(InputError):
        normalise_volume(vol[0])
    with pytest.raises(InputError):
        normalise_volume(vol, (60, 40))


@pytest.fixture()
def tomogram() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.normal(size=(12, 26, 20)).astype(np.float32)


def test_extraction_matches_estimate_and_strided_slices(tomogram: np.ndarray) -> None:
    enc = DenseEncoder(FilterBankEncoder(patch_size=2, sigmas=(1.0, 2.0)))
    full = extract_features(tomogram, enc, batch_size=5)
    assert full.nbytes == estimate_nbytes(tomogram.shape, enc)
    options = FilterBankOptions(patch=2, sigmas=(1.0, 2.0))
    cfg = EncoderConfig(name="filterbank", backends={"filterbank": options})
    assert estimate_nbytes(tomogram.shape, cfg) == full.nbytes
    assert tuple(full.stacks["x"].shape) == (20, 6, 13, 10)
    strided = extract_features(tomogram, enc, stride=3)
    assert strided.positions["y"].tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert strided.nbytes == estimate_nbytes(tomogram.shape, enc, stride=3)
    assert strided.nbytes < full.nbytes
    # the filter bank's own (sparse) stacks: within the estimate, and the same features
    sparse = extract_features(tomogram, enc.inner, batch_size=5)
    assert isinstance(sparse.stacks["z"], SparseStack)
    assert sparse.nbytes <= estimate_nbytes(tomogram.shape, enc)
    # at an encoded slice the strided features are the full ones; between, their average
    at = np.array([[6.0, 9.0, 3.0]])
    torch.testing.assert_close(strided.sample(at), full.sample(at))
    mid = strided.sample(np.array([[7.5, 10.5, 4.5]]))[:, :10]
    avg = 0.5 * (full.sample(np.array([[6.0, 10.5, 4.5]])) + full.sample(
        np.array([[9.0, 10.5, 4.5]])))[:, :10]
    torch.testing.assert_close(mid, avg, atol=2e-3, rtol=1e-3)


class DenseEncoder:
    """An encoder with ``encode`` only: the extraction stores its maps dense."""

    def __init__(self, inner: FilterBankEncoder) -> None:
        self.inner = inner
        self.id, self.patch_size, self.channels = inner.id, inner.patch_size, inner.channels
        self.grid_shape = inner.grid_shape

    def encode(self, slices: np.ndarray) -> torch.Tensor:
        return self.inner.encode(slices)


@pytest.mark.parametrize("reduce_to", [None, 6])
def test_sparse_stacks_hold_the_dense_features(tmp_path, tomogram: np.ndarray,
                                               reduce_to: int | None) -> None:
    """The filter bank's sparse stacks read back bit for bit as the dense ones: sampling,
    cell-averaged copies, the cache file; and in a fraction of the memory."""
    enc = FilterBankEncoder(patch_size=2, sigmas=(1.0, 2.0, 4.0))
    sparse = extract_features(tomogram, enc, batch_size=5, reduce_to=reduce_to)
    dense = extract_features(tomogram, DenseEncoder(enc), batch_size=5, reduce_to=reduce_to)
    for a in AXES:
        stack = sparse.stacks[a]
        assert isinstance(stack, SparseStack) and stack.shape == dense.stacks[a].shape
        assert torch.equal(stack.dense(0, stack.shape[0]), dense.stacks[a])
        assert torch.equal(stack.dense(2, 5), dense.stacks[a][2:5])
    assert sparse.nbytes < dense.nbytes
    pts = np.random.default_rng(5).uniform(0, np.array(tomogram.shape) - 1, size=(500, 3))
    assert torch.equal(sparse.sample(pts), dense.sample(pts))
    for ratio in (2, 4):
        for a in AXES:
            assert torch.equal(sparse.pooled(ratio).stacks[a], dense.pooled(ratio).stacks[a])
    sparse.save(tmp_path / "f.pt")
    back = FeatureVolume.load(tmp_path / "f.pt")
    assert isinstance(back.stacks["y"], SparseStack) and back.nbytes == sparse.nbytes
    assert torch.equal(back.sample(pts), dense.sample(pts))


def test_pca_reduction_keeps_cosines(tomogram: np.ndarray) -> None:
    enc = FilterBankEncoder(patch_size=2, sigmas=(1.0, 2.0, 4.0))
    full = extract_features(tomogram, enc)
    reduced = extract_features(tomogram, enc, reduce_to=8)
    assert reduced.channels == 8 and reduced.dim == 24
    assert reduced.nbytes <= estimate_nbytes(tomogram.shape, enc, reduce_to=8)  # sparse
    projection = torch.tensor(reduced.meta["projection"])
    torch.testing.assert_close(projection.T @ projection, torch.eye(8), atol=1e-4, rtol=0)
    pts = np.random.default_rng(4).uniform(0, np.array(tomogram.shape) - 1, size=(300, 3))

    def cosines(f: torch.Tensor) -> np.ndarray:
        f = torch.nn.functional.normalize(f, dim=1)
        return (f @ f.T).numpy().ravel()

    corr = np.corrcoef(cosines(full.sample(pts)), cosines(reduced.sample(pts)))[0, 1]
    assert corr > 0.9, corr


class CountingEncoder:
    """Delegates to a real encoder and counts the slices it encodes."""

    def __init__(self, inner: FilterBankEncoder) -> None:
        self.inner = inner
        self.id, self.patch_size, self.channels = inner.id, inner.patch_size, inner.channels
        self.grid_shape = inner.grid_shape
        self.slices = 0

    def encode(self, slices: np.ndarray) -> torch.Tensor:
        self.slices += len(slices)
        return self.inner.encode(slices)


def test_cache_hits_and_misses(tmp_path, tomogram: np.ndarray) -> None:
    enc = CountingEncoder(FilterBankEncoder(patch_size=2, sigmas=(1.0, 2.0)))
    t0 = time.perf_counter()
    first = extract_features(tomogram, enc, cache_dir=tmp_path)
    t_miss = time.perf_counter() - t0
    encoded = enc.slices
    assert encoded == sum(tomogram.shape)
    files = list(tmp_path.glob("features-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*part*"))
    t0 = time.perf_counter()
    second = extract_features(tomogram, enc, cache_dir=tmp_path)
    t_hit = time.perf_counter() - t0
    assert enc.slices == encoded  # nothing encoded: loaded from the cache
    assert second.from_cache and not first.from_cache
    print(f"feature cache: miss {t_miss * 1e3:.0f} ms, hit {t_hit * 1e3:.0f} ms")
    for a in AXES:
        torch.testing.assert_close(second.stacks[a], first.stacks[a])
    assert second.meta == first.meta
    changed = tomogram.copy()
    changed[5, 5, 5] += 1.0
    variants = [
        dict(volume=changed),
        dict(stride=2),
        dict(clip_percentiles=(1.0, 99.0)),
        dict(reduce_to=4),
    ]
    for i, change in enumerate(variants):
        before = enc.slices
        vol = change.pop("volume", tomogram)
        extract_features(vol, enc, cache_dir=tmp_path, **change)
        assert enc.slices > before, change
        assert len(list(tmp_path.glob("features-*.pt"))) == i + 2
    other = CountingEncoder(FilterBankEncoder(patch_size=2, sigmas=(1.0, 3.0)))
    extract_features(tomogram, other, cache_dir=tmp_path)
    assert other.slices == sum(tomogram.shape)
    # a corrupt cache file is recomputed, not trusted
    key_file = files[0]
    key_file.write_bytes(b"garbage")
    before = enc.slices
    again = extract_features(tomogram, enc, cache_dir=tmp_path)
    assert enc.slices > before and cache_path(tmp_path, again.meta["cache_key"]) == key_file
    torch.testing.assert_close(again.stacks["z"], first.stacks["z"])


def test_bench_features_command(run_cli) -> None:
    code, out, err = run_cli("bench", "features", "--arch", "vits14", "--shape", "8,24,16",
                             "--device", "cpu", "--slices", "1", "--batch-size", "1",
                             "--patches", "3", "--no-memory")
    assert code == 0, err
    assert out.count("slices/s") == 3 and "z: slices 24x16 -> 3x2 patches" in out
    code, _, err = run_cli("bench", "features", "--shape", "8,24", "--no-memory")
    assert code == 2 and "--shape" in err
