"""The simulator's particle shapes (targets, blobs, filaments) and membranes (vesicle, sheet),
as primitives relative to a centre, in scene voxels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MEMBRANE_HALF_THICKNESS = 2.5  # membrane mask: |distance to mid-surface| <= this, voxels
_LEAFLET_OFFSET = 1.5  # leaflet centres at +-this from the mid-surface, voxels
_LEAFLET_SIGMA = 0.7  # leaflet Gaussian profile width, voxels


# ----------------------------------------------------------------------------------------
# particle shapes


@dataclass
class Shape:
    """A particle as primitives relative to its centre: spheres, capsules and one ellipsoid."""

    extent: float  # bounding radius (voxels)
    spheres: list[tuple[np.ndarray, float]] = field(default_factory=list)
    capsules: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    ellipsoid: tuple[np.ndarray, np.ndarray] | None = None  # rotation (3,3), radii (3,)
    lumps: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # texture
    density: float = 1.0  # base density (positive = dense; drawn dark)
    clip: float | None = None  # intersect with a sphere of this radius
    size_factor: float = 1.0  # size relative to the kind's nominal size

    def inside(self, d: tuple[np.ndarray, np.ndarray, np.ndarray], pad: float = 0.0) -> np.ndarray:
        """Boolean mask of the voxels within the shape grown by ``pad``; ``d`` = offsets."""
        dz, dy, dx = d
        out = np.zeros(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), dtype=bool)
        for c, r in self.spheres:
            out |= (dz - c[0]) ** 2 + (dy - c[1]) ** 2 + (dx - c[2]) ** 2 <= (r + pad) ** 2
        for p0, p1, r in self.capsules:
            axis = p1 - p0
            length2 = float(axis @ axis)
            t = ((dz - p0[0]) * axis[0] + (dy - p0[1]) * axis[1] + (dx - p0[2]) * axis[2])
            t = np.clip(t / length2, 0.0, 1.0)
            dist2 = ((dz - p0[0] - t * axis[0]) ** 2 + (dy - p0[1] - t * axis[1]) ** 2
                     + (dx - p0[2] - t * axis[2]) ** 2)
            out |= dist2 <= (r + pad) ** 2
        if self.ellipsoid is not None:
            rot, radii = self.ellipsoid
            acc = np.zeros_like(out, dtype=np.float64)
            for i in range(3):
                u = dz * rot[0, i] + dy * rot[1, i] + dx * rot[2, i]
                acc = acc + (u / (radii[i] + pad)) ** 2
            out |= acc <= 1.0
        if self.clip is not None:
            out &= dz**2 + dy**2 + dx**2 <= (self.clip + pad) ** 2
        return out

    def texture(self, d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """Density inside the shape (before masking): base plus smooth denser lumps."""
        dz, dy, dx = d
        dens = np.full(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), self.density)
        for c, s, a in self.lumps:
            r2 = (dz - c[0]) ** 2 + (dy - c[1]) ** 2 + (dx - c[2]) ** 2
            dens = dens + a * np.exp(-r2 / (2 * s * s))
        return dens


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def ribosome_shape(rng: np.random.Generator, radius: float) -> Shape:
    """Large subunit + small subunit along a random axis, surface lumps, RNA-rich texture."""
    factor = rng.uniform(0.92, 1.08)
    r = radius * factor
    u = _unit(rng)
    large_c, small_c = 0.28 * r * u, -0.48 * r * u
    shape = Shape(extent=r, clip=r, density=0.8, size_factor=float(factor))
    shape.spheres.append((large_c, 0.72 * r))
    shape.spheres.append((small_c, 0.52 * r))
    for _ in range(int(rng.integers(3, 6))):  # lumps on the large subunit's surface
        v = _unit(rng)
        if v @ u < -0.3:
            v = -v
        shape.spheres.append((large_c + 0.6 * r * v, 0.26 * r))
    for _ in range(5):  # denser internal patches
        c = (large_c if rng.random() < 0.7 else small_c) + rng.normal(scale=0.25 * r, size=3)
        shape.lumps.append((c, 0.2 * r, float(rng.uniform(0.3, 0.6))))
    return shape


def blob_shape(rng: np.random.Generator) -> Shape:
    """A small compact protein: a randomly oriented ellipsoid, radii ~2.2-3.8 voxels."""
    base = rng.uniform(2.6, 3.4)
    radii = base * rng.uniform(0.85, 1.12, size=3)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return Shape(extent=float(radii.max()), ellipsoid=(rot, radii),
                  density=float(rng.uniform(0.9, 1.1)))


def filament_shape(rng: np.random.Generator) -> Shape:
    """A straight rod: a capsule of radius 1.6-2.2 voxels and length 14-22 voxels."""
    half = rng.uniform(7.0, 11.0)
    r = rng.uniform(1.6, 2.2)
    u = _unit(rng)
    return Shape(extent=half + r, capsules=[(-half * u, half * u, r)],
                  density=float(rng.uniform(0.9, 1.1)))


# ----------------------------------------------------------------------------------------
# membranes


@dataclass
class Membrane:
    """A bilayer given by a signed distance to its mid-surface."""

    kind: str  # "vesicle" | "sheet"
    params: dict[str, float]

    def signed_distance(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Signed distance (voxels) of points (z, y, x) to the mid-surface: exact for the
        vesicle (positive outside), to first order for the sheet (positive towards larger x)."""
        p = self.params
        if self.kind == "vesicle":
            return np.sqrt((z - p["cz"]) ** 2 + (y - p["cy"]) ** 2 + (x - p["cx"]) ** 2) - p["r"]
        # sheet: x = x0 + a sin(2 pi y / lam + phi) + b (z - zc)
        w = 2 * math.pi / p["lam"]
        f = p["x0"] + p["a"] * np.sin(w * y + p["phi"]) + p["b"] * (z - p["zc"])
        fy = p["a"] * w * np.cos(w * y + p["phi"])
        return (x - f) / np.sqrt(1.0 + fy**2 + p["b"] ** 2)

    def surface_points(self, n: int, shape: tuple[int, int, int],
                       rng: np.random.Generator) -> list[tuple[float, float, float]]:
        """``n`` points on the mid-surface where the membrane is seen edge-on (not in the
        missing wedge): the vesicle's equator, the sheet's middle z."""
        p = self.params
        pts = []
        if self.kind == "vesicle":
            phi0 = rng.uniform(0, 2 * math.pi)
            for i in range(n):
                a = phi0 + 2 * math.pi * i / n
                pts.append((p["cz"], p["cy"] + p["r"] * math.sin(a),
                            p["cx"] + p["r"] * math.cos(a)))
        else:
            z = p["zc"]
            for i in range(n):
                y = shape[1] * (i + 1) / (n + 1)
                w = 2 * math.pi / p["lam"]
                x = p["x0"] + p["a"] * math.sin(w * y + p["phi"]) + p["b"] * (z - p["zc"])
                pts.append((z, y, x))
        return pts


