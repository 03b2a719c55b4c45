"""The weight-free filter bank under plain cosine similarity, as the matcher uses it.

Run as a script to print the figures for several seeds (and the extraction time)::

    .venv/bin/python tests/test_filterbank.py 0 1 2 3
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from cryosam.config import EncoderConfig
from cryosam.encoders import build_encoder
from cryosam.encoders.filterbank import DEFAULT_SIGMAS, RESPONSES, FilterBankEncoder
from cryosam.features import extract_features
from cryosam.matching import pool_query
from cryosam.simulate import SimulationConfig, simulate

TAU_SIM = 0.5  # the paper's similarity threshold, kept for every encoder


pytestmark = pytest.mark.usefixtures("one_thread")


def cosines(fv, points: np.ndarray, query: torch.Tensor) -> np.ndarray:
    """Cosine similarity of the features at ``points`` (N, 3) with a normalised query."""
    feats = torch.nn.functional.normalize(fv.sample(np.asarray(points, np.float32)).float(), dim=1)
    return (feats @ query).numpy()


def similarity_figures(sim, fv, prompt_id: int, *, n_background: int = 20_000,
                       seed: int = 0) -> dict[str, float]:
    """What tau_sim keeps for a query pooled over particle ``prompt_id``'s mask: the targets'
    median similarity at their centres and the fractions >= tau_sim of targets, blobs,
    filaments and background voxels at least 2 voxels from any particle."""
    query = pool_query(fv, [np.argwhere(sim.labels == prompt_id)])[0]
    out: dict[str, float] = {}
    for kind in (sim.target_kind, "blob", "filament"):
        pts = [p.zyx for p in sim.particles if p.kind == kind and p.id != prompt_id]
        c = cosines(fv, np.array(pts), query)
        out[f"{kind}_kept"] = float(np.mean(c >= TAU_SIM))
        out[f"{kind}_median"] = float(np.median(c))
    free = ndimage.distance_transform_edt(sim.labels == 0) >= 2
    rng = np.random.default_rng(seed)
    bg = np.argwhere(free)
    bg = bg[rng.choice(len(bg), min(n_background, len(bg)), replace=False)]
    c = cosines(fv, bg, query)
    out["background_kept"] = float(np.mean(c >= TAU_SIM))
    near_membrane = np.argwhere(free & sim.membrane)
    if len(near_membrane):
        c = cosines(fv, near_membrane, query)
        out["membrane_kept"] = float(np.mean(c >= TAU_SIM))
    return out


def meets_targets(fig: dict[str, float], target_kind: str = "ribosome") -> bool:
    """The acceptance figures of the weight-free baseline."""
    return (fig[f"{target_kind}_median"] >= 0.7 and fig[f"{target_kind}_kept"] >= 0.9
            and fig["blob_kept"] <= 0.1 and fig["filament_kept"] <= 0.1
            and fig["background_kept"] <= 0.01)


def two_queries(sim) -> list[int]:
    """The one-click prompt and another target (the first one listed)."""
    first = sim.prompt_ids[0]
    other = next(p.id for p in sim.particles if p.kind == sim.target_kind and p.id != first)
    return [first, other]


def test_default_config_uses_the_encoders_default_scales() -> None:
    enc = build_encoder(EncoderConfig(name="filterbank"), "cpu")
    assert enc.sigmas == tuple(sorted(DEFAULT_SIGMAS))
    assert enc.channels == len(RESPONSES) * len(DEFAULT_SIGMAS)
    assert enc.id.startswith("filterbank:v3:")


@pytest.mark.parametrize("seed", [1])
def test_one_click_query_keeps_targets_and_rejects_the_rest(seed: int) -> None:
    sim = simulate(SimulationConfig(seed=seed))
    fv = extract_features(sim.volume, FilterBankEncoder())
    for prompt_id in two_queries(sim):
        fig = similarity_figures(sim, fv, prompt_id, n_background=5000, seed=seed)
        assert meets_targets(fig, sim.target_kind), (prompt_id, fig)


def _disk(img: np.ndarray, cy: float, cx: float, r: float, depth: float = 1.0) -> None:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] -= depth


def _image(scale: int = 1, seed: int = 0) -> np.ndarray:
    """A bright slice with a big and a small dark disk and a dark line, ``scale`` x larger."""
    img = np.full((96 * scale, 96 * scale), 0.7, np.float32)
    _disk(img, 30 * scale, 30 * scale, 7 * scale, 0.5)
    _disk(img, 30 * scale, 70 * scale, 3 * scale, 0.5)
    img[70 * scale:72 * scale, 15 * scale:80 * scale] -= 0.5
    img = ndimage.gaussian_filter(img, 1.0 * scale)
    rng = np.random.default_rng(seed)
    return (img + rng.normal(0, 0.02, img.shape)).astype(np.float32)[None]


def _code_at(maps: torch.Tensor, enc: FilterBankEncoder, y: float, x: float):
    """(response, sigma) of the largest channel at voxel (y, x) of a single-slice map."""
    cell = maps[0, int(y / enc.patch_size), int(x / enc.patch_size)].float()
    k = int(cell.argmax())
    return RESPONSES[k % len(RESPONSES)], enc.sigmas[k // len(RESPONSES)]


def test_codes_follow_size_and_shape_and_scale_with_sigmas() -> None:
    enc = FilterBankEncoder()
    maps = enc.encode(_image())
    big, small = _code_at(maps, enc, 30, 30), _code_at(maps, enc, 30, 70)
    line = _code_at(maps, enc, 71, 48)
    assert big[0] == small[0] == "dark_blob" and line[0] == "dark_line"
    assert 3.0 <= big[1] <= 8.0 and small[1] <= 2.9 and big[1] >= 2 * small[1], (big, small)
    # the same scene twice as large, with scales twice as large: the same codes
    enc2 = FilterBankEncoder(patch_size=4, sigmas=[2 * s for s in enc.sigmas])
    maps2 = enc2.encode(_image(scale=2))
    assert _code_at(maps2, enc2, 60, 60) == (big[0], 2 * big[1])
    assert _code_at(maps2, enc2, 60, 140) == (small[0], 2 * small[1])
    a = torch.nn.functional.normalize(maps[0, 8:40, 8:40].float().reshape(-1, enc.channels), dim=1)
    b = torch.nn.functional.normalize(maps2[0, 8:40, 8:40].float().reshape(-1, enc.channels), dim=1)
    assert float((a * b).sum(1).median()) > 0.9


def test_codes_ignore_brightness_and_contrast() -> None:
    enc = FilterBankEncoder(sigmas=(1.0, 2.0, 4.0))
    img = _image()
    a = enc.encode(img).float()
    b = enc.encode(0.3 * img + 0.2).float()
    torch.testing.assert_close(a, b, atol=0.02, rtol=0.02)


def main(seeds: list[int]) -> int:
    torch.set_num_threads(2)
    enc = FilterBankEncoder()
    print(enc.id)
    ok = True
    for seed in seeds:
        sim = simulate(SimulationConfig(seed=seed))
        t0 = time.perf_counter()
        fv = extract_features(sim.volume, enc)
        seconds = time.perf_counter() - t0
        for name, pid in zip(("prompt", "other"), two_queries(sim), strict=True):
            fig = similarity_figures(sim, fv, pid, seed=seed)
            good = meets_targets(fig, sim.target_kind)
            ok &= good
            t = sim.target_kind
            print(f"seed {seed} {name:6s} (id {pid:2d}): extract {seconds:4.1f} s | targets median "
                  f"{fig[t + '_median']:.2f}, >= {TAU_SIM} {fig[t + '_kept']:.0%} | blobs "
                  f"{fig['blob_kept']:.0%} filaments {fig['filament_kept']:.0%} | background "
                  f"{fig['background_kept']:.2%} (membranes {fig.get('membrane_kept', 0):.1%})"
                  f" {'ok' if good else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [0, 1, 2, 3]))


def test_sparse_codes_are_the_dense_codes_whatever_the_threads() -> None:
    """``encode_sparse`` (what the extraction stores) holds ``encode``'s maps exactly, and
    neither depends on how the slices are split into chunks or over threads."""
    import cryosam.encoders.filterbank as fb

    enc = FilterBankEncoder()
    batch = np.concatenate([_image(seed=s) for s in range(5)])
    dense = enc.encode(batch)
    results = []
    for threads, chunk_bytes in ((1, fb.CHUNK_BYTES), (2, 1), (2, 1 << 40)):
        before, saved = torch.get_num_threads(), fb.CHUNK_BYTES
        torch.set_num_threads(threads)
        fb.CHUNK_BYTES = chunk_bytes
        try:
            results.append(enc.encode_sparse(batch))
        finally:
            torch.set_num_threads(before)
            fb.CHUNK_BYTES = saved
    for background, coded, rows in results:
        assert coded.shape == dense.shape[:3] and rows.dtype == torch.float16
        rebuilt = background[:, None, None, :].expand_as(dense).clone()
        rebuilt[coded] = rows
        assert torch.equal(rebuilt, dense)
        assert 0 < coded.float().mean() < 0.5  # most cells share their slice's vector
