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
from cryosam.simulate.crowded import CROWDED_KINDS, ctf_transfer, kind_clicks, place_crowded
from cryosam.simulate.imaging import apply_transfer, transfer
from cryosam.simulate.shapes import (
    MEMBRANE_HALF_THICKNESS,
    Membrane,
    Shape,
    bilayer,
    blob_shape,
    filament_shape,
    make_membranes,
    offsets,
    render_membranes,
    ribosome_shape,
)

TARGET_KIND = "ribosome"
BLOB_KIND = "blob"
FILAMENT_KIND = "filament"

_DEFAULT_SHAPE = (64, 160, 160)
_DEFAULT_COUNTS = {TARGET_KIND: 24, FILAMENT_KIND: 16, BLOB_KIND: 24}  # per default volume
_GAP = 2.0  # minimum free space between particles (and particles and membranes), voxels


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
    zoom: float = 1.0  # sample the same scene this many times finer (voxel_size / zoom)
    invert: bool = False  # dense matter bright, as in many processed/denoised tomograms
    preset: str = "default"  # "crowded": 8 look-alike kinds packed densely, CTF band pass
    per_kind: int | None = None  # crowded: copies of each kind (default: scales with volume)

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
        if self.preset not in ("default", "crowded"):
            raise InputError(f"--preset {self.preset!r} is not one of default, crowded")
        if self.preset == "crowded" and self.zoom != 1.0:
            raise InputError("--zoom is not available with --preset crowded")
        if not 1.0 <= self.zoom <= 8.0:
            raise InputError(f"--zoom {self.zoom}: must be between 1 and 8")
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
    def shape(self) -> tuple[int, int, int]:
        """The sampled volume's shape: the scene's shape times the zoom."""
        return tuple(int(s) for s in self.volume.shape)  # type: ignore[return-value]

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
# simulation


def simulate(config: SimulationConfig | None = None) -> Simulation:
    """Simulate a tomogram with known particles and membranes (see the module docstring)."""
    cfg = config or SimulationConfig()
    if cfg.preset == "crowded":
        return _simulate_crowded(cfg)
    rng = np.random.default_rng(cfg.seed)
    shape = cfg.shape
    dims = np.asarray(shape, dtype=np.float64)
    density = np.zeros(shape, dtype=np.float32)
    occupied = np.zeros(shape, dtype=bool)
    labels = np.zeros(shape, dtype=np.int16)

    membranes = make_membranes(shape, rng) if cfg.membrane else []
    membrane = render_membranes(shape, membranes, density)
    occupied |= membrane

    counts = cfg.counts()
    makers = [(TARGET_KIND, lambda: ribosome_shape(rng, cfg.target_radius)),
              (FILAMENT_KIND, lambda: filament_shape(rng)), (BLOB_KIND, lambda: blob_shape(rng))]
    particles: list[Particle] = []
    size_factors: list[float] = []
    placed: list[tuple[Shape, np.ndarray]] = []
    for kind, make in makers:
        for _ in range(counts[kind]):
            shp = make()
            lo, hi = shp.extent + 1.0, dims - shp.extent - 2.0
            if np.any(hi <= lo):
                raise InputError(f"--shape {shape}: too small for a {kind} particle")
            for _attempt in range(300):
                centre = rng.uniform(lo, hi)
                sl, d = offsets(centre, shp.extent + _GAP, shape)
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
            placed.append((shp, centre))

    zoom = float(cfg.zoom)
    if zoom != 1.0:
        # the same scene sampled finer: the draws above are unchanged, so are the noise draw
        # (made and discarded, keeping the generator in step) and the prompts below
        rng.standard_normal(size=shape, dtype=np.float32)
        prompt_ids = _choose_prompts(particles, size_factors, membranes, shape, rng, 5)
        clicks = _membrane_clicks(membranes, membrane, cfg.n_membrane_clicks, shape, rng)
        return _render_fine(cfg, placed, particles, membranes, prompt_ids,
                            (clicks + 0.5) * zoom - 0.5)

    # dense matter dark; blurred, band-limited noise; both through the missing wedge
    signal, volume = _form(density, cfg, rng, 1.0)

    prompt_ids = _choose_prompts(particles, size_factors, membranes, shape, rng, 5)
    clicks = _membrane_clicks(membranes, membrane, cfg.n_membrane_clicks, shape, rng)
    if cfg.invert:
        signal, volume = -signal, -volume
    return Simulation(volume=volume.astype(np.float32), signal=signal, voxel_size=cfg.voxel_size,
                      particles=tuple(particles), labels=labels, membrane=membrane,
                      target_kind=TARGET_KIND, prompt_ids=prompt_ids, membrane_clicks=clicks,
                      config=cfg)


