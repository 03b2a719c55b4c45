"""Write a simulation as the files a user (or a test) reads: tomogram, truth, clicks."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cryosam._atomic import atomic_write_text
from cryosam.errors import CryosamError
from cryosam.simulate.scene import Simulation

OUTPUT_NAMES = ("tomo.mrc", "truth.csv", "prompt.csv", "prompts5.csv", "membrane_clicks.csv",
                "membrane.mrc", "labels.mrc", "simulation.json")


def _xyz_csv(points_zyx: np.ndarray) -> str:
    lines = ["x,y,z"]
    lines += [f"{x:.2f},{y:.2f},{z:.2f}" for z, y, x in np.asarray(points_zyx).reshape(-1, 3)]
    return "\n".join(lines) + "\n"


def write_simulation(sim: Simulation, out_dir: str | os.PathLike[str], *,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write the tomogram, its truth and prompt files into ``out_dir``; return the paths,
    keyed by file name (``paths["tomo.mrc"]``).

    Files: ``tomo.mrc`` (voxel size set), ``truth.csv`` (id,kind,x,y,z,radius; voxels),
    ``prompt.csv`` (one target), ``prompts5.csv`` (five targets), ``membrane_clicks.csv``,
    ``membrane.mrc`` (0/1), ``labels.mrc`` (particle ids) and ``simulation.json`` (the
    configuration and a summary). Existing files are kept unless ``overwrite``.
    """
    from cryosam.io import write_mrc

    out = Path(out_dir)
    paths = {name: out / name for name in OUTPUT_NAMES}
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise CryosamError(f"{out}: already holds {', '.join(existing)}; "
                           "choose another folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    vs = sim.voxel_size
    write_mrc(paths["tomo.mrc"], sim.volume, voxel_size=vs, origin=(0.0, 0.0, 0.0))
    write_mrc(paths["labels.mrc"], sim.labels, voxel_size=vs, origin=(0.0, 0.0, 0.0))
    write_mrc(paths["membrane.mrc"], sim.membrane, voxel_size=vs, origin=(0.0, 0.0, 0.0))
    rows = ["id,kind,x,y,z,radius"]
    rows += [f"{p.id},{p.kind},{p.zyx[2]:.3f},{p.zyx[1]:.3f},{p.zyx[0]:.3f},{p.radius:.3f}"
             for p in sim.particles]
    atomic_write_text(paths["truth.csv"], "\n".join(rows) + "\n")
    atomic_write_text(paths["prompt.csv"], _xyz_csv(sim.prompt_points[:1]))
    atomic_write_text(paths["prompts5.csv"], _xyz_csv(sim.prompt_points[:5]))
    atomic_write_text(paths["membrane_clicks.csv"], _xyz_csv(sim.membrane_clicks))
    summary = {
        "config": asdict(sim.config),
        "counts": {k: len(sim.ids(k)) for k in dict.fromkeys(p.kind for p in sim.particles)},
        "target_kind": sim.target_kind,
        "target_radius": sim.target_radius,
        "prompt_ids": list(sim.prompt_ids),
        "measured_snr": measured_snr(sim),
    }
    atomic_write_text(paths["simulation.json"], json.dumps(summary, indent=2) + "\n")
    return paths


def measured_snr(sim: Simulation) -> float:
    """Var(signal) / Var(volume - signal), the SNR as defined in :class:`SimulationConfig`."""
    noise = sim.volume.astype(np.float64) - sim.signal
    return float(np.var(sim.signal, dtype=np.float64) / np.var(noise))
