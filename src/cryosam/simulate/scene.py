"""Synthetic cryo-ET tomograms with known particles and membranes (tests, demo, benchmarks).

The volume imitates a reconstructed lamella at low magnification:

- particles of three kinds, never overlapping, fully inside the volume: the target kind
  (``"ribosome"``: two subunits of unequal size with lumps and denser internal texture,
  ~6.5 voxels outer radius), small compact ``"blob"`` proteins (ellipsoids, ~3 voxels) and
  ``"filament"`` pieces (rods ~2 voxels thick, 14-22 voxels long);
- membranes: a vesicle shell and a gently curved sheet, each a bilayer (two dark leaflets
  ~3 voxels apart);
- dense matter is dark (negative values), as in raw reconstructions;
- the signal is blurred (Gaussian, ``blur_sigma``) and both signal and noise pass through a
  missing wedge (tilt axis y, tilt range +-``tilt_range`` degrees, beam along z at zero tilt),
  as a weighted back-projection would leave them;
- the noise is Gaussian, band-limited (Gaussian low-pass of width ``noise_sigma`` voxels) and
  scaled to the requested signal-to-noise ratio (see :class:`SimulationConfig`).

Sizes are in voxels; ``voxel_size`` only goes into the headers. Everything is drawn from one
``numpy`` generator seeded by ``seed``: the same configuration gives the same volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cryosam.errors import CryosamError, InputError
from cryosam.simulate.imaging import apply_transfer, transfer

TARGET_KIND = "ribosome"
BLOB_KIND = "blob"
FILAMENT_KIND = "filament"

_DEFAULT_SHAPE = (64, 160, 160)
_DEFAULT_COUNTS = {TARGET_KIND: 24, FILAMENT_KIND: 16, BLOB_KIND: 24}  # per default volume
_GAP = 2.0  # minimum free space between particles (and particles and membranes), voxels
_MEMBRANE_HALF_THICKNESS = 2.5  # membrane mask: |distance to mid-surface| <= this, voxels
_LEAFLET_OFFSET = 1.5  # leaflet centres at +-this from the mid-surface, voxels
_LEAFLET_SIGMA = 0.7  # leaflet Gaussian profile width, voxels


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate.

    Signal-to-noise ratio: ``snr = Var(S) / Var(N)`` over the whole volume, where ``S`` is the
    noise-free signal after blur and missing wedge and ``N`` the added noise after its own
    band limit and missing wedge (so ``volume = S + N`` and both are what a reconstruction
    would show). ``snr <= 1`` is typical of real tomograms at this sampling.

    Counts left at ``None`` scale with the volume from 24 targets, 24 blobs and 16 filaments
    per 64x160x160 voxels.
    """

    shape: tuple[int, int, int] = _DEFAULT_SHAPE  # (z, y, x) voxels
    voxel_size: float = 10.0  # Angstrom per voxel (headers only)
    n_targets: int | None = None  # target-kind particles ("ribosome")
    n_blobs: int | None = None  # small compact distractors
    n_filaments: int | None = None  # elongated rod distractors
    target_radius: float = 6.5  # outer radius of a target particle, voxels
    snr: float = 0.5  # Var(signal) / Var(noise), see above
    tilt_range: float = 60.0  # +-degrees sampled; the rest is the missing wedge (tilt axis y)
    blur_sigma: float = 1.0  # Gaussian blur of the signal (resolution), voxels
    noise_sigma: float = 0.6  # Gaussian correlation length of the noise, voxels
    membrane: bool = True  # add a vesicle and a membrane sheet (where they fit)
    n_membrane_clicks: int = 5  # points placed on the membranes' mid-surfaces
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(s) < 16 for s in self.shape):
            raise InputError(f"--shape {self.shape}: give three sizes z,y,x of at least 16 voxels")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.snr > 0 or not math.isfinite(self.snr):
            raise InputError(f"--snr {self.snr}: must be a positive number")
        if not 0 < self.tilt_range <= 90:
            raise InputError(f"--tilt-range {self.tilt_range}: must be in (0, 90] degrees")
        if not self.voxel_size > 0:
            raise InputError(f"--voxel-size {self.voxel_size}: must be positive")
        if not 3.0 <= self.target_radius <= min(self.shape) / 3:
            raise InputError(f"target_radius {self.target_radius}: must be between 3 voxels "
                             "and a third of the smallest dimension")
        for name in ("n_targets", "n_blobs", "n_filaments"):
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                raise InputError(f"{name} = {value}: must be zero or more")

    def counts(self) -> dict[str, int]:
        """Particles per kind, with ``None`` counts scaled by volume from the defaults."""
        scale = float(np.prod(self.shape)) / float(np.prod(_DEFAULT_SHAPE))
        given = {TARGET_KIND: self.n_targets, FILAMENT_KIND: self.n_filaments,
                 BLOB_KIND: self.n_blobs}
        return {k: int(v) if v is not None else max(1, round(_DEFAULT_COUNTS[k] * scale))
                for k, v in given.items()}


