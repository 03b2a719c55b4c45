"""Slice segmenters: SAM geometry and batched decoding (tiny random SAM), the weight-free one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosam.config import SegmenterConfig
from cryosam.device import CPU_CACHE_MB, cache_budget_mb, hold_gpu_share
from cryosam.errors import CryosamError, InputError, MissingWeightsError
from cryosam.segmenters import PromptBatch, Segmenter, build_segmenter
from cryosam.segmenters.base import ByteLRU, slice_of, to_slice, to_volume
from cryosam.segmenters.sam import SamGeometry, SamSegmenter
from cryosam.segmenters.threshold import ThresholdSegmenter

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def sam256(tiny_sam_model):
    return tiny_sam_model


def _disk(h: int, w: int, r0: float, c0: float, rad: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - r0) ** 2 + (xx - c0) ** 2 <= rad**2


def test_slice_coordinates_round_trip():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    zyx = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 0.0]])
    for axis in "zyx":
        idx, rc = to_slice(zyx, axis)
        np.testing.assert_array_equal(to_volume(idx, rc, axis), zyx)
        for (i, (r, c)), p in zip(zip(idx, rc, strict=True), zyx, strict=True):
            assert slice_of(vol, axis, int(i))[int(r), int(c)] == vol[tuple(p.astype(int))]


def test_geometry_non_square_points_and_padding():
    g = SamGeometry(48, 80, 1024, 256)
    nh, nw = g.input_hw
    assert (nh, nw) == (614, 1024)  # 48 * 1024 / 80 = 614.4, long side 1024
    xy = g.points_to_input(np.array([[0, 0], [47, 79], [23.5, 39.5]]))
    # pixel centres: (c + 0.5) * nw / w, minus SAM's own +0.5
    np.testing.assert_allclose(xy[0], [0.5 * 1024 / 80 - 0.5, 0.5 * 614 / 48 - 0.5])
    np.testing.assert_allclose(xy[2] + 0.5, [nw / 2, nh / 2])
    assert xy[1, 0] < nw and xy[1, 1] < nh  # last pixel stays inside the unpadded region
    # a slice mask becomes a mask prompt in the top-left (nh/4 x nw/4) of the low-res grid
    mask = np.ones((48, 80), bool)
    low = g.masks_to_lowres(torch.as_tensor(mask)[None])[0, 0].numpy()
    valid_rows = int(np.ceil(nh * 256 / 1024))
    assert (low[: valid_rows - 1] > 0).all()
    assert (low[valid_rows + 1 :] < 0).all()  # the bottom padding is outside


@pytest.mark.parametrize("hw", [(48, 80), (80, 48), (60, 150), (200, 200), (7, 1000)])
def test_geometry_matches_segment_anythings_resize_longest_side(hw):
    """SamGeometry mirrors segment-anything 1.0's ResizeLongestSide (sizes and coordinates)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = hw
    g = SamGeometry(h, w, 1024, 256)
    resize = ResizeLongestSide(1024)
    assert g.input_hw == resize.get_preprocess_shape(h, w, 1024)
    rc = np.array([[0.0, 0.0], [h - 1, w - 1], [h / 3, w / 5]])
    # SAM's coords are continuous (x, y) scaled by new/old; ours map pixel centres, which SAM's
    # prompt encoder then shifts by +0.5: the two agree on the centre of every pixel
    theirs = resize.apply_coords(rc[:, ::-1] + 0.5, (h, w))
    np.testing.assert_allclose(g.points_to_input(rc) + 0.5, theirs, rtol=1e-6)


def test_geometry_mask_round_trip_and_point_agreement():
    g = SamGeometry(60, 150, 1024, 256)
    disk = _disk(60, 150, 20, 100, 9)
    low = g.masks_to_lowres(torch.as_tensor(disk)[None])
    back = g.logits_to_slice(low)[0, 0].numpy() > 0
    iou = (back & disk).sum() / (back | disk).sum()
    assert iou > 0.9
    # the disk's centre in the low-res grid is where the point map puts it
    centre = np.argwhere(low[0, 0].numpy() > 0).mean(0)
    expect = g.slice_to_lowres(np.array([[20.0, 100.0]]))[0]
    assert np.abs(centre - expect).max() <= 0.5


