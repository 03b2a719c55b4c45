"""Slice encoders: DINOv2 (tiny random-init transformers models) and the filter bank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryosam.backends import FilterBankOptions
from cryosam.config import EncoderConfig
from cryosam.encoders import SliceEncoder, aspect_change, build_encoder, voxels_per_patch
from cryosam.encoders.dinov2 import Dinov2Encoder, architecture_config, channels_for_model
from cryosam.encoders.filterbank import FilterBankEncoder
from cryosam.errors import CryosamError, MissingWeightsError
from cryosam.features import extract_features

PATCH = 4
HIDDEN = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(registers: bool, seed: int = 0) -> torch.nn.Module:
    """A 2-layer DINOv2 (with or without 4 registers) with random weights."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                  image_size=4 * PATCH, patch_size=PATCH)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4,
                                                                  **kwargs)).eval()
    return Dinov2Model(Dinov2Config(**kwargs)).eval()


@pytest.fixture(scope="module")
def tomogram() -> np.ndarray:
    """A small (z, y, x) = (10, 22, 15) volume: three different slice aspect ratios."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(np.arange(10), np.arange(22), np.arange(15), indexing="ij")
    vol = np.sin(x / 3.0) + np.cos(y / 4.0) + 0.3 * z / 10 + 0.2 * rng.normal(size=z.shape)
    return vol.astype(np.float32)


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_encoder_along_three_axes(tomogram: np.ndarray, registers: bool) -> None:
    model = tiny_model(registers)
    enc = Dinov2Encoder(model, patches_long_side=6)
    assert isinstance(enc, SliceEncoder)
    assert enc.patch_size == PATCH and enc.channels == HIDDEN
    assert enc.num_register_tokens == (4 if registers else 0)
    fv = extract_features(tomogram, enc, batch_size=4)
    # z slices 22x15 -> long side 6, short round(6*15/22 = 4.09) = 4
    # y slices 10x15 -> (round(6*10/15) = 4, 6); x slices 10x22 -> (round(6*10/22 = 2.7) = 3, 6)
    assert tuple(fv.stacks["z"].shape) == (10, 6, 4, HIDDEN)
    assert tuple(fv.stacks["y"].shape) == (22, 4, 6, HIDDEN)
    assert tuple(fv.stacks["x"].shape) == (15, 3, 6, HIDDEN)
    assert all(s.dtype == torch.float16 for s in fv.stacks.values())
    assert fv.dim == 3 * HIDDEN
    assert np.all(np.isfinite(fv.sample(np.array([[4.5, 10.2, 7.1]])).numpy()))
    assert fv.meta["voxels_per_patch"]["z"] == pytest.approx([22 / 6, 15 / 4])


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_keeps_patch_tokens_only(registers: bool) -> None:
    model = tiny_model(registers)
    enc = Dinov2Encoder(model, patches_long_side=5)
    slices = np.random.default_rng(1).random((3, 30, 21)).astype(np.float32)
    maps = enc.encode(slices)
    assert tuple(maps.shape) == (3, 5, 4, HIDDEN) and maps.dtype == torch.float16
    pixels = enc.preprocess(torch.from_numpy(slices))
    assert tuple(pixels.shape) == (3, 3, 5 * PATCH, 4 * PATCH)
    with torch.inference_mode():
        hidden = model(pixel_values=pixels).last_hidden_state
    n_special = 1 + (4 if registers else 0)
    assert hidden.shape[1] == n_special + 5 * 4
    expected = hidden[:, n_special:].reshape(3, 5, 4, HIDDEN)
    torch.testing.assert_close(maps.float(), expected.float(), atol=1e-2, rtol=1e-2)
    # the CLS (and register) tokens are not in the map: a shift by one token would differ
    shifted = hidden[:, n_special - 1:-1].reshape(3, 5, 4, HIDDEN)
    assert not torch.allclose(maps.float(), shifted.float(), atol=1e-2)


def test_dinov2_aspect_ratio_and_batching() -> None:
    enc = Dinov2Encoder(tiny_model(True), patches_long_side=37)
    assert enc.grid_shape(200, 1000) == (7, 37)  # 200/1000 * 37 = 7.4 -> 7 whole patches
    assert enc.grid_shape(1000, 1000) == (37, 37)
    assert enc.grid_shape(512, 200) == (37, 14)  # 14.45 -> 14
    assert abs(aspect_change(enc, 200, 1000)) < 0.5 / 7 + 1e-9
    assert voxels_per_patch(enc, 1000, 1000) == pytest.approx((1000 / 37, 1000 / 37))
    small = Dinov2Encoder(tiny_model(True), patches_long_side=4)
    slices = np.random.default_rng(2).random((3, 12, 20)).astype(np.float32)
    together = small.encode(slices).float()
    apart = torch.cat([small.encode(slices[i:i + 1]).float() for i in range(3)])
    torch.testing.assert_close(together, apart, atol=2e-3, rtol=2e-3)


def test_dinov2_normalisation_uses_model_mean_std() -> None:
    enc = Dinov2Encoder(tiny_model(False), patches_long_side=2, image_mean=(0.5, 0.4, 0.3),
                        image_std=(0.1, 0.2, 0.25))
    pixels = enc.preprocess(torch.full((1, 2 * PATCH, 2 * PATCH), 0.7))
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([2.0, 1.5, 1.6], abs=1e-5)


def test_dinov2_id_names_weights_and_options() -> None:
    a = Dinov2Encoder(tiny_model(True, seed=0), patches_long_side=6)
    b = Dinov2Encoder(tiny_model(True, seed=1), patches_long_side=6)
    c = Dinov2Encoder(tiny_model(True, seed=0), patches_long_side=7)
    assert a.id != b.id and a.id != c.id
    assert a.id == Dinov2Encoder(tiny_model(True, seed=0), patches_long_side=6).id


def test_dinov2_from_local_directory(tmp_path) -> None:
    model = tiny_model(True)
    model.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]}))
    enc = Dinov2Encoder.from_pretrained(str(tmp_path / "dino"), "cpu", patches_long_side=3)
    assert enc.image_mean == (0.4, 0.4, 0.4)
    assert enc.channels == HIDDEN and enc.num_register_tokens == 4
    slices = np.random.default_rng(3).random((2, 9, 9)).astype(np.float32)
    direct = Dinov2Encoder(model, patches_long_side=3, image_mean=(0.4,) * 3,
                           image_std=(0.2,) * 3).encode(slices)
    torch.testing.assert_close(enc.encode(slices), direct)
    assert channels_for_model(str(tmp_path / "dino")) == HIDDEN
    with pytest.raises(MissingWeightsError):
        Dinov2Encoder.from_pretrained(str(tmp_path / "nowhere"), "cpu")


def test_architecture_configs_match_published_sizes() -> None:
    assert architecture_config("vitl14").hidden_size == 1024
    assert architecture_config("vitl14").num_register_tokens == 4
    assert architecture_config("vits14", registers=False).model_type == "dinov2"
    assert channels_for_model("facebook/dinov2-small") == 384
    with pytest.raises(CryosamError):
        architecture_config("vitx14")


def test_build_encoder() -> None:
    cfg = EncoderConfig(name="filterbank", backends={"filterbank": FilterBankOptions(patch=3)})
    fb = build_encoder(cfg, "cpu")
    assert isinstance(fb, FilterBankEncoder) and fb.patch_size == 3
    with pytest.raises(CryosamError, match="encoder"):
        build_encoder(EncoderConfig(name="resnet"), "cpu")


# --------------------------------------------------------------------------- filter bank


def test_filterbank_contract_and_rotation_invariance() -> None:
    enc = FilterBankEncoder(patch_size=2, sigmas=(1.0, 2.0))
    assert isinstance(enc, SliceEncoder) and enc.channels == 10
    rng = np.random.default_rng(4)
    img = 0.7 + 0.1 * rng.random((1, 32, 24)).astype(np.float32)
    yy, xx = np.mgrid[:32, :24]
    for cy, cx, r in ((9, 7, 3.5), (22, 16, 2.0), (24, 5, 1.5)):  # dark disks, no symmetry
        img[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] -= 0.5
    img[0, 14:16, 10:22] -= 0.5  # and a dark bar
    maps = enc.encode(img)
    assert tuple(maps.shape) == (1, 16, 12, 10) and maps.dtype == torch.float16
    flat = maps.float().reshape(-1, 10)
    norms = flat.norm(dim=1)
    assert torch.isfinite(flat).all() and (norms < 1).all() and norms.max() > 0.5  # soft unit
    assert enc.encode(rng.random((1, 32, 24)).astype(np.float32)).abs().max() < 0.01  # noise
    rotated = enc.encode(np.ascontiguousarray(np.rot90(img, axes=(1, 2))))
    expected = torch.rot90(maps.float(), dims=(1, 2))
    inner = (slice(None), slice(3, -3), slice(3, -3))  # away from the replicated borders
    torch.testing.assert_close(rotated.float()[inner], expected[inner], atol=0.05, rtol=0.05)
    odd = enc.encode(rng.random((2, 15, 9)).astype(np.float32))
    assert tuple(odd.shape[1:3]) == enc.grid_shape(15, 9) == (8, 4)  # round(7.5)=8, round(4.5)=4


def test_filterbank_separates_targets_from_distractors() -> None:
    from cryosam.simulate import SimulationConfig, simulate

    sim = simulate(SimulationConfig(shape=(48, 128, 128), n_targets=14, n_blobs=14,
                                    n_filaments=10, seed=1))
    fv = extract_features(sim.volume, FilterBankEncoder())
    kinds = np.array([p.kind for p in sim.particles])
    feats = fv.sample(np.array([p.zyx for p in sim.particles])).numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    is_target = kinds == sim.target_kind
    assert is_target.sum() >= 10 and (~is_target).sum() >= 10
    right = []
    for i in range(len(feats)):  # nearest centroid of each kind, leaving the particle out
        keep = np.arange(len(feats)) != i
        centroids = {k: feats[keep & (kinds == k)].mean(0) for k in set(kinds)}
        pred = max(centroids, key=lambda k: feats[i] @ centroids[k]
                   / np.linalg.norm(centroids[k]))
        right.append((pred == sim.target_kind) == is_target[i])
    right = np.array(right)
    assert right[is_target].mean() >= 0.9, right[is_target].mean()
    assert right[~is_target].mean() >= 0.9, right[~is_target].mean()
