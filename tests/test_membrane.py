"""Membranes from a few clicks: the bilayer's ridge is followed, the lumen stays empty."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cryosam.config import PropagationConfig, SegmenterConfig
from cryosam.metrics import mask_metrics
from cryosam.propagation import _instance, _Piece, propagate
from cryosam.segmenters.membrane import attached, grow_membrane, ridge_map
from cryosam.segmenters.threshold import ThresholdSegmenter
from cryosam.simulate import SimulationConfig, simulate


def _ring_image(size: int = 64, radius: float = 18.0, seed: int = 0) -> np.ndarray:
    """A bright ring (a vesicle slice after the polarity flip) plus a bright blob, noisy."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    d = np.hypot(yy - size / 2, xx - size / 2)
    img = np.exp(-((d - radius) ** 2) / (2 * 1.5**2))
    img += 1.5 * np.exp(-((yy - 8) ** 2 + (xx - 8) ** 2) / (2 * 3.0**2))  # a dense particle
    return img + 0.1 * np.random.default_rng(seed).standard_normal(img.shape)


def test_ridge_follows_a_ring_without_filling_it() -> None:
    img = _ring_image()
    ridge, noise = ridge_map(img)
    mask, cnr, _ = grow_membrane(ridge, noise, (32, 32 + 18), None, 2.0, 2.0)
    yy, xx = np.mgrid[:64, :64]
    d = np.hypot(yy - 32, xx - 32)
    assert cnr > 2.0
    assert mask[np.abs(d - 18) <= 1].mean() > 0.9  # the whole ring, not an arc
    assert not mask[d < 12].any()  # the lumen stays empty
    assert not mask[:14, :14].any()  # the blob is not part of the ring


def test_grow_stops_where_the_sheet_ends() -> None:
    ridge, noise = ridge_map(np.random.default_rng(1).standard_normal((64, 64)))
    prev = np.zeros((64, 64), bool)
    prev[30:33, 10:50] = True
    mask, _, _ = grow_membrane(ridge, noise, (31, 30), prev, 2.0, 2.0, ref=50 * noise)
    assert not mask.any()


def test_votes_keep_voxels_seen_from_two_axes() -> None:
    a = _Piece("z", 2, 0, 0, np.ones((4, 4), bool))  # z=2, y 0-3, x 0-3
    b = _Piece("y", 1, 0, 0, np.ones((4, 4), bool))  # y=1, z 0-3, x 0-3
    union = _instance([a, b])
    voted = _instance([a, b], votes=2)
    assert union.n_voxels == 16 + 16 - 4
    assert voted.n_voxels == 4  # the line z=2, y=1 only
    assert {tuple(c) for c in voted.coords()} == {(2, 1, x) for x in range(4)}
    assert _instance([a], votes=2).n_voxels == 16  # one axis only: nothing to vote with


def test_attached_drops_parts_away_from_the_click() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[2, 2:8, 2:8] = True
    mask[8, 8, 8] = True
    offset, kept = attached(mask, (1, 0, 0), np.array([3.0, 5.0, 5.0]))
    assert offset == (3, 2, 2) and kept.shape == (1, 6, 6) and kept.all()


@pytest.fixture(scope="module")
def vesicle_run():
    sim = simulate(SimulationConfig(shape=(48, 96, 96), seed=0, n_targets=8, n_blobs=8,
                                    n_filaments=4))
    labels, _ = ndi.label(sim.membrane)
    idx = np.rint(sim.membrane_clicks).astype(int)
    comp = labels[idx[:, 0], idx[:, 1], idx[:, 2]]
    vesicle = labels == comp[-1]  # the vesicle's clicks come last
    clicks = sim.membrane_clicks[comp == comp[-1]]
    seg = ThresholdSegmenter(SegmenterConfig(name="threshold"), target="membrane")
    res = propagate(sim.volume, clicks, seg, PropagationConfig(target="membrane"))
    pred = np.zeros(sim.volume.shape, bool)
    for inst in res.instances:
        inst.paste(pred)
    return sim, vesicle, clicks, pred


def test_a_few_clicks_segment_a_vesicle(vesicle_run) -> None:
    sim, vesicle, clicks, pred = vesicle_run
    assert 2 <= len(clicks) <= 5
    near = ndi.binary_dilation(vesicle, iterations=4)
    assert mask_metrics(pred & near, vesicle).dice > 0.6  # the poles lie in the missing wedge
    assert (pred & ~near).sum() < 0.1 * pred.sum()  # no leak into the rest of the volume


def test_the_vesicle_lumen_stays_empty(vesicle_run) -> None:
    _, vesicle, _, pred = vesicle_run
    lumen = ndi.binary_fill_holes(vesicle) & ~ndi.binary_dilation(vesicle, iterations=2)
    assert lumen.sum() > 1000
    assert (pred & lumen).sum() < 0.02 * lumen.sum()