def test_tiny_sam_encoder_pads_bottom_right(sam256):
    seg = SamSegmenter(sam256, "cpu")
    img = np.random.default_rng(0).random((20, 50)).astype(np.float32)
    seg.set_slice("z", 0, img)
    embs = seg._encode("z", [0])
    assert embs[0].shape == (32, 16, 16)
    # the same input built by hand (resize, normalise, pad bottom/right) gives the same output
    nh, nw = seg.geometry(20, 50).input_hw
    x = torch.nn.functional.interpolate(torch.as_tensor(img)[None, None] * 255, (nh, nw),
                                        mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
    ref = sam256.image_encoder(sam256.preprocess(x))[0]
    torch.testing.assert_close(embs[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_mask", [False, True])
def test_batched_decode_matches_sam_mask_decoder(sam256, with_mask):
    seg = SamSegmenter(sam256, "cpu")
    emb = torch.randn(1, 32, 16, 16)
    b = 5
    coords = torch.rand(b, 2) * 256
    masks = torch.randn(b, 1, 64, 64) if with_mask else None
    with torch.inference_mode():
        low, iou = seg.decode(emb.expand(b, -1, -1, -1), coords, masks,
                              torch.ones(b, dtype=torch.bool) if with_mask else None)
        labels = torch.ones(b, 1, dtype=torch.int)
        sparse, dense = sam256.prompt_encoder(points=(coords[:, None], labels), boxes=None,
                                              masks=masks)
        ref_low, ref_iou = sam256.mask_decoder(emb, sam256.prompt_encoder.get_dense_pe(), sparse,
                                               dense, multimask_output=True)
    torch.testing.assert_close(low, ref_low, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-4, rtol=1e-4)


def test_sam_segment_shapes_counters_and_cache(sam256):
    seg = SamSegmenter(sam256, "cpu", SegmenterConfig(decoder_batch_size=64))
    assert isinstance(seg, Segmenter)
    seg.set_slice("y", 3, np.random.default_rng(1).random((24, 70)).astype(np.float32))
    pts = np.array([[0, 0], [23, 69], [12, 35], [5, 60]], float)  # corners included
    res = seg.segment("y", 3, pts)
    assert res.masks.shape == (4, 24, 70) and res.masks.dtype == bool
    assert res.confidence.shape == (4,) and np.all((res.confidence >= 0) & (res.confidence <= 1))
    assert res.logits.shape == (4, 64, 64)
    assert res.points.shape == (4, 2)
    assert np.all(res.points >= 0) and np.all(res.points < [24, 70])
    assert (seg.encoder_calls, seg.decoder_calls) == (1, 1)  # 4 prompts, one decoder pass
    res2 = seg.segment("y", 3, pts[:2], prev_logits=res.logits[:2])
    assert seg.encoder_calls == 1 and seg.slices_encoded == 1  # embedding reused
    assert seg.decoder_calls == 2 and res2.masks.shape == (2, 24, 70)
    seg.segment("y", 3, pts[:2], prev_masks=res.masks[:2])  # a mask prompt from binary masks
    assert seg.decoder_calls == 3


def test_mask_pixel_counts_are_exact() -> None:
    from cryosam.segmenters.sam import _count

    masks = torch.rand(3, 4, 70, 90) > 0.3
    counts = _count(masks.flatten(2))
    assert counts.dtype == torch.float32
    assert torch.equal(counts, masks.flatten(2).sum(-1).float())
    assert _count(torch.ones(1, 512 * 512, dtype=torch.bool)).item() == 512 * 512


def test_sam_one_decoder_pass_across_slices_equals_separate_calls(sam256):
    rng = np.random.default_rng(2)
    vol = rng.random((12, 20, 30)).astype(np.float32)
    batches = [PromptBatch("z", 4, np.array([[3.0, 5.0], [10.0, 20.0]])),
               PromptBatch("x", 7, np.array([[6.0, 15.0]])),
               PromptBatch("y", 0, np.array([[11.0, 29.0]]))]
    seg = SamSegmenter(sam256, "cpu")
    seg.set_volume(vol)
    together = seg.segment_batch(batches)
    assert seg.decoder_calls == 1 and seg.slices_encoded == 3
    assert [r.masks.shape for r in together] == [(2, 20, 30), (1, 12, 20), (1, 12, 30)]
    alone = SamSegmenter(sam256, "cpu")
    alone.set_volume(vol)
    for b, r in zip(batches, together, strict=True):
        s = alone.segment(b.axis, b.index, b.points)
        assert (s.masks != r.masks).mean() < 1e-3
        np.testing.assert_allclose(s.confidence, r.confidence, atol=1e-4)
    assert alone.decoder_calls == 3


def test_sam_mixed_mask_prompts_in_one_pass_equal_separate_calls(sam256):
    """Prompts with previous logits, with previous masks only, and with neither share one
    decoder pass (their mask prompts reach the device together) and come out as they do
    alone."""
    rng = np.random.default_rng(4)
    vol = rng.random((12, 20, 30)).astype(np.float32)
    seg = SamSegmenter(sam256, "cpu")
    seg.set_volume(vol)
    z = seg.segment("z", 4, np.array([[3.0, 5.0], [10.0, 20.0]]))
    x = seg.segment("x", 7, np.array([[6.0, 15.0]]))
    batches = [PromptBatch("z", 4, np.array([[3.0, 5.0], [10.0, 20.0]]), prev_logits=z.logits),
               PromptBatch("x", 7, np.array([[6.0, 15.0]]), prev_masks=x.masks),
               PromptBatch("y", 0, np.array([[11.0, 29.0]]))]
    calls = seg.decoder_calls
    together = seg.segment_batch(batches)
    assert seg.decoder_calls == calls + 1
    for b, r in zip(batches, together, strict=True):
        for k in range(len(b.points)):  # each prompt alone: a mix-up of rows shows
            one = slice(k, k + 1)
            s = seg.segment(b.axis, b.index, b.points[one],
                            prev_masks=None if b.prev_masks is None else b.prev_masks[one],
                            prev_logits=None if b.prev_logits is None else b.prev_logits[one])
            assert (s.masks[0] != r.masks[k]).mean() < 1e-3
            np.testing.assert_allclose(s.logits[0], r.logits[k], atol=1e-4)
    plain = seg.segment("x", 7, np.array([[6.0, 15.0]]))
    assert not np.allclose(plain.logits, together[1].logits, atol=1e-4)  # the mask counted


def test_sam_selection_respects_area_cap(sam256):
    seg = SamSegmenter(sam256, "cpu")
    img = np.random.default_rng(3).random((40, 40)).astype(np.float32)
    seg.set_slice("z", 0, img)
    pts = np.array([[20.0, 20.0]])
    geom = seg.geometry(40, 40)
    with torch.inference_mode():
        emb = seg.encoding("z", 0)[None]
        low, _ = seg.decode(emb, torch.as_tensor(geom.points_to_input(pts), dtype=torch.float32),
                            None, None)
        cand = (geom.logits_to_slice(low)[0] > 0).numpy()
    areas = cand.reshape(3, -1).sum(1)
    touching = cand[:, 19:22, 19:22].reshape(3, -1).any(1) & (areas > 0)
    for cap in sorted(set(areas.tolist())):
        res = seg.segment("z", 0, pts, max_area=np.array([cap]))
        if np.any(touching & (areas <= cap)):
            assert res.masks[0].sum() <= cap
            assert res.masks[0][19:22, 19:22].any()


def test_encoding_cache_budget_and_lru():
    lru = ByteLRU(100)
    lru.put("a", 1, 60)
    lru.put("b", 2, 60)
    assert "a" not in lru and lru.get("b") == 2 and lru.evictions == 1
    seg = ThresholdSegmenter(SegmenterConfig(name="threshold", embedding_cache_mb=0))
    seg.set_volume(np.random.default_rng(0).random((4, 8, 8)).astype(np.float32))
    res = seg.segment("z", 1, np.array([[4.0, 4.0]]))  # works even with no cache budget
    assert res.masks.shape == (1, 8, 8)


def test_sam_cache_counts_the_memory_it_keeps(sam256):
    """Each cached embedding owns its memory: a view into the encoder's batch kept the whole
    batch alive while one slice was counted (8x the budget on a GPU run, 32 GB for 4)."""
    seg = SamSegmenter(sam256, "cpu", SegmenterConfig(encoder_batch_size=4))
    seg.set_volume(np.random.default_rng(3).random((6, 20, 30)).astype(np.float32))
    seg.prepare([("z", i) for i in range(6)])
    assert seg.encoder_calls == 2 and seg.cache_evictions == 0
    held = 0
    for i in range(6):
        enc = seg.encoding("z", i)
        assert enc.dtype == torch.float32  # fp32 on the CPU, the decoder's precision there
        assert enc.untyped_storage().nbytes() == enc.numel() * enc.element_size()
        held += enc.untyped_storage().nbytes()
    assert seg._cache.nbytes == held
    assert seg.cache_budget_mb == CPU_CACHE_MB  # automatic, in host memory


def test_automatic_cache_budget_follows_the_device(monkeypatch):
    assert cache_budget_mb(torch.device("cpu"), None) == CPU_CACHE_MB
    assert cache_budget_mb(torch.device("cpu"), 512) == 512
    assert cache_budget_mb(torch.device("cuda"), 0) == 0  # given: no GPU query
    gib = 2**30
    mem = {"free": 30 * gib, "reserved": 6 * gib, "allocated": 6 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (mem["free"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: mem["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["allocated"])
    assert cache_budget_mb(torch.device("cuda"), None) == 10 * 1024  # a third of what is free
    mem["reserved"] = 12 * gib  # 6 GiB held unused by this process's allocator count as free
    assert cache_budget_mb(torch.device("cuda"), None) == 12 * 1024
    mem["free"] = 100 * gib
    assert cache_budget_mb(torch.device("cuda"), None) == 16 * 1024  # at most 16 GiB
    mem["free"], mem["reserved"] = 2 * gib, mem["allocated"]
    assert cache_budget_mb(torch.device("cuda"), None) == 1024  # never below 1 GiB
    mem["free"] = 30 * gib
    try:  # a batch worker holding a quarter of the GPU takes a quarter of the budget
        hold_gpu_share(0.25)
        assert cache_budget_mb(torch.device("cuda"), None) == 10 * 1024 // 4
        assert cache_budget_mb(torch.device("cuda"), 512) == 512  # a given budget stays
        with pytest.raises(ValueError, match="GPU share"):
            hold_gpu_share(0.0)
    finally:
        hold_gpu_share(1.0)
    assert cache_budget_mb(torch.device("cuda"), None) == 10 * 1024
    seg = ThresholdSegmenter(SegmenterConfig(name="threshold"))
    assert seg.cache_budget_mb == CPU_CACHE_MB  # its slices live in host memory
    for bad in (-1, "auto", 1.5):
        with pytest.raises(InputError, match="embedding_cache_mb"):
            SegmenterConfig(embedding_cache_mb=bad)


def test_replacing_a_slice_frees_its_cached_bytes():
    seg = ThresholdSegmenter(SegmenterConfig(name="threshold"))
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    seg.set_slice("z", 0, img)
    seg.segment("z", 0, np.array([[8.0, 8.0]]))
    assert seg._cache.nbytes == img.nbytes
    seg.set_slice("z", 0, img)  # a new image for the slice: its encoding is dropped
    assert seg._cache.nbytes == 0 and seg.cache_evictions == 0


def test_build_segmenter_and_missing_weights(tmp_path):
    assert isinstance(build_segmenter(SegmenterConfig(name="threshold"), "cpu"),
                      ThresholdSegmenter)
    with pytest.raises(CryosamError):
        build_segmenter(SegmenterConfig(name="nope"), "cpu")
    with pytest.raises(MissingWeightsError) as err:
        SamSegmenter.from_checkpoint(str(tmp_path / "sam_vit_b_missing.pth"), "cpu")
    assert "\n" not in str(err.value)


def _blobs_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dark disks on a lighter noisy background: two touching, one alone."""
    h, w = 64, 96
    a = _disk(h, w, 30, 30, 7)
    b = _disk(h, w, 30, 44, 7) & ~a
    c = _disk(h, w, 20, 75, 5)
    img = 0.7 - 0.4 * (a | b | c) + 0.08 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1).astype(np.float32), a, c


def test_threshold_segments_dark_disk_and_rejects_background():
    img, a, c = _blobs_image(np.random.default_rng(4))
    seg = ThresholdSegmenter(SegmenterConfig(name="threshold"))
    seg.set_slice("z", 0, img)
    res = seg.segment("z", 0, np.array([[20.0, 75.0], [55.0, 10.0]]))
    m = res.masks[0]
    assert (m & c).sum() / (m | c).sum() > 0.75
    assert c[tuple(np.rint(res.points[0]).astype(int))]  # most confident point inside
    assert res.confidence[0] > 0.5
    assert not res.masks[1].any() and res.confidence[1] == 0.0  # background: no mask
    assert seg.decoder_calls == 1 and seg.encoder_calls == 1


def test_threshold_previous_mask_keeps_touching_neighbour_out():
    img, a, _ = _blobs_image(np.random.default_rng(5))
    seg = ThresholdSegmenter(SegmenterConfig(name="threshold"))
    seg.set_slice("z", 0, img)
    free = seg.segment("z", 0, np.array([[30.0, 30.0]]))
    guided = seg.segment("z", 0, np.array([[30.0, 30.0]]), prev_masks=a[None],
                         prev_logits=free.logits)
    g = guided.masks[0]
    assert g.sum() <= free.masks[0].sum()
    assert (g & a).sum() / (g | a).sum() > 0.7


def test_threshold_morphology_matches_scipy():
    """The shifted-copy dilation/erosion and the labelling hole fill are ndimage's."""
    from scipy import ndimage

    from cryosam.segmenters.threshold import _bbox, _dilate, _erode, _fill_holes

    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = rng.integers(1, 24, 2)
        m = rng.random((h, w)) < rng.random()
        k = int(rng.integers(1, 4))
        assert np.array_equal(_dilate(m, k), ndimage.binary_dilation(m, iterations=k))
        assert np.array_equal(_erode(m), ndimage.binary_erosion(m))
        assert np.array_equal(_fill_holes(m), ndimage.binary_fill_holes(m))
        box = _bbox(m)
        if m.any():
            rows, cols = np.nonzero(m)
            assert box == ((rows.min(), rows.max()), (cols.min(), cols.max()))
        else:
            assert box is None


def test_segmenter_keeps_its_encodings_for_the_same_voxels():
    vol = np.random.default_rng(1).random((6, 16, 16)).astype(np.float32)
    seg = ThresholdSegmenter(SegmenterConfig(name="threshold"))
    seg.set_volume(vol)
    seg.prepare([("z", 2), ("y", 3)])
    assert seg.slices_encoded == 2
    for same in (vol, vol.copy()):  # the same array, or the same voxels in another
        seg.set_volume(same)
        seg.prepare([("z", 2), ("y", 3)])
        assert seg.slices_encoded == 2
    changed = vol.copy()
    changed[0, 0, 0] += 1.0
    seg.set_volume(changed)
    seg.prepare([("z", 2)])
    assert seg.slices_encoded == 3


@pytest.mark.parametrize("hw", [(14, 14), (40, 40), (37, 29)])
def test_image_attention_in_query_chunks_equals_segment_anythings(hw):
    """The image encoder's attention through SDPA, its relative-position bias built a chunk
    of query rows at a time (40x40 and 37x29: more queries than one chunk), equals
    segment-anything's own, with trained-like (non-zero) relative positions."""
    from segment_anything.modeling.image_encoder import Attention

    from cryosam.segmenters.sam import QUERY_CHUNK, _image_attention

    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, qkv_bias=True, use_rel_pos=True, input_size=hw).eval()
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    x = torch.randn(2, *hw, 32)
    with torch.inference_mode():
        ref = attn(x)
        out = _image_attention(attn, x)
    assert (hw[0] * hw[1] > QUERY_CHUNK) == (hw != (14, 14))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_sam_attention_through_sdpa_gives_the_same_masks():
    """SAM with its attention routed through F.scaled_dot_product_attention (the default)
    segments as segment-anything's own attention does."""
    from cryosam.testing import tiny_sam

    img = np.clip(0.7 - 0.4 * _disk(40, 56, 20, 28, 6), 0, 1).astype(np.float32)
    results = []
    for sdpa in (False, True):
        seg = SamSegmenter(tiny_sam(img_size=256, seed=1), "cpu", SegmenterConfig(), sdpa=sdpa)
        seg.set_slice("z", 0, img)
        results.append(seg.segment("z", 0, np.array([[20.0, 28.0], [5.0, 5.0]])))
    plain, fused = results
    assert np.abs(plain.logits - fused.logits).max() < 1e-3
    np.testing.assert_allclose(plain.confidence, fused.confidence, atol=1e-4)
    agree = (plain.masks == fused.masks).mean()
    assert agree > 0.999, agree
