"""Where does the weight-free path lose with one click on the crowded preset?

For every kind and seed, the copy ``cryosam bench accuracy`` clicks is segmented and turned
into a query exactly as ``cryosam segment`` does. Then every other particle of the scene is
ranked, given what no picker has (every particle's true centre, nothing else to rank), by
one part of the path at a time:

- ``features``: the encoder's features at the true centres, cosine similarity with the query
  (turned about the beam axis too, as matching scores it): what matching can tell apart;
- ``density``: the score's density description (:mod:`cryosam.score`) at the true centres,
  correlated with the click's: what the density term can tell apart.

Beside them, the pipeline's own run: best F1 over cuts of every scored match, and ``found``,
the share of the kind's copies among its matches at all. Best F1 counts the click as found,
like ``cryosam bench accuracy``; with 12 copies a kind's F1 moves in steps of about 0.05.

    python docs/benchmarks/losses.py --seeds 0,1,2 --snr 0.5
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from cryosam import backends, matching, score, stages
from cryosam.benchmarks.accuracy import _crowded_run
from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
from cryosam.errors import InputError
from cryosam.metrics import mean_per_kind, ranked_metrics
from cryosam.pipeline import CryoSAM
from cryosam.simulate import SimulationConfig, simulate
from cryosam.simulate.crowded import CROWDED_KINDS, kind_clicks

PARTS = ("features", "density", "pipeline", "found")


def weight_free_model() -> CryoSAM:
    """The configuration ``cryosam bench accuracy`` measures (mean query, turns on)."""
    return CryoSAM(CryosamConfig(
        encoder=EncoderConfig(name=backends.weight_free("encoder")),
        segmenter=SegmenterConfig(name=backends.weight_free("segmenter")), device="cpu"))


def scene_losses(model: CryoSAM, seed: int, snr: float, shape: tuple[int, int, int],
                 cache_dir: str, pipeline: bool = True) -> dict[str, dict[str, float]]:
    """Per part (``PARTS``), per kind: best F1 (``found``: recall) on one scene; kinds
    whose click gives no mask are left out of ``features`` and ``density``."""
    cfg = model.config
    sim = simulate(SimulationConfig(shape=shape, seed=seed, snr=snr, preset="crowded"))
    pos = np.array([p.zyx for p in sim.particles])
    kinds = np.array([p.kind for p in sim.particles])
    out: dict[str, dict[str, float]] = {p: {} for p in PARTS}
    for kind in CROWDED_KINDS:
        click = kind_clicks(sim, kind, 1)
        if pipeline:
            row, _ = _crowded_run(model, sim, kind, 1, cache_dir=cache_dir)
            out["pipeline"][kind], out["found"][kind] = row[3], row[5]
        inputs = stages.load_inputs(sim.volume, click, voxel_size=sim.voxel_size)
        volume = stages.normalise(inputs.tomogram, cfg.propagation)
        found = stages.probe(volume, inputs, cfg)
        work = stages.prepare(volume, inputs.tomogram.data, inputs, found, cfg,
                              encoder_dark=True, segmenter_dark=True)  # weight-free: dark
        try:
            clicks = stages.segment_clicks(work, model.segmenter, cfg.propagation, found)
        except InputError:  # the click looks like background: nothing to rank with
            continue
        features = stages.compute_features(work, model.encoder, cfg, model.device, cache_dir)
        query = stages.build_query(features, clicks, cfg, factor=work.factor)
        refs = stages.references_of(work, clicks.masks, cfg)
        ci = int(np.argmin(np.linalg.norm(pos - click[0], axis=1)))
        others = np.array([i for i in range(len(pos)) if i != ci])
        centres = pos[others] / work.factor
        parts = {
            "features": matching.similarity(features.volume, centres,
                                            query.matched(cfg.matching.turns).vectors),
            "density": np.array([float(np.dot(refs.density, score.density_description(
                work.segmenter_volume, c, refs.reach))) / len(refs.density)
                for c in centres]),
        }
        ranked = pos[np.r_[ci, others]]  # the click first: found, as bench accuracy counts it
        for part, values in parts.items():
            out[part][kind] = ranked_metrics(ranked, np.r_[values.max() + 1.0, values],
                                             pos[kinds == kind], radius=0.5).best_f1
    return out


def losses(seeds: list[int], snr: float, shape: tuple[int, int, int],
           pipeline: bool = True) -> dict[str, dict[str, float]]:
    """Per part, per kind: the mean over ``seeds``, and the mean over kinds."""
    model = weight_free_model()
    with tempfile.TemporaryDirectory(prefix="cryosam-losses-") as cache:  # features once
        runs = [scene_losses(model, s, snr, shape, cache, pipeline) for s in seeds]
    return mean_per_kind(runs, PARTS, CROWDED_KINDS)


def main() -> None:
    """Parse the options, rank each kind's copies by each part and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--shape", default="64,160,160")
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    res = losses([int(v) for v in a.seeds.split(",")], a.snr, shape)  # type: ignore[arg-type]
    kinds = [k for k in CROWDED_KINDS if k in res["pipeline"]]
    print(f"best F1 (found: recall), one click; SNR {a.snr:g}, {a.shape}, seeds {a.seeds}")
    print(f"{'ranked by':22s}" + "".join(f"{k[:10]:>11s}" for k in kinds) + f"{'mean':>8s}")
    names = {"features": "features, true centres", "density": "density, true centres",
             "pipeline": "the pipeline's matches", "found": "found by the pipeline"}
    for part, values in res.items():
        print(f"{names[part]:22s}" + "".join(f"{values[k]:11.2f}" if k in values
                                             else f"{'-':>11s}" for k in kinds)
              + f"{values['mean']:8.3f}")


if __name__ == "__main__":
    main()
