"""Segment a tomogram from one click with the Python API, then score the picks.

Run: python examples/segment_python_api.py [OUT_DIR]

It simulates a tomogram (so it runs anywhere, offline), segments it with the weight-free
backends, writes the usual outputs and prints precision/recall/F1 against the truth. For your
own data, replace the simulation with a path to your tomogram and your clicks file, and use
the default DINOv2 + SAM backends once `cryosam weights download` has fetched their weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cryosam
from cryosam import CryoSAM, CryosamConfig, EncoderConfig, SegmenterConfig
from cryosam.metrics import evaluate_picks
from cryosam.simulate import SimulationConfig, simulate, write_simulation


def main(out_dir: Path) -> None:
    """Simulate a tomogram into ``out_dir``, segment it through the API and print picks."""
    sim = simulate(SimulationConfig(shape=(64, 160, 160), seed=1))
    files = write_simulation(sim, out_dir / "data", overwrite=True)

    config = CryosamConfig(
        encoder=EncoderConfig(name="filterbank"),  # "dinov2" with weights
        segmenter=SegmenterConfig(name="threshold"),  # "sam" with weights
        device="auto",
    )
    model = CryoSAM(config)  # keeps its models for further calls
    result = model.segment(files["tomo.mrc"], files["prompt.csv"],
                           cache_dir=out_dir / "feature_cache")
    written = cryosam.write_outputs(result, out_dir / "tomo_cryosam", overwrite=True)
    print(f"{len(result.picks_zyx)} picks; outputs: {', '.join(sorted(written))}")

    truth = sim.points(sim.target_kind)
    ev = evaluate_picks(result.picks_zyx, truth, sim.target_radius, scores=result.pick_scores)
    print(f"precision {ev.precision:.2f}  recall {ev.recall:.2f}  F1 {ev.f1:.2f}")
    cut = result.record["score"]["cut"]  # picks.csv holds the picks at or above it
    print(f"score cut {cut['threshold']:.3g} ({cut['method']}); {len(result.below_cut)} "
          "match(es) below it, in picks_below_cut.csv")

    # a click on something NOT to pick (here the first distractor, a blob or a filament;
    # z, y, x voxels)
    blob = next(p for p in sim.particles if p.kind != sim.target_kind)
    cleaner = model.segment(files["tomo.mrc"], files["prompt.csv"],
                            negative_points=[list(blob.zyx)], cache_dir=out_dir / "feature_cache")
    print(f"with one negative click ({blob.kind}): {len(cleaner.picks_zyx)} picks; candidate "
          f"matches it dropped, not all of which would have been picks: "
          f"{cleaner.record['negatives']['dropped']}")

    # a second query on the same tomogram reuses the cached features: five clicks this time
    five = model.segment(files["tomo.mrc"], files["prompts5.csv"],
                         cache_dir=out_dir / "feature_cache")
    ev5 = evaluate_picks(five.picks_zyx, truth, sim.target_radius)
    print(f"five clicks: F1 {ev5.f1:.2f} (features from cache: "
          f"{five.record['features']['cache_hit']})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("cryosam_api_example"))