def test_membranes_at_a_finer_voxel_size_are_binned_onto_the_bilayers_scale() -> None:
    """The same scene at 5 A: the bilayer answers the probe at twice the scale, so the run
    bins 2x and the membranes come out as at 10 A (Dice 0.58 unbinned before, against 0.87;
    the mask traced the two leaflets apart)."""
    from cryosam.config import CryosamConfig, EncoderConfig
    from cryosam.metrics import dice
    from cryosam.pipeline import CryoSAM

    model = CryoSAM(CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                                  segmenter=SegmenterConfig(name="threshold"), device="cpu",
                                  propagation=PropagationConfig(target="membrane")))
    scores = {}
    for zoom in (1, 2):
        sim = simulate(SimulationConfig(shape=(48, 128, 128), seed=0, zoom=zoom))
        res = model.segment(sim.volume, sim.membrane_clicks[:3], voxel_size=sim.voxel_size)
        assert res.record["work"]["binning"] == zoom
        assert res.semantic.shape == sim.volume.shape
        scores[zoom] = dice(res.semantic > 0, sim.membrane)
    assert scores[1] > 0.8 and scores[2] > scores[1] - 0.05, scores


def test_membrane_runs_speak_of_membranes(small_sim, run_cli, tmp_path) -> None:
    """A membrane run's messages say membranes: a click off any bilayer is 'no membrane
    found', options that only act on particles are named as having no effect, and the
    summary names the masks (it spoke of particles, picks and a query)."""
    sim, files = small_sim
    fast = ("--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu")
    from cryosam.stages import nothing_found_message

    assert nothing_found_message(None, 1, "membrane").startswith("no membrane found at any")
    code, said, err = run_cli("segment", files["tomo.mrc"], "--points",
                              files["membrane_clicks.csv"], "--target", "membrane",
                              "--min-score", "0.3", *fast, "--out", tmp_path / "b")
    assert code == 0, err
    assert "--min-score: no effect with --target membrane" in err
    assert "membrane mask(s)" in said and "pick(s)" not in said


def test_membrane_binning_comes_from_the_voxel_size_else_the_probe() -> None:
    """A plausible voxel size decides (a bilayer is ~4 nm whatever the clicks' probe says;
    single clicks' scales vary by a third); an unset header (1 A) or none falls back to the
    clicks' probe scale, and no scale means no binning."""
    from cryosam.probe import membrane_bin_factor

    assert [membrane_bin_factor(None, v) for v in (10.0, 5.0, 2.5, 13.6)] == [1, 2, 4, 1]
    assert membrane_bin_factor(7.76, 5.0) == 2  # a single click's low scale does not decide
    assert membrane_bin_factor(11.0, 1.0) == 2 and membrane_bin_factor(11.0, None) == 2
    assert membrane_bin_factor(float("nan"), None) == 1 and membrane_bin_factor(None) == 1


def test_membranes_csv_traces_each_label_to_its_clicks(small_sim, run_cli, tmp_path) -> None:
    """``membranes.csv``: a row per label of ``instances.mrc`` naming the data rows of the
    clicks that made it, rows of the file itself (another tomogram's rows and a negative
    row counted), each click in exactly one membrane; two clicks on one sheet share a row."""
    import csv

    import mrcfile

    sim, files = small_sim
    clicks = np.loadtxt(files["membrane_clicks.csv"], delimiter=",", skiprows=1, ndmin=2)
    lines = ["x,y,z,tomo_name,negative", "1,1,1,other,0"]  # data row 0: another tomogram
    lines += [f"{x},{y},{z},tomo,0" for x, y, z in clicks]  # rows 1..n
    lines.append("2,2,2,tomo,1")  # a negative row after them: row n + 1
    lines.append("{},{},{},tomo,0".format(*clicks[0]))  # row n + 2 repeats the first click
    points = tmp_path / "clicks.csv"
    points.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", points, "--target",
                           "membrane", "--encoder", "filterbank", "--segmenter", "threshold",
                           "--device", "cpu", "--out", tmp_path / "m")
    assert code == 0, err
    with open(tmp_path / "m" / "membranes.csv") as fh:
        rows = list(csv.DictReader(fh))
    with mrcfile.open(tmp_path / "m" / "instances.mrc") as mrc:
        labels = np.asarray(mrc.data)
    assert [int(r["instance_id"]) for r in rows] == list(range(1, labels.max() + 1))
    for r in rows:
        assert int(r["n_voxels"]) == int((labels == int(r["instance_id"])).sum())
    made = sorted(int(c) for r in rows for c in r["clicks"].split())
    n = len(clicks)
    assert made == [*range(1, n + 1), n + 2]  # file rows, each click once, the repeat too
    assert float(rows[0]["volume_nm3"]) == int(rows[0]["n_voxels"])  # 10 Å voxels: 1 nm³
    assert len(rows) < len(clicks)  # clicks on one membrane are one label naming both