@dataclass(frozen=True)
class Particle:
    """One simulated particle: ``zyx`` is its mask's centroid (voxels), ``radius`` the radius
    of the sphere with the mask's volume (voxels)."""

    id: int
    kind: str
    zyx: tuple[float, float, float]
    radius: float
    n_voxels: int


@dataclass
class Simulation:
    """A simulated tomogram and its ground truth (arrays indexed [z, y, x])."""

    volume: np.ndarray  # (D, H, W) float32, zero mean, unit variance; = signal + noise
    signal: np.ndarray  # (D, H, W) float32, the noise-free part of ``volume``
    voxel_size: float
    particles: tuple[Particle, ...]
    labels: np.ndarray  # (D, H, W) int16, particle id per voxel, 0 = background
    membrane: np.ndarray  # (D, H, W) bool, the membranes' bilayers
    target_kind: str
    prompt_ids: tuple[int, ...]  # prompted targets; the first is the one-click prompt
    membrane_clicks: np.ndarray  # (M, 3) float zyx on the membranes' mid-surfaces
    config: SimulationConfig = field(default_factory=SimulationConfig)

    def points(self, kind: str | None = None) -> np.ndarray:
        """(N, 3) zyx centres of the particles of ``kind`` (all when None)."""
        pts = [p.zyx for p in self.particles if kind is None or p.kind == kind]
        return np.asarray(pts, dtype=np.float64).reshape(-1, 3)

    def ids(self, kind: str | None = None) -> list[int]:
        """Particle ids of ``kind`` (all when None)."""
        return [p.id for p in self.particles if kind is None or p.kind == kind]

    def particle(self, pid: int) -> Particle:
        """The particle with id ``pid``."""
        return self.particles[pid - 1]

    @property
    def target_radius(self) -> float:
        """Median equivalent radius of the target particles (voxels)."""
        radii = [p.radius for p in self.particles if p.kind == self.target_kind]
        return float(np.median(radii)) if radii else float(self.config.target_radius)

    @property
    def prompt_points(self) -> np.ndarray:
        """(P, 3) zyx of the prompted particles (first = the one-click prompt)."""
        return np.asarray([self.particle(i).zyx for i in self.prompt_ids]).reshape(-1, 3)


# ----------------------------------------------------------------------------------------
# particle shapes


@dataclass
class _Shape:
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


def _ribosome(rng: np.random.Generator, radius: float) -> _Shape:
    """Large subunit + small subunit along a random axis, surface lumps, RNA-rich texture."""
    factor = rng.uniform(0.92, 1.08)
    r = radius * factor
    u = _unit(rng)
    large_c, small_c = 0.28 * r * u, -0.48 * r * u
    shape = _Shape(extent=r, clip=r, density=0.8, size_factor=float(factor))
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


def _blob(rng: np.random.Generator) -> _Shape:
    """A small compact protein: a randomly oriented ellipsoid, radii ~2.2-3.8 voxels."""
    base = rng.uniform(2.6, 3.4)
    radii = base * rng.uniform(0.85, 1.12, size=3)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return _Shape(extent=float(radii.max()), ellipsoid=(rot, radii),
                  density=float(rng.uniform(0.9, 1.1)))


def _filament(rng: np.random.Generator) -> _Shape:
    """A straight rod: a capsule of radius 1.6-2.2 voxels and length 14-22 voxels."""
    half = rng.uniform(7.0, 11.0)
    r = rng.uniform(1.6, 2.2)
    u = _unit(rng)
    return _Shape(extent=half + r, capsules=[(-half * u, half * u, r)],
                  density=float(rng.uniform(0.9, 1.1)))


# ----------------------------------------------------------------------------------------
# membranes


