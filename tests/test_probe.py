"""Polarity and size from the clicks, internal binning and its exact way back, threads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
from cryosam.device import resolve_threads
from cryosam.instance_mask import InstanceMask
from cryosam.normalise import normalise_volume
from cryosam.pipeline import CryoSAM
from cryosam.probe import bin_factor, probe_clicks
from cryosam.rescale import bin_volume, from_binned, to_binned, upsample_labels, upsample_mask
from cryosam.simulate import SimulationConfig, simulate


@pytest.fixture(scope="module")
def scenes():
    base = dict(shape=(40, 96, 112), seed=3)
    return {"dark": simulate(SimulationConfig(**base)),
            "bright": simulate(SimulationConfig(**base, invert=True)),
            "fine": simulate(SimulationConfig(**base, zoom=2))}


def test_polarity_and_size_from_the_clicks(scenes) -> None:
    dark = probe_clicks(normalise_volume(scenes["dark"].volume), scenes["dark"].prompt_points)
    bright = probe_clicks(normalise_volume(scenes["bright"].volume),
                          scenes["bright"].prompt_points)
    fine = probe_clicks(normalise_volume(scenes["fine"].volume), scenes["fine"].prompt_points)
    assert dark.polarity == "dark" and bright.polarity == "bright"
    assert dark.votes["dark"] == len(dark.responses) and bright.votes["bright"] > 0
    r = scenes["dark"].target_radius
    assert 0.75 * r <= dark.radius <= 1.25 * r
    assert fine.radius == pytest.approx(2 * dark.radius, rel=0.2)  # the same scene, 2x finer


def test_given_polarity_and_diameter_win(scenes) -> None:
    vol = normalise_volume(scenes["dark"].volume)
    got = probe_clicks(vol, scenes["dark"].prompt_points[:1], polarity="bright", radius=30.0)
    assert (got.polarity, got.polarity_source) == ("bright", "given")
    assert (got.radius, got.radius_source) == (30.0, "diameter")
    assert got.votes["dark"] == 1  # the evidence is still recorded


@pytest.mark.parametrize(("radius", "factor"), [(None, 1), (3.0, 1), (12.0, 1), (13.0, 2),
                                                (20.0, 3), (40.0, 5)])
def test_bin_factor(radius, factor) -> None:
    assert bin_factor(radius) == factor


def test_binning_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    vol = rng.random((7, 10, 9)).astype(np.float32)
    small = bin_volume(vol, 2)
    assert small.shape == (4, 5, 5)
    assert small[0, 0, 0] == pytest.approx(vol[:2, :2, :2].mean())
    # edge blocks repeat the last voxel (z 6 and x 8 twice; y 8-9 are both real)
    assert small[3, 4, 4] == pytest.approx(vol[6, 8:10, 8].mean())
    pts = rng.random((5, 3)) * 6
    np.testing.assert_allclose(from_binned(to_binned(pts, 3), 3), pts)
    # a binned voxel becomes its block; crops stay inside the input
    mask = InstanceMask((3, 4, 4), np.ones((1, 1, 1), bool))
    up = upsample_mask(mask, 2, vol.shape)
    assert up.offset == (6, 8, 8) and up.mask.shape == (1, 2, 1)
    labels = np.arange(4 * 5 * 5, dtype=np.int16).reshape(4, 5, 5)
    full = upsample_labels(labels, 2, vol.shape)
    assert full.shape == vol.shape and full[5, 9, 3] == labels[2, 4, 1]


def _weight_free(**kw) -> CryosamConfig:
    return CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                         segmenter=SegmenterConfig(name="threshold"), device="cpu", **kw)


def test_bright_tomogram_picks_like_the_dark_one(scenes) -> None:
    dark, bright = scenes["dark"], scenes["bright"]
    a = CryoSAM(_weight_free()).segment(dark.volume, dark.prompt_points[:1],
                                        voxel_size=dark.voxel_size)
    b = CryoSAM(_weight_free()).segment(bright.volume, bright.prompt_points[:1],
                                        voxel_size=bright.voxel_size)
    np.testing.assert_allclose(b.picks_zyx, a.picks_zyx, atol=1.0)
    assert b.record["probe"]["polarity"] == "bright"
    assert b.record["work"]["flipped"] == {"segmenter": True, "encoder": True}


def test_binned_run_maps_every_output_to_the_input_grid(scenes, tmp_path) -> None:
    fine = scenes["fine"]
    res = CryoSAM(_weight_free(binning=2)).segment(fine.volume, fine.prompt_points[:1],
                                                   voxel_size=fine.voxel_size)
    assert res.record["work"]["binning"] == 2
    assert res.labels.shape == fine.volume.shape == res.semantic.shape
    assert len(res.picks_zyx) >= 2
    for pick, label in zip(res.picks_zyx, res.pick_instance_ids, strict=True):
        voxels = np.argwhere(res.labels == label)
        np.testing.assert_allclose(voxels.mean(0), pick, atol=0.5)  # picks = instances.mrc
    truth = fine.points(fine.target_kind)
    nearest = np.min(np.linalg.norm(truth[None] - res.picks_zyx[:, None], axis=2), axis=1)
    assert np.median(nearest) < 0.5 * fine.target_radius
    json.dumps(res.record["work"])  # plain JSON


def test_threads_default_respects_the_job(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert resolve_threads() == 3
    assert resolve_threads(5) == 5
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    import os

    assert resolve_threads() == len(os.sched_getaffinity(0))


def test_nms_radius_is_in_the_input_voxels_when_binned(scenes) -> None:
    fine = scenes["fine"]
    given = 12.0  # input voxels, like the clicks
    cfg = _weight_free(binning=2)
    cfg = dataclasses.replace(cfg, matching=dataclasses.replace(cfg.matching, nms_radius=given))
    res = CryoSAM(cfg).segment(fine.volume, fine.prompt_points[:1], voxel_size=fine.voxel_size)
    assert res.record["work"]["binning"] == 2
    assert res.record["matching"]["nms_radius"] == pytest.approx(given)
    assert res.record["matching"]["nms_radius_work_voxels"] == pytest.approx(given / 2)
    props = res.proposals_zyx
    assert len(props) >= 2
    gaps = np.linalg.norm(props[:, None] - props[None], axis=2)[np.triu_indices(len(props), 1)]
    assert gaps.min() >= given - 2.0  # NMS on the work grid, measured on the input's


def test_max_area_is_in_the_input_voxels_when_binned() -> None:
    from cryosam.pipeline import _prop_cfg

    cfg = _weight_free()
    cfg = dataclasses.replace(cfg, propagation=dataclasses.replace(cfg.propagation,
                                                                   max_area=401))
    assert _prop_cfg(cfg, 1).max_area == 401
    assert _prop_cfg(cfg, 2).max_area == 101  # a binned voxel is 2 x 2 input pixels a slice
    assert _prop_cfg(cfg, 2).normalise is False
    assert _prop_cfg(_weight_free(), 2).max_area is None  # from the masks, on the work grid