def bilayer(sd: np.ndarray) -> np.ndarray:
    """Density across a membrane at signed distance ``sd``: two leaflets (Gaussians)."""
    s2 = 2 * _LEAFLET_SIGMA**2
    return 0.9 * (np.exp(-((sd - _LEAFLET_OFFSET) ** 2) / s2)
                  + np.exp(-((sd + _LEAFLET_OFFSET) ** 2) / s2))


def make_membranes(shape: tuple[int, int, int], rng: np.random.Generator) -> list[Membrane]:
    """A gently curved sheet and a vesicle that fit in ``shape`` (none in a small one)."""
    d, h, w = shape
    out: list[Membrane] = []
    sheet_xmax = 0.0
    if w >= 64 and h >= 32:
        x0 = max(8.0, 0.1 * w)
        a, b = float(rng.uniform(1.5, 3.0)), float(rng.uniform(-0.12, 0.12))
        out.append(Membrane("sheet", {"x0": x0, "a": a, "b": b, "zc": d / 2,
                                       "lam": float(h * rng.uniform(0.7, 1.1)),
                                       "phi": float(rng.uniform(0, 2 * math.pi))}))
        sheet_xmax = x0 + a + abs(b) * d / 2 + MEMBRANE_HALF_THICKNESS
    r = min(0.34 * d, 0.17 * min(h, w))
    margin = r + MEMBRANE_HALF_THICKNESS + 3
    x_lo = max(margin, sheet_xmax + margin + 4)
    if r >= 8 and 2 * margin <= h and x_lo <= w - margin:
        cz = d / 2 + rng.uniform(-1, 1) * max(0.0, d / 2 - margin)
        cy, cx = rng.uniform(margin, h - margin), rng.uniform(x_lo, w - margin)
        out.append(Membrane("vesicle", {"cz": float(cz), "cy": float(cy), "cx": float(cx),
                                         "r": float(r)}))
    return out


def offsets(centre: np.ndarray, extent: float, shape: tuple[int, int, int]
            ) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]]:
    """Bounding-box slices around ``centre`` and the voxel offsets from it (open grids)."""
    lo = np.maximum(np.floor(centre - extent - 1).astype(int), 0)
    hi = np.minimum(np.ceil(centre + extent + 2).astype(int), np.asarray(shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    d = tuple(g.astype(np.float64) - c for g, c in zip(np.ogrid[sl], centre, strict=True))
    return sl, d


def render_membranes(shape: tuple[int, int, int], membranes: list[Membrane],
                     density: np.ndarray) -> np.ndarray:
    """Add the membranes' bilayers to ``density`` (in place); return their mask."""
    mask = np.zeros(shape, dtype=bool)
    if membranes:
        z, y, x = (g.astype(np.float32) for g in np.ogrid[: shape[0], : shape[1], : shape[2]])
        for mem in membranes:
            sd = mem.signed_distance(z, y, x)
            mask |= np.abs(sd) <= MEMBRANE_HALF_THICKNESS
            near = np.abs(sd) <= 4.0
            density[near] += bilayer(sd[near]).astype(np.float32)
    return mask