def _form(density: np.ndarray, cfg: SimulationConfig, noise_rng: np.random.Generator,
          zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """(signal, volume) from a density: dark, blurred, band-limited noise at the set SNR."""
    shape = density.shape
    signal = apply_transfer(-density, transfer(shape, cfg.blur_sigma * zoom, cfg.tilt_range))
    white = noise_rng.standard_normal(size=shape, dtype=np.float32)
    noise = apply_transfer(white, transfer(shape, cfg.noise_sigma * zoom, cfg.tilt_range))
    signal -= signal.mean()
    noise -= noise.mean()
    var_s = float(np.var(signal, dtype=np.float64))
    var_n = float(np.var(noise, dtype=np.float64))
    if var_s > 0:
        noise *= np.float32(math.sqrt(var_s / (cfg.snr * var_n)))
    scale = np.float32(1.0 / math.sqrt(max(var_s * (1 + 1 / cfg.snr), 1e-12)))
    signal *= scale
    noise *= scale
    return signal, signal + noise


def _render_fine(cfg: SimulationConfig, placed: list[tuple[Shape, np.ndarray]],
                 coarse: list[Particle], membranes: list[Membrane],
                 prompt_ids: tuple[int, ...], clicks: np.ndarray) -> Simulation:
    """Draw the placed scene on a grid ``cfg.zoom`` times finer (fine voxel i sits at scene
    coordinate (i + 0.5) / zoom - 0.5); truth and clicks are given in fine voxels."""
    zoom = float(cfg.zoom)
    fine = tuple(int(round(s * zoom)) for s in cfg.shape)
    density = np.zeros(fine, dtype=np.float32)
    labels = np.zeros(fine, dtype=np.int16)
    membrane = np.zeros(fine, dtype=bool)
    if membranes:
        z, y, x = ((g.astype(np.float32) + 0.5) / zoom - 0.5 for g in np.ogrid[
            : fine[0], : fine[1], : fine[2]])
        for mem in membranes:
            sd = mem.signed_distance(z, y, x)
            membrane |= np.abs(sd) <= MEMBRANE_HALF_THICKNESS
            near = np.abs(sd) <= 4.0
            density[near] += bilayer(sd[near]).astype(np.float32)
    particles = []
    for (shp, centre), old in zip(placed, coarse, strict=True):
        reach = shp.extent + 2.0
        lo = np.maximum(np.floor((centre - reach + 0.5) * zoom).astype(int), 0)
        hi = np.minimum(np.ceil((centre + reach + 0.5) * zoom).astype(int), np.asarray(fine))
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        d = tuple((g.astype(np.float64) + 0.5) / zoom - 0.5 - c
                  for g, c in zip(np.ogrid[sl], centre, strict=True))
        mask = shp.inside(d)
        labels[sl][mask] = old.id
        density[sl][mask] += shp.texture(d)[mask].astype(np.float32)
        idx = np.argwhere(mask)
        zyx = tuple(float(v) for v in idx.mean(axis=0) + [s.start for s in sl])
        radius = float((3 * len(idx) / (4 * math.pi)) ** (1 / 3))
        particles.append(Particle(old.id, old.kind, zyx, radius, int(len(idx))))
    signal, volume = _form(density, cfg, np.random.default_rng([cfg.seed, 1]), zoom)
    if cfg.invert:
        signal, volume = -signal, -volume
    return Simulation(volume=volume.astype(np.float32), signal=signal,
                      voxel_size=cfg.voxel_size / zoom, particles=tuple(particles),
                      labels=labels, membrane=membrane, target_kind=TARGET_KIND,
                      prompt_ids=prompt_ids, membrane_clicks=clicks, config=cfg)


def _choose_prompts(particles: list[Particle], size_factors: list[float],
                    membranes: list[Membrane],
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
        mem -= MEMBRANE_HALF_THICKNESS + p.radius
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


def _membrane_clicks(membranes: list[Membrane], mask: np.ndarray, n: int,
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


def crowded_scene(cfg: SimulationConfig) -> tuple[np.random.Generator, tuple]:
    """The crowded preset's scene before imaging: the seed's generator (imaging goes on
    drawing from it) and :func:`place_crowded`'s (density, labels, membrane mask,
    membranes, placed particles)."""
    rng = np.random.default_rng(cfg.seed)
    per = cfg.per_kind
    if per is None:  # 12 of each kind in 64x160x160, scaled with the volume
        per = max(1, round(12 * float(np.prod(cfg.shape)) / float(np.prod(_DEFAULT_SHAPE))))
    return rng, place_crowded(cfg.shape, dict.fromkeys(CROWDED_KINDS, int(per)), cfg.membrane,
                              rng)


def _simulate_crowded(cfg: SimulationConfig) -> Simulation:
    """The crowded preset (see :mod:`cryosam.simulate.crowded`); ``target_kind`` is the
    ribosome-like kind and the truth holds every kind."""
    shape = cfg.shape
    rng, (density, labels, membrane, membranes, placed) = crowded_scene(cfg)
    particles = []
    for pid, (kind, _shp, _centre, sl, m) in enumerate(placed, start=1):
        idx = np.argwhere(m)
        zyx = tuple(float(v) for v in idx.mean(axis=0) + [q.start for q in sl])
        radius = float((3 * len(idx) / (4 * math.pi)) ** (1 / 3))
        particles.append(Particle(pid, kind, zyx, radius, int(len(idx))))
    signal = apply_transfer(-density, ctf_transfer(shape, cfg.tilt_range))
    white = rng.standard_normal(size=shape, dtype=np.float32)
    noise = apply_transfer(white, transfer(shape, cfg.noise_sigma, cfg.tilt_range))
    signal -= signal.mean()
    noise -= noise.mean()
    var_s, var_n = float(np.var(signal)), float(np.var(noise))
    noise *= np.float32(math.sqrt(var_s / (cfg.snr * var_n)))
    scale = np.float32(1.0 / math.sqrt(max(var_s * (1 + 1 / cfg.snr), 1e-12)))
    signal *= scale
    volume = signal + noise * scale
    if cfg.invert:
        signal, volume = -signal, -volume
    clicks = _membrane_clicks(membranes, membrane, cfg.n_membrane_clicks, shape, rng)
    sim = Simulation(volume=volume.astype(np.float32), signal=signal,
                     voxel_size=cfg.voxel_size, particles=tuple(particles), labels=labels,
                     membrane=membrane, target_kind="ribosome", prompt_ids=(),
                     membrane_clicks=clicks, config=cfg)
    ids = [next(p.id for p in particles if np.allclose(p.zyx, c))
           for c in kind_clicks(sim, "ribosome", 5)]
    sim.prompt_ids = tuple(ids)
    return sim
