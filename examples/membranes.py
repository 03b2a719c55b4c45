"""Segment membranes in 3-D from a few clicks and compare with the true membrane mask.

Run: python examples/membranes.py
"""

from __future__ import annotations

from cryosam import CryoSAM, CryosamConfig, PropagationConfig, SegmenterConfig
from cryosam.metrics import mask_metrics
from cryosam.simulate import SimulationConfig, simulate


def main() -> None:
    """Segment the simulated membranes from a few clicks and print their Dice."""
    sim = simulate(SimulationConfig(seed=0))
    config = CryosamConfig(segmenter=SegmenterConfig(name="threshold"),
                           propagation=PropagationConfig(target="membrane"))
    result = CryoSAM(config).segment(sim.volume, sim.membrane_clicks, voxel_size=sim.voxel_size)
    m = mask_metrics(result.semantic > 0, sim.membrane)
    print(f"{len(sim.membrane_clicks)} clicks → Dice {m.dice:.2f}, IoU {m.iou:.2f}")


if __name__ == "__main__":
    main()
