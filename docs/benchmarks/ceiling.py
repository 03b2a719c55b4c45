"""How well does matching one clicked copy rank the crowded preset's particles, given help?

For every kind and seed, one copy is clicked (the copy ``cryosam bench accuracy`` clicks) and
every other particle of the scene is ranked by its best normalised cross-correlation with
that copy over ``--rotations`` random 3-D rotations and shifts of up to one voxel, on a ball
that holds the whole copy (its farthest voxel plus one, times ``--mask``):

- ``true object``: the clicked copy's own density before imaging, rotated (and tried at
  0.92, 1 and 1.08 times its size, the preset's spread), then passed through the preset's
  CTF-like transfer and missing wedge: a matched filter with nothing about the copy unknown;
- ``clicked crop``: the clicked copy as the tomogram shows it (noise, wedge, neighbours),
  rotated: what one click can know.

Both are given what no picker has: every particle's true centre, and nothing else to rank
(no background, no membrane). Best F1 over cuts of the ranking (the click counted as found,
like ``cryosam bench accuracy``) is a reference for what matching one copy reaches, not a
bound: the noise is not whitened, a single copy stands for a kind whose copies vary, and 12
copies per kind make F1 move in steps of about 0.05.

    python docs/benchmarks/ceiling.py --seeds 0,1,2 --snr 0.5
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import scipy.fft as sfft
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from cryosam.metrics import mean_per_kind, ranked_metrics
from cryosam.simulate import SimulationConfig, simulate
from cryosam.simulate.crowded import CROWDED_KINDS, ctf_transfer, kind_clicks
from cryosam.simulate.scene import crowded_scene

VARIANTS = ("true object", "clicked crop")
SCALES = (0.92, 1.0, 1.08)  # the true object is also tried this much smaller and larger


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm rows: their dot products are normalised cross-correlations."""
    a = a - a.mean(-1, keepdims=True)
    return a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-9)


def _grid(half: float, ball: bool = True) -> np.ndarray:
    """(N, 3) integer offsets (z, y, x order) within a ball of radius ``half``, or the whole
    cube of side ``2 ceil(half) + 1`` with ``ball`` False."""
    h = int(np.ceil(half))
    g = np.arange(-h, h + 1)
    off = np.array(np.meshgrid(g, g, g, indexing="ij")).reshape(3, -1).T.astype(np.float64)
    return off[np.linalg.norm(off, axis=1) <= half] if ball else off


def scene_ceiling(seed: int, snr: float, shape: tuple[int, int, int], rotations: np.ndarray,
                  mask_factor: float = 0.8) -> dict[str, dict[str, float]]:
    """Per variant, per kind: the best F1 of ranking every other particle of one scene."""
    cfg = SimulationConfig(shape=shape, seed=seed, snr=snr, preset="crowded")
    sim = simulate(cfg)
    counts = {k: sum(p.kind == k for p in sim.particles) for k in CROWDED_KINDS}
    _, (density, labels, *_) = crowded_scene(cfg)  # the same scene, before imaging
    pos = np.array([p.zyx for p in sim.particles])
    kinds = np.array([p.kind for p in sim.particles])
    shifts = _grid(1.8)  # the 27 shifts of up to one voxel per axis
    out: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    for kind in CROWDED_KINDS:
        if counts[kind] < 2:
            continue
        ci = int(np.argmin(np.linalg.norm(pos - kind_clicks(sim, kind, 1)[0], axis=1)))
        clicked = sim.particles[ci]
        own = np.argwhere(labels == clicked.id) - pos[ci]
        extent = float(np.linalg.norm(own, axis=1).max()) + 1.0  # the copy's farthest voxel
        mask = _grid(mask_factor * extent)
        others = np.array([i for i in range(len(pos)) if i != ci])
        crops = np.stack([ndi.map_coordinates(sim.volume, (pos[i] + s + mask).T, order=1,
                                              mode="nearest") for i in others for s in shifts])
        crops = _unit_rows(crops).reshape(len(others), len(shifts), -1)
        obj = np.where(labels == clicked.id, -density, 0.0).astype(np.float32)
        templates = {"true object": np.concatenate([_imaged_templates(
                         obj, pos[ci], rotations, mask, cfg, scale) for scale in SCALES]),
                     "clicked crop": _unit_rows(np.stack([ndi.map_coordinates(
                         sim.volume, (pos[ci] + mask @ r.T).T, order=1, mode="nearest")
                         for r in rotations]))}
        ranked = pos[np.r_[ci, others]]  # the click first: found, as bench accuracy counts it
        for variant, t in templates.items():
            ncc = np.einsum("rm,nsm->nrs", t, crops).reshape(len(others), -1).max(1)
            out[variant][kind] = ranked_metrics(ranked, np.r_[2.0, ncc], pos[kinds == kind],
                                                radius=0.5).best_f1
    return out


def _imaged_templates(obj: np.ndarray, centre: np.ndarray, rotations: np.ndarray,
                      mask: np.ndarray, cfg: SimulationConfig, scale: float = 1.0) -> np.ndarray:
    """The object around ``centre`` rotated by each rotation and grown by ``scale``, imaged
    like the tomogram (CTF and missing wedge applied in a box), sampled on ``mask``; unit
    rows."""
    half = int(np.ceil(np.abs(mask).max())) + 6
    side = 2 * half + 1
    box = _grid(half, ball=False)
    transfer = ctf_transfer((side, side, side), cfg.tilt_range)
    idx = (mask + half).astype(int)
    rows = []
    for r in rotations:
        rotated = ndi.map_coordinates(obj, (centre + box @ r.T / scale).T, order=1,
                                      mode="constant")
        img = sfft.irfftn(sfft.rfftn(rotated.reshape(side, side, side)) * transfer,
                          s=(side, side, side))
        rows.append(img[idx[:, 0], idx[:, 1], idx[:, 2]])
    return _unit_rows(np.stack(rows))


def ceiling(seeds: Sequence[int], snr: float, shape: tuple[int, int, int], n_rotations: int,
            mask_factor: float = 0.8) -> dict[str, dict[str, float]]:
    """Per variant, per kind: best F1 averaged over ``seeds``, and the mean over kinds."""
    rotations = Rotation.random(n_rotations, random_state=0).as_matrix()
    runs = [scene_ceiling(s, snr, shape, rotations, mask_factor) for s in seeds]
    return mean_per_kind(runs, VARIANTS, CROWDED_KINDS)


def main() -> None:
    """Parse the options, rank each kind's copies and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--shape", default="64,160,160")
    ap.add_argument("--rotations", type=int, default=2000)
    ap.add_argument("--mask", type=float, default=0.8, help="mask radius / the copy's extent")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    seeds = [int(v) for v in a.seeds.split(",")]
    res = ceiling(seeds, a.snr, shape, a.rotations, a.mask)  # type: ignore[arg-type]
    kinds = [k for k in res[VARIANTS[0]] if k != "mean"]
    print(f"best F1, one click, perfect centres, particles only; SNR {a.snr:g}, {a.shape}, "
          f"seeds {a.seeds}, {a.rotations} rotations, mask {a.mask:g} x extent")
    print(f"{'template':14s}" + "".join(f"{k[:10]:>11s}" for k in kinds) + f"{'mean':>8s}")
    for v in VARIANTS:
        print(f"{v:14s}" + "".join(f"{res[v][k]:11.2f}" for k in kinds) +
              f"{res[v]['mean']:8.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"seeds": seeds, "snr": a.snr, "shape": shape, "rotations": a.rotations,
                       "mask": a.mask, "best_f1": res}, fh, indent=1)


if __name__ == "__main__":
    main()
