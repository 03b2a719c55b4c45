"""SAM's candidate choice during propagation, checked with a scripted decoder whose candidates
are known, and with the tiny real SAM: overlap with the previous slice first, predicted IoU
second, stop only when no candidate is left; token 0 only with a mask prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosam.config import PropagationConfig
from cryosam.propagation import propagate
from cryosam.segmenters.base import PromptBatch
from cryosam.segmenters.sam import SamSegmenter

H = W = 48


def _disk(r0: float, c0: float, rad: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - r0) ** 2 + (xx - c0) ** 2 <= rad**2


class ScriptedSam(SamSegmenter):
    """The real selection code; the decoder returns the candidates a test scripts."""

    def __init__(self, sam, candidates: list[np.ndarray], predicted: list[float]) -> None:
        super().__init__(sam, "cpu")
        self.candidates = candidates  # 4 slice masks: SAM's tokens 0..3
        self.predicted = predicted  # their predicted IoUs

    def decode(self, embeddings, coords, mask_inputs, has_mask, all_tokens=False):
        geom = self.geometry(H, W)
        low = geom.masks_to_lowres(torch.as_tensor(np.stack(self.candidates)))[:, 0]
        b = coords.shape[0]
        logits = low[None].expand(b, -1, -1, -1).clone()
        iou = torch.tensor(self.predicted, dtype=torch.float32)[None].expand(b, -1).clone()
        return (logits, iou) if all_tokens else (logits[:, 1:], iou[:, 1:])


@pytest.fixture()
def slice_seg(tiny_sam_model):
    def make(candidates, predicted):
        seg = ScriptedSam(tiny_sam_model, candidates, predicted)
        seg.set_slice("z", 0, np.zeros((H, W), np.float32))
        return seg
    return make


PREV = _disk(24, 24, 8)
NEAR = _disk(24, 25, 8)  # IoU with PREV ~0.9
HALF = _disk(24, 30, 8)  # IoU ~0.4
FAR = _disk(10, 10, 5)  # IoU 0
BIG = _disk(24, 24, 20)  # contains PREV, IoU ~0.16


def _one(seg, prev=PREV, min_iou=0.5, cap=None):
    batch = PromptBatch("z", 0, np.array([[24.0, 24.0]]),
                        prev_masks=None if prev is None else prev[None],
                        max_area=None if cap is None else np.array([cap]), min_iou=min_iou)
    return seg.segment_batch([batch])[0]


def test_overlap_first_then_predicted_iou(slice_seg) -> None:
    # the best predicted candidate (BIG) fails the overlap; of the two that pass, the better
    # predicted one wins
    seg = slice_seg([HALF, BIG, NEAR, FAR], [0.2, 0.99, 0.6, 0.9])
    res = _one(seg)
    assert np.array_equal(res.masks[0], NEAR) and res.confidence[0] == pytest.approx(0.6)
    assert not res.rejected[0]


def test_token_zero_is_a_fourth_candidate_with_a_mask_prompt(slice_seg) -> None:
    seg = slice_seg([NEAR, FAR, HALF, BIG], [0.7, 0.95, 0.9, 0.99])
    res = _one(seg)
    assert np.array_equal(res.masks[0], NEAR)  # only token 0 overlaps PREV enough


def test_token_zero_is_not_offered_for_a_lone_point(slice_seg) -> None:
    seg = slice_seg([NEAR, FAR, HALF, BIG], [0.99, 0.1, 0.5, 0.2])
    res = _one(seg, prev=None, min_iou=None)
    assert not np.array_equal(res.masks[0], NEAR)
    assert np.array_equal(res.masks[0], HALF)  # touches the point, best of tokens 1-3


def test_no_candidate_left_gives_an_empty_mask_and_a_reason(slice_seg) -> None:
    seg = slice_seg([FAR, BIG, HALF, FAR], [0.9, 0.99, 0.8, 0.7])
    res = _one(seg)
    assert not res.masks[0].any() and res.confidence[0] == 0 and res.rejected[0]


def test_area_cap_applies_among_overlapping_candidates(slice_seg) -> None:
    seg = slice_seg([NEAR, BIG, PREV, FAR], [0.5, 0.99, 0.6, 0.9])
    res = _one(seg, cap=float(PREV.sum()))
    assert np.array_equal(res.masks[0], PREV)


def test_propagation_stops_a_chain_only_when_no_candidate_is_left(tiny_sam_model) -> None:
    """With the tiny random SAM, every accepted step overlaps its predecessor by >= tau, and
    chains end by the IoU rule (recorded as such), the border or the step cap."""
    rng = np.random.default_rng(0)
    vol = rng.random((12, 40, 40)).astype(np.float32)
    seg = SamSegmenter(tiny_sam_model, "cpu")
    res = propagate(vol, np.array([[6.0, 20.0, 20.0]]), seg,
                    PropagationConfig(iou_threshold=0.5, max_steps=4, normalise=False))
    # random weights: after the first step no candidate overlaps enough, and that is what the
    # record says (not "empty": the candidates were there, none was acceptable)
    assert res.stats["stop_reasons"] == {"iou": 4}
    assert res.instances[0].n_voxels > 0