@dataclass
class _Membrane:
    """A bilayer given by a signed distance to its mid-surface."""

    kind: str  # "vesicle" | "sheet"
    params: dict[str, float]

    def signed_distance(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
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


def _bilayer(sd: np.ndarray) -> np.ndarray:
    s2 = 2 * _LEAFLET_SIGMA**2
    return 0.9 * (np.exp(-((sd - _LEAFLET_OFFSET) ** 2) / s2)
                  + np.exp(-((sd + _LEAFLET_OFFSET) ** 2) / s2))


def _make_membranes(shape: tuple[int, int, int], rng: np.random.Generator) -> list[_Membrane]:
    d, h, w = shape
    out: list[_Membrane] = []
    sheet_xmax = 0.0
    if w >= 64 and h >= 32:
        x0 = max(8.0, 0.1 * w)
        a, b = float(rng.uniform(1.5, 3.0)), float(rng.uniform(-0.12, 0.12))
        out.append(_Membrane("sheet", {"x0": x0, "a": a, "b": b, "zc": d / 2,
                                       "lam": float(h * rng.uniform(0.7, 1.1)),
                                       "phi": float(rng.uniform(0, 2 * math.pi))}))
        sheet_xmax = x0 + a + abs(b) * d / 2 + _MEMBRANE_HALF_THICKNESS
    r = min(0.34 * d, 0.17 * min(h, w))
    margin = r + _MEMBRANE_HALF_THICKNESS + 3
    x_lo = max(margin, sheet_xmax + margin + 4)
    if r >= 8 and 2 * margin <= h and x_lo <= w - margin:
        cz = d / 2 + rng.uniform(-1, 1) * max(0.0, d / 2 - margin)
        cy, cx = rng.uniform(margin, h - margin), rng.uniform(x_lo, w - margin)
        out.append(_Membrane("vesicle", {"cz": float(cz), "cy": float(cy), "cx": float(cx),
                                         "r": float(r)}))
    return out


# ----------------------------------------------------------------------------------------
# simulation


def _offsets(centre: np.ndarray, extent: float, shape: tuple[int, int, int]):
    """Bounding-box slices around ``centre`` and the voxel offsets from it (open grids)."""
    lo = np.maximum(np.floor(centre - extent - 1).astype(int), 0)
    hi = np.minimum(np.ceil(centre + extent + 2).astype(int), np.asarray(shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grids = np.ogrid[sl]
    d = tuple(g.astype(np.float64) - c for g, c in zip(grids, centre, strict=True))
    return sl, d


def simulate(config: SimulationConfig | None = None) -> Simulation:
    """Simulate a tomogram with known particles and membranes (see the module docstring)."""
    cfg = config or SimulationConfig()
    rng = np.random.default_rng(cfg.seed)
    shape = cfg.shape
    dims = np.asarray(shape, dtype=np.float64)
    density = np.zeros(shape, dtype=np.float32)
    occupied = np.zeros(shape, dtype=bool)
    labels = np.zeros(shape, dtype=np.int16)

    membranes = _make_membranes(shape, rng) if cfg.membrane else []
    membrane = np.zeros(shape, dtype=bool)
    if membranes:
        z, y, x = (g.astype(np.float32) for g in np.ogrid[: shape[0], : shape[1], : shape[2]])
        for mem in membranes:
            sd = mem.signed_distance(z, y, x)
            membrane |= np.abs(sd) <= _MEMBRANE_HALF_THICKNESS
            near = np.abs(sd) <= 4.0
            density[near] += _bilayer(sd[near]).astype(np.float32)
        occupied |= membrane

    counts = cfg.counts()
    makers = [(TARGET_KIND, lambda: _ribosome(rng, cfg.target_radius)),
              (FILAMENT_KIND, lambda: _filament(rng)), (BLOB_KIND, lambda: _blob(rng))]
    particles: list[Particle] = []
    size_factors: list[float] = []
    for kind, make in makers:
        for _ in range(counts[kind]):
            shp = make()
            lo, hi = shp.extent + 1.0, dims - shp.extent - 2.0
            if np.any(hi <= lo):
                raise InputError(f"--shape {shape}: too small for a {kind} particle")
            for _attempt in range(300):
                centre = rng.uniform(lo, hi)
                sl, d = _offsets(centre, shp.extent + _GAP, shape)
                if not (occupied[sl] & shp.inside(d, pad=_GAP)).any():
                    break
            else:
                raise CryosamError(
                    f"could not place {counts[kind]} {kind} particles without overlap in a "
                    f"{shape} volume; lower the particle counts or enlarge --shape")
            mask = shp.inside(d)
            pid = len(particles) + 1
            occupied[sl] |= mask
            labels[sl][mask] = pid
            density[sl][mask] += shp.texture(d)[mask].astype(np.float32)
            idx = np.argwhere(mask)
            zyx = tuple(float(v) for v in idx.mean(axis=0) + [s.start for s in sl])
            radius = float((3 * len(idx) / (4 * math.pi)) ** (1 / 3))
            particles.append(Particle(pid, kind, zyx, radius, int(len(idx))))
            size_factors.append(shp.size_factor)

    # dense matter dark: negate; blur + wedge the signal; band-limited, wedge-filtered noise
    signal = apply_transfer(-density, transfer(shape, cfg.blur_sigma, cfg.tilt_range))
    white = rng.standard_normal(size=shape, dtype=np.float32)
    noise = apply_transfer(white, transfer(shape, cfg.noise_sigma, cfg.tilt_range))
    signal -= signal.mean()
    noise -= noise.mean()
    var_s = float(np.var(signal, dtype=np.float64))
    var_n = float(np.var(noise, dtype=np.float64))
    if var_s > 0:
        noise *= np.float32(math.sqrt(var_s / (cfg.snr * var_n)))
    scale = np.float32(1.0 / math.sqrt(max(var_s * (1 + 1 / cfg.snr), 1e-12)))
    signal *= scale
    noise *= scale
    volume = signal + noise

    prompt_ids = _choose_prompts(particles, size_factors, membranes, shape, rng, 5)
    clicks = _membrane_clicks(membranes, membrane, cfg.n_membrane_clicks, shape, rng)
    return Simulation(volume=volume.astype(np.float32), signal=signal, voxel_size=cfg.voxel_size,
                      particles=tuple(particles), labels=labels, membrane=membrane,
                      target_kind=TARGET_KIND, prompt_ids=prompt_ids, membrane_clicks=clicks,
                      config=cfg)


def _choose_prompts(particles: list[Particle], size_factors: list[float],
                    membranes: list[_Membrane],
                    shape: tuple[int, int, int], rng: np.random.Generator,
                    n: int) -> tuple[int, ...]:
    """Up to ``n`` target ids as a user would click them: clear, typical particles.

    Candidates lie well inside the volume, at least 3 voxels from any other particle and
    from the membranes; the first prompt is the candidate closest to the nominal size, the
    others are drawn at random among the remaining candidates (then any other targets).
    """
    targets = [p for p in particles if p.kind == TARGET_KIND]
    if not targets:
        return ()
    dims = np.asarray(shape, dtype=np.float64)
    centres = np.asarray([p.zyx for p in particles])
    radii = np.asarray([p.radius for p in particles])

    def clearance(p: Particle) -> float:
        c = np.asarray(p.zyx)
        border = min(c.min(), (dims - 1 - c).min()) - p.radius
        gaps = np.linalg.norm(centres - c, axis=1) - radii - p.radius
        gaps[p.id - 1] = np.inf
        mem = min((float(abs(m.signed_distance(*c))) for m in membranes), default=np.inf)
        mem -= _MEMBRANE_HALF_THICKNESS + p.radius
        return float(min(border, gaps.min(), mem))

    ok = [p for p in targets if clearance(p) >= 3.0]
    if not ok:
        ok = sorted(targets, key=clearance, reverse=True)[:1]
    first = min(ok, key=lambda p: abs(size_factors[p.id - 1] - 1.0))
    rest = [p.id for p in ok if p.id != first.id]
    chosen = [first.id] + [rest[i] for i in rng.permutation(len(rest))[: n - 1]]
    if len(chosen) < n:
        chosen += [p.id for p in targets if p.id not in chosen][: n - len(chosen)]
    return tuple(chosen)


def _membrane_clicks(membranes: list[_Membrane], mask: np.ndarray, n: int,
                     shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """``n`` clicks spread over the membranes (vesicle first), each on the membrane mask."""
    if not membranes or n <= 0:
        return np.zeros((0, 3), dtype=np.float64)
    per = [n // len(membranes)] * len(membranes)
    order = sorted(range(len(membranes)), key=lambda i: membranes[i].kind != "vesicle")
    for i in order[: n - sum(per)]:
        per[i] += 1
    pts: list[tuple[float, float, float]] = []
    for mem, k in zip(membranes, per, strict=True):
        pts += mem.surface_points(k, shape, rng)
    arr = np.asarray(pts, dtype=np.float64)
    idx = np.clip(np.rint(arr).astype(int), 0, np.asarray(shape) - 1)
    return arr[mask[idx[:, 0], idx[:, 1], idx[:, 2]]]
