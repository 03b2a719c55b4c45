"""Synthetic cryo-ET tomograms with known particles and membranes (tests, demo, benchmarks).

``scene`` places particles and membranes and forms the tomogram, ``imaging`` holds the Fourier
filters (blur, band-limited noise, missing wedge), ``files`` writes a simulation to disk.
"""

from cryosam.simulate.files import OUTPUT_NAMES, measured_snr, write_simulation
from cryosam.simulate.imaging import missing_wedge_mask
from cryosam.simulate.scene import (
    BLOB_KIND,
    FILAMENT_KIND,
    TARGET_KIND,
    Particle,
    Simulation,
    SimulationConfig,
    simulate,
)

__all__ = [
    "BLOB_KIND", "FILAMENT_KIND", "OUTPUT_NAMES", "TARGET_KIND", "Particle", "Simulation",
    "SimulationConfig", "measured_snr", "missing_wedge_mask", "simulate", "write_simulation",
]
