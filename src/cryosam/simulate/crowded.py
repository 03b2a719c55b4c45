"""The crowded preset: many kinds of particles of close sizes, packed densely.

Eight kinds are built procedurally to resemble proteins of 4.5-9 voxels in radius at 10 Å:
a two-subunit ribosome-like body, a barrel (proteasome-like), a double ring (chaperonin-like),
a single ring, an elongated dimer, a tetramer, a trimer and a compact globule. Each copy has a
random 3-D orientation and a size within ±8 %. The image goes through a CTF-like band pass
(oscillating, phase-flipping transfer with an envelope) and the missing wedge; noise is
band-limited at the set SNR. This is the benchmark for precision among look-alikes: clicking
one kind must not pick the others.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sfft

from cryosam.errors import CryosamError
from cryosam.simulate.shapes import (
    Membrane,
    Shape,
    make_membranes,
    offsets,
    render_membranes,
    ribosome_shape,
)

# a placed particle: kind, shape, centre (z, y, x), where its mask sits, its mask
Placed = tuple[str, Shape, np.ndarray, tuple[slice, ...], np.ndarray]

# kind -> nominal outer radius in voxels
CROWDED_KINDS: dict[str, float] = {
    "ribosome": 9.0, "proteasome": 8.5, "chaperonin": 7.0, "ring": 6.0, "dimer": 6.0,
    "tetramer": 5.5, "trimer": 4.5, "globule": 4.5,
}
_GAP = 1.0  # voxels between particles: dense packing


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _balls(centres: np.ndarray, radius: float, rot: np.ndarray, extent: float) -> Shape:
    shape = Shape(extent=extent, density=1.0)
    for c in np.asarray(centres, dtype=np.float64) @ rot.T:
        shape.spheres.append((c, radius))
    return shape


def _ring(n: int, radius: float, z: float = 0.0) -> np.ndarray:
    a = np.arange(n) * 2 * math.pi / n
    return np.stack([np.full(n, z), radius * np.sin(a), radius * np.cos(a)], axis=1)


def crowded_shape(kind: str, rng: np.random.Generator) -> Shape:
    """One copy of ``kind`` in a random orientation (scene voxels, centred at 0)."""
    factor = float(rng.uniform(0.92, 1.08))
    r = CROWDED_KINDS[kind] * factor
    rot = _rotation(rng)
    if kind == "ribosome":
        shape = ribosome_shape(rng, r)
    elif kind == "proteasome":  # a barrel: a thick rod with four rings of lumps
        axis = rot[:, 0]
        shape = Shape(extent=r, capsules=[(-0.45 * r * axis, 0.45 * r * axis, 0.55 * r)],
                      density=0.9)
        for z in (-0.5, -0.17, 0.17, 0.5):
            for c in _ring(7, 0.55 * r, z * r) @ rot.T:
                shape.spheres.append((c, 0.2 * r))
    elif kind == "chaperonin":  # two stacked rings of seven
        centres = np.concatenate([_ring(7, 0.62 * r, -0.3 * r), _ring(7, 0.62 * r, 0.3 * r)])
        shape = _balls(centres, 0.3 * r, rot, r)
    elif kind == "ring":
        shape = _balls(_ring(8, 0.7 * r), 0.28 * r, rot, r)
    elif kind == "dimer":
        shape = _balls(np.array([[0.45 * r, 0, 0], [-0.45 * r, 0, 0]]), 0.55 * r, rot, r)
    elif kind == "tetramer":
        tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / math.sqrt(3)
        shape = _balls(0.52 * r * tetra, 0.48 * r, rot, r)
    elif kind == "trimer":
        shape = _balls(_ring(3, 0.5 * r), 0.5 * r, rot, r)
    elif kind == "globule":
        radii = r * np.array([1.0, 0.82, 0.7])
        shape = Shape(extent=r, ellipsoid=(rot, radii), density=1.0)
    else:
        raise CryosamError(f"unknown crowded kind {kind!r}")
    shape.size_factor = factor
    return shape


def ctf_transfer(shape: tuple[int, int, int], tilt_range: float, first_zero: float = 3.0,
                 envelope: float = 2.0) -> np.ndarray:
    """rfftn-layout CTF-like transfer: ``sin(pi (k / k0)^2)`` (positive at low frequencies,
    so dense matter stays dark; phase flips beyond the first zero at ``first_zero`` voxels),
    a Gaussian envelope (``envelope`` voxels), no k = 0, and the missing wedge about y."""
    d, h, w = shape
    kz = sfft.fftfreq(d).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(h).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(w).astype(np.float32)[None, None, :]
    k2 = kz**2 + ky**2 + kx**2
    k0 = 1.0 / first_zero
    out = np.sin(np.float32(math.pi) * k2 / np.float32(k0**2)) * np.exp(
        np.float32(-2 * math.pi**2 * envelope**2) * k2)
    if tilt_range < 90:
        out = out * (np.abs(kz) <= np.float32(math.tan(math.radians(tilt_range))) * np.abs(kx))
    return out.astype(np.float32)


def place_crowded(shape: tuple[int, int, int], counts: dict[str, int], membrane: bool,
                  rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Membrane], list[Placed]]:
    """Membranes, then every particle without overlap. Returns (density, labels, membrane
    mask, membranes, [(kind, Shape, centre, mask slice, mask)])."""
    density = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int16)
    occupied = np.zeros(shape, dtype=bool)
    membranes = make_membranes(shape, rng) if membrane else []
    mask_m = render_membranes(shape, membranes, density)
    occupied |= mask_m
    dims = np.asarray(shape, dtype=np.float64)
    order = [k for k in CROWDED_KINDS for _ in range(counts.get(k, 0))]
    rng.shuffle(order)
    placed = []
    for kind in order:
        shp = crowded_shape(kind, rng)
        lo, hi = shp.extent + 1.0, dims - shp.extent - 2.0
        for _attempt in range(400):
            centre = rng.uniform(lo, hi)
            sl, d = offsets(centre, shp.extent + _GAP, shape)
            if not (occupied[sl] & shp.inside(d, pad=_GAP)).any():
                break
        else:
            continue  # the volume is full: fewer copies of this kind
        m = shp.inside(d)
        occupied[sl] |= m
        labels[sl][m] = len(placed) + 1
        density[sl][m] += shp.texture(d)[m].astype(np.float32)
        placed.append((kind, shp, centre, sl, m))
    return density, labels, mask_m, membranes, placed


def kind_clicks(sim, kind: str, n: int = 1) -> np.ndarray:  # noqa: ANN001 - a Simulation
    """(n, 3) zyx clicks on ``n`` particles of ``kind`` as a user would choose them: the ones
    with the most free space around them."""
    parts = [p for p in sim.particles if p.kind == kind]
    if not parts:
        return np.zeros((0, 3))
    centres = np.asarray([p.zyx for p in sim.particles])
    radii = np.asarray([p.radius for p in sim.particles])
    dims = np.asarray(sim.volume.shape, dtype=np.float64)

    def clearance(p) -> float:  # noqa: ANN001 - a Particle (scene imports this module)
        c = np.asarray(p.zyx)
        gaps = np.linalg.norm(centres - c, axis=1) - radii - p.radius
        gaps[p.id - 1] = np.inf
        return float(min(gaps.min(), (c - p.radius).min(), (dims - 1 - c - p.radius).min()))

    best = sorted(parts, key=clearance, reverse=True)[:n]
    return np.asarray([p.zyx for p in best], dtype=np.float64).reshape(-1, 3)
