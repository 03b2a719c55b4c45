"""Cross-plane self-prompting: masks on simulated tomograms, stops, border points, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosam.config import PropagationConfig, SegmenterConfig
from cryosam.errors import InputError
from cryosam.instance_mask import InstanceMask
from cryosam.propagation import propagate
from cryosam.segmenters.sam import SamSegmenter
from cryosam.segmenters.threshold import ThresholdSegmenter
from cryosam.simulate import SimulationConfig, simulate
from cryosam.testing import tiny_sam

torch.set_num_threads(2)


def _thr() -> ThresholdSegmenter:
    return ThresholdSegmenter(SegmenterConfig(name="threshold"))


@pytest.fixture(scope="module")
def sims():
    return [simulate(SimulationConfig(seed=s)) for s in (0, 1)]


def _ious(sim, result) -> np.ndarray:
    out = []
    for pid, inst in zip(sim.ids(sim.target_kind), result.instances, strict=True):
        out.append(inst.iou(InstanceMask.from_dense(sim.labels == pid)))
    return np.array(out)


def test_instance_mask_sparse_ops():
    dense = np.zeros((6, 7, 8), bool)
    dense[1:3, 2:5, 3:4] = True
    dense[4, 6, 7] = True
    inst = InstanceMask.from_dense(dense)
    assert inst.offset == (1, 2, 3) and inst.mask.shape == (4, 5, 5)
    assert inst.n_voxels == 7 and inst.bbox == ((1, 2, 3), (5, 7, 8))
    np.testing.assert_array_equal(inst.coords(), np.argwhere(dense))
    np.testing.assert_allclose(inst.centroid(), np.argwhere(dense).mean(0))
    labels = np.zeros((6, 7, 8), np.int16)
    inst.paste(labels, 5)
    assert set(np.unique(labels)) == {0, 5} and (labels == 5).sum() == 7
    other = InstanceMask.from_dense(dense & (np.arange(8) < 7)[None, None, :])
    assert inst.iou(other) == pytest.approx(6 / 7)
    assert inst.iou(InstanceMask.empty()) == 0.0


def test_one_click_per_target_matches_true_masks(sims):
    ious = np.concatenate([_ious(sim, propagate(sim.volume, sim.points(sim.target_kind),
                                                _thr(), PropagationConfig())) for sim in sims])
    assert len(ious) >= 40
    assert ious.mean() >= 0.6, ious


def test_every_direction_contributes(sims):
    sim = sims[0]
    pts = sim.points(sim.target_kind)[:6]
    full = propagate(sim.volume, pts, _thr(), PropagationConfig())
    for d in ("+z", "-x"):
        one = propagate(sim.volume, pts, _thr(), PropagationConfig(directions=(d,)))
        for a, b in zip(full.instances, one.instances, strict=True):
            assert b.n_voxels < a.n_voxels
            assert a.iou(b) * a.n_voxels == pytest.approx(b.n_voxels)  # b is inside a
    assert set(full.stats["chain_lengths"]) == {"+z", "-z", "+y", "-y", "+x", "-x"}
    assert all(v > 0 for v in full.stats["chain_lengths"].values())


def test_iou_stop_and_area_cap(sims):
    sim = sims[0]
    pts = sim.points(sim.target_kind)[:5]
    never = propagate(sim.volume, pts, _thr(), PropagationConfig(iou_threshold=1.01))
    assert set(never.stats["stop_reasons"]) <= {"iou", "empty", "border"}
    assert never.stats["stop_reasons"].get("iou", 0) > 0
    assert sum(never.stats["chain_lengths"].values()) == 0  # only the three first planes
    normal = propagate(sim.volume, pts, _thr(), PropagationConfig())
    for a, b in zip(normal.instances, never.instances, strict=True):
        assert b.n_voxels < a.n_voxels
    cap = 30
    capped = propagate(sim.volume, pts, _thr(),
                       PropagationConfig(max_area=cap, directions=("+z", "-z")))
    for inst in capped.instances:
        per_slice = inst.mask.reshape(inst.mask.shape[0], -1).sum(1)
        assert per_slice.max(initial=0) <= cap
    # the default cap comes from the first masks: a tight factor binds (stops or shrinks)
    tight = propagate(sim.volume, pts, _thr(), PropagationConfig(area_factor=0.6))
    assert sum(i.n_voxels for i in tight.instances) < sum(i.n_voxels for i in normal.instances)


def test_points_at_the_border_and_outside():
    sim = simulate(SimulationConfig(shape=(32, 48, 56), seed=3, membrane=False, n_filaments=0))
    d, h, w = sim.volume.shape
    pts = np.array([[0, 0, 0], [d - 1, h - 1, w - 1], [0, h / 2, w - 1], [-0.4, 3, 55.4]])
    res = propagate(sim.volume, pts, _thr(), PropagationConfig())
    assert len(res.instances) == 4 and res.confidence.shape == (4,)
    for inst in res.instances:
        lo, hi = inst.bbox
        if inst.n_voxels:
            assert min(lo) >= 0 and np.all(np.asarray(hi) <= (d, h, w))
    with pytest.raises(InputError, match="outside"):
        propagate(sim.volume, np.array([[d + 1.0, 0, 0]]), _thr())
    with pytest.raises(InputError):
        propagate(sim.volume[0], np.array([[0.0, 0, 0]]), _thr())
    empty = propagate(sim.volume, np.zeros((0, 3)), _thr())
    assert empty.instances == [] and empty.confidence.shape == (0,)


def test_membrane_target_follows_the_sheet():
    sim = simulate(SimulationConfig(seed=0))
    res = propagate(sim.volume, sim.membrane_clicks[:2], _thr(),
                    PropagationConfig(target="membrane"))
    for inst in res.instances:
        dense = inst.to_dense(sim.volume.shape)
        assert dense.sum() > 2000  # far bigger than any particle: it spread along the sheet
        assert (dense & sim.membrane).sum() / dense.sum() > 0.5


def test_batched_equals_one_at_a_time_with_far_fewer_calls(sims):
    pts = sims[1].points()  # every particle of every kind
    sim = sims[1]
    assert len(pts) >= 50
    batched = propagate(sim.volume, pts, _thr(), PropagationConfig())
    single = propagate(sim.volume, pts, _thr(), PropagationConfig(batched=False))
    for a, b in zip(batched.instances, single.instances, strict=True):
        assert a.offset == b.offset and np.array_equal(a.mask, b.mask)
    assert single.stats["decoder_calls"] == single.stats["prompts"] == batched.stats["prompts"]
    assert batched.stats["decoder_calls"] < single.stats["decoder_calls"]
    assert batched.stats["slices_encoded"] == batched.stats["distinct_slices_visited"]


def test_tiny_sam_batched_propagation_counts():
    """The real SAM path (random weights): >= 50 particles, every prompt of a step in as few
    decoder passes as the batch size allows, every slice encoded once."""
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((12, 28, 36)).astype(np.float32)
    pts = rng.uniform([0, 0, 0], [11, 27, 35], size=(50, 3))
    seg = SamSegmenter(tiny_sam(img_size=256), "cpu",
                       SegmenterConfig(decoder_batch_size=128, encoder_batch_size=16))
    cfg = PropagationConfig(iou_threshold=0.0, max_area=10**9, max_steps=2)
    res = propagate(vol, pts, seg, cfg)
    st = res.stats
    assert len(res.instances) == 50 and all(i.n_voxels > 0 for i in res.instances)
    assert st["decoder_calls"] <= st["distinct_slices_visited"]
    assert st["prompts"] >= 10 * st["decoder_calls"]  # vs one call per particle per slice
    assert st["slices_encoded"] == st["distinct_slices_visited"]  # no slice encoded twice
    # one particle at a time gives the same masks (up to float noise)
    few = pts[:2]
    small = PropagationConfig(iou_threshold=0.0, max_area=10**9, max_steps=1)
    again = propagate(vol, few, SamSegmenter(tiny_sam(img_size=256), "cpu"), small)
    one = propagate(vol, few, SamSegmenter(tiny_sam(img_size=256), "cpu"),
                    PropagationConfig(iou_threshold=0.0, max_area=10**9, max_steps=1,
                                      batched=False))
    assert one.stats["decoder_calls"] == one.stats["prompts"]
    for a, b in zip(again.instances, one.instances, strict=True):
        assert a.iou(b) > 0.95


def test_instance_union_holds_both_masks() -> None:
    a = InstanceMask((2, 3, 4), np.ones((2, 2, 2), bool))
    b = InstanceMask((3, 3, 7), np.ones((1, 1, 3), bool))
    u = a.union(b)
    shape = (8, 8, 12)
    np.testing.assert_array_equal(u.to_dense(shape), a.to_dense(shape) | b.to_dense(shape))
    assert u.n_voxels == 8 + 3 - 0
    assert a.union(InstanceMask.empty()) is a
