"""Synthetic tomograms: determinism, truth consistency, contrast, SNR, missing wedge, files, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.fft as sfft
from scipy import ndimage as ndi

from cryosam.errors import CryosamError, InputError
from cryosam.metrics import ranked_metrics
from cryosam.simulate import (
    BLOB_KIND,
    FILAMENT_KIND,
    TARGET_KIND,
    SimulationConfig,
    measured_snr,
    missing_wedge_mask,
    simulate,
    write_simulation,
)

SMALL = dict(shape=(32, 96, 96), n_targets=4, n_blobs=5, n_filaments=3)


@pytest.fixture(scope="module")
def sim():
    """The default simulation (64x160x160)."""
    return simulate(SimulationConfig(seed=3))


def test_same_seed_same_volume_other_seed_differs():
    a = simulate(SimulationConfig(seed=1, **SMALL))
    b = simulate(SimulationConfig(seed=1, **SMALL))
    c = simulate(SimulationConfig(seed=2, **SMALL))
    assert np.array_equal(a.volume, b.volume)
    assert np.array_equal(a.labels, b.labels)
    assert a.particles == b.particles and a.prompt_ids == b.prompt_ids
    assert not np.array_equal(a.volume, c.volume)


def test_arrays_and_counts(sim):
    d, h, w = sim.config.shape
    assert sim.volume.shape == sim.labels.shape == sim.membrane.shape == (d, h, w)
    assert sim.volume.dtype == np.float32 and sim.labels.dtype == np.int16
    assert sim.membrane.dtype == bool
    counts = sim.config.counts()
    for kind in (TARGET_KIND, BLOB_KIND, FILAMENT_KIND):
        assert len(sim.ids(kind)) == counts[kind] > 0
    assert [p.id for p in sim.particles] == list(range(1, len(sim.particles) + 1))
    assert sim.target_kind == TARGET_KIND
    assert abs(float(sim.volume.mean())) < 1e-3 and abs(float(sim.volume.std()) - 1) < 1e-3


def test_labels_are_the_particles(sim):
    ids, counts = np.unique(sim.labels, return_counts=True)
    assert list(ids) == [0] + [p.id for p in sim.particles]
    objects = ndi.find_objects(sim.labels)
    for p in sim.particles:
        sl = objects[p.id - 1]
        mask = sim.labels[sl] == p.id
        assert counts[p.id] == p.n_voxels == mask.sum()
        centroid = np.argwhere(mask).mean(axis=0) + [s.start for s in sl]
        np.testing.assert_allclose(centroid, p.zyx, atol=1e-6)
        assert p.radius == pytest.approx((3 * p.n_voxels / (4 * np.pi)) ** (1 / 3))
        # fully inside the volume and one connected piece
        assert all(s.start > 0 and s.stop < n for s, n in zip(sl, sim.labels.shape, strict=True))
        assert ndi.label(mask)[1] == 1


def test_particles_do_not_touch_each_other_or_membranes(sim):
    grown = ndi.grey_dilation(sim.labels, size=(3, 3, 3))
    touching = (grown != sim.labels) & (sim.labels > 0)
    assert not touching.any()
    assert not (ndi.binary_dilation(sim.labels > 0) & sim.membrane).any()


def test_kinds_differ_in_size_and_shape(sim):
    def radii(kind):
        return np.array([p.radius for p in sim.particles if p.kind == kind])

    def elongation(pid):
        pts = np.argwhere(sim.labels == pid).astype(float)
        ev = np.linalg.eigvalsh(np.cov(pts.T))
        return float(np.sqrt(ev[-1] / ev[0]))

    assert np.median(radii(TARGET_KIND)) > 1.4 * np.median(radii(BLOB_KIND))
    assert np.median(radii(TARGET_KIND)) > 1.15 * np.median(radii(FILAMENT_KIND))
    assert min(elongation(i) for i in sim.ids(FILAMENT_KIND)) > 2.0
    assert max(elongation(i) for i in sim.ids(BLOB_KIND)) < 1.8
    assert sim.target_radius == pytest.approx(np.median(radii(TARGET_KIND)))


def test_dense_matter_is_dark(sim):
    inside = sim.labels > 0
    assert sim.signal[inside].mean() < sim.signal[~inside & ~sim.membrane].mean() - 0.3
    centres = np.rint(sim.points(TARGET_KIND)).astype(int)
    assert (sim.signal[tuple(centres.T)] < 0).all()
    assert sim.signal[sim.membrane].mean() < 0


@pytest.mark.parametrize("snr", [0.2, 1.0])
def test_snr_is_as_requested(snr):
    s = simulate(SimulationConfig(seed=5, snr=snr, **SMALL))
    assert measured_snr(s) == pytest.approx(snr, rel=1e-3)
    # independent check: corr(volume, signal)^2 = snr / (1 + snr) for independent noise
    corr = np.corrcoef(s.volume.ravel(), s.signal.ravel())[0, 1]
    assert corr**2 == pytest.approx(snr / (1 + snr), abs=0.03)


def test_missing_wedge_in_fourier_space(sim):
    spec = np.abs(sfft.rfftn(sim.volume.astype(np.float64))) ** 2
    kept = missing_wedge_mask(sim.volume.shape, 60.0)
    kept[0, 0, 0] = True
    missing = ~kept
    assert missing.mean() > 0.2  # the wedge is a real part of Fourier space
    assert spec[missing].sum() < 1e-8 * spec[kept].sum()
    # control: without a wedge, the same region carries its share of power
    full = simulate(SimulationConfig(seed=3, tilt_range=90.0))
    spec_full = np.abs(sfft.rfftn(full.volume.astype(np.float64))) ** 2
    assert spec_full[missing].sum() > 0.1 * spec_full.sum()


def test_membrane_and_clicks(sim):
    assert sim.membrane.sum() > 1000
    clicks = sim.membrane_clicks
    assert clicks.shape == (sim.config.n_membrane_clicks, 3)
    idx = np.rint(clicks).astype(int)
    assert sim.membrane[tuple(idx.T)].all()
    # the membrane is more than one connected piece only when both vesicle and sheet exist
    assert ndi.label(sim.membrane)[1] == 2
    none = simulate(SimulationConfig(seed=3, membrane=False, **SMALL))
    assert not none.membrane.any() and none.membrane_clicks.shape == (0, 3)


def test_prompts_are_clear_targets(sim):
    assert len(sim.prompt_ids) == 5 == len(set(sim.prompt_ids))
    for pid in sim.prompt_ids:
        assert sim.particle(pid).kind == TARGET_KIND
    p = sim.particle(sim.prompt_ids[0])
    c = np.rint(p.zyx).astype(int)
    assert sim.labels[tuple(c)] == p.id
    others = [q for q in sim.particles if q.id != p.id]
    gaps = [np.linalg.norm(np.subtract(q.zyx, p.zyx)) - q.radius - p.radius for q in others]
    assert min(gaps) >= 3.0


def test_targets_are_findable_by_a_classical_detector(sim):
    """A LoG blob detector at the target scale reaches best F1 >= 0.8 (not a pipeline test:
    a guard that the defaults stay achievable)."""
    r = sim.target_radius
    resp = (r**2 / 3) * ndi.gaussian_laplace(sim.volume, r / np.sqrt(3))
    peaks = np.argwhere((resp == ndi.maximum_filter(resp, size=int(2 * r) + 1)) & (resp > 0))
    res = ranked_metrics(peaks, resp[tuple(peaks.T)], sim.points(TARGET_KIND), r)
    assert res.best_f1 >= 0.8


def test_write_simulation_files(tmp_path):
    from cryosam.io import read_points, read_tomogram

    s = simulate(SimulationConfig(seed=4, voxel_size=12.5, **SMALL))
    paths = write_simulation(s, tmp_path / "sim")
    expected = {"tomo.mrc", "truth.csv", "prompt.csv", "prompts5.csv", "membrane_clicks.csv",
                "membrane.mrc", "labels.mrc", "simulation.json"}
    assert {p.name for p in paths.values()} == expected == set(paths)
    assert all(p.is_file() for p in paths.values())

    tomo = read_tomogram(paths["tomo.mrc"])
    assert tomo.voxel_size == pytest.approx((12.5, 12.5, 12.5))
    np.testing.assert_allclose(tomo.data, s.volume, atol=1e-6)
    np.testing.assert_array_equal(read_tomogram(paths["labels.mrc"]).data, s.labels)
    np.testing.assert_array_equal(read_tomogram(paths["membrane.mrc"]).data > 0, s.membrane)

    truth = read_points(paths["truth.csv"], shape=s.volume.shape)
    np.testing.assert_allclose(truth.zyx, s.points(), atol=1e-3)
    assert list(truth.columns["kind"]) == [p.kind for p in s.particles]
    np.testing.assert_allclose(truth.columns["radius"].astype(float),
                               [p.radius for p in s.particles], atol=1e-3)
    np.testing.assert_array_equal(truth.columns["id"].astype(int), s.ids())
    # labels.mrc value at each truth id's voxels is that id
    labels = read_tomogram(paths["labels.mrc"]).data
    for pid in truth.columns["id"].astype(int):
        assert (labels == pid).sum() == s.particle(pid).n_voxels

    one = read_points(paths["prompt.csv"], shape=s.volume.shape)
    five = read_points(paths["prompts5.csv"], shape=s.volume.shape)
    assert len(one) == 1 and len(five) == min(5, len(s.ids(TARGET_KIND)))
    np.testing.assert_allclose(one.zyx[0], s.particle(s.prompt_ids[0]).zyx, atol=0.01)
    clicks = read_points(paths["membrane_clicks.csv"], shape=s.volume.shape)
    idx = np.rint(clicks.zyx).astype(int)
    assert len(clicks) > 0 and s.membrane[tuple(idx.T)].all()

    with pytest.raises(CryosamError, match="--overwrite"):
        write_simulation(s, tmp_path / "sim")
    write_simulation(s, tmp_path / "sim", overwrite=True)


def test_bad_configs():
    with pytest.raises(InputError):
        SimulationConfig(shape=(8, 64, 64))
    with pytest.raises(InputError):
        SimulationConfig(snr=0.0)
    with pytest.raises(InputError):
        SimulationConfig(tilt_range=120)
    with pytest.raises(CryosamError, match="overlap"):
        simulate(SimulationConfig(shape=(24, 32, 32), n_targets=60, membrane=False))


def test_counts_scale_with_volume():
    small = SimulationConfig().counts()
    big = SimulationConfig(shape=(128, 160, 160)).counts()
    assert all(big[k] == 2 * small[k] for k in small)
    assert SimulationConfig(n_targets=3).counts()[TARGET_KIND] == 3


def test_cli_simulate(tmp_path, run_cli):
    out = tmp_path / "cli"
    args = ("simulate", str(out), "--shape", "32,96,96", "--n-targets", "4",
            "--n-distractors", "3", "--seed", "7", "--snr", "0.8", "--voxel-size", "8")
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    assert "tomo.mrc" in stdout and "4 ribosome" in stdout and "3 blob" in stdout
    assert (out / "truth.csv").read_text().count("\n") == 1 + 4 + 3 + 3
    code, _, err = run_cli(*args)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    code, _, err = run_cli(*args, "--overwrite")
    assert code == 0, err
    code, _, err = run_cli("simulate", str(tmp_path / "bad"), "--shape", "32,96")
    assert code == 2 and "--shape" in err


def test_cli_simulate_quiet(tmp_path, run_cli):
    """`simulate -q` and `cryosam -q simulate` write the files and print nothing, like
    segment's -q; an error still prints its line; the next plain run prints again."""
    args = ("--shape", "32,96,96", "--n-targets", "2", "--n-distractors", "1", "--no-membrane")
    code, out, err = run_cli("simulate", tmp_path / "a", *args, "-q")
    assert code == 0, err
    assert out == "" and err == ""
    assert (tmp_path / "a" / "tomo.mrc").is_file() and (tmp_path / "a" / "truth.csv").is_file()
    code, out, err = run_cli("-q", "simulate", tmp_path / "b", *args)
    assert code == 0, err
    assert out == "" and (tmp_path / "b" / "labels.mrc").is_file()
    code, out, err = run_cli("simulate", tmp_path / "a", *args, "--quiet")  # exists already
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--overwrite" in err
    code, out, _ = run_cli("simulate", tmp_path / "c", *args)
    assert code == 0 and "wrote:" in out


def test_crowded_preset_packs_every_kind_without_overlap() -> None:
    from cryosam.simulate.crowded import CROWDED_KINDS, kind_clicks

    sim = simulate(SimulationConfig(shape=(48, 112, 112), seed=1, preset="crowded", per_kind=6))
    kinds = [p.kind for p in sim.particles]
    assert set(kinds) == set(CROWDED_KINDS) and all(kinds.count(k) == 6 for k in CROWDED_KINDS)
    # one label per particle, never shared: the masks do not overlap
    ids, counts = np.unique(sim.labels[sim.labels > 0], return_counts=True)
    assert list(ids) == [p.id for p in sim.particles]
    assert all(c == p.n_voxels for c, p in zip(counts, sim.particles, strict=True))
    # close sizes: every kind within a factor 2.5 of the others (look-alikes)
    radii = {k: np.median([p.radius for p in sim.particles if p.kind == k]) for k in CROWDED_KINDS}
    assert max(radii.values()) / min(radii.values()) < 2.5
    # dense matter is dark (CTF-like transfer keeps the low-frequency sign)
    assert sim.signal[sim.labels > 0].mean() < sim.signal[sim.labels == 0].mean()
    inverted = simulate(SimulationConfig(shape=(48, 112, 112), seed=1, preset="crowded",
                                         per_kind=6, invert=True))
    np.testing.assert_allclose(inverted.volume, -sim.volume)
    clicks = kind_clicks(sim, "ring", 2)
    assert clicks.shape == (2, 3)
    rings = np.array([p.zyx for p in sim.particles if p.kind == "ring"])
    assert all(np.min(np.linalg.norm(rings - c, axis=1)) < 1e-9 for c in clicks)


def test_the_crowded_ceiling_script_ranks_by_the_matched_filter() -> None:
    """docs/benchmarks/ceiling.py (a reference for what matching one clicked copy reaches on
    the crowded preset): with almost no noise its matched filter puts every kind's copies
    first; with heavy noise it cannot. A wrong rotation, transfer or template breaks the
    first."""
    import importlib.util

    from scipy.spatial.transform import Rotation

    script = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "ceiling.py"
    spec = importlib.util.spec_from_file_location("ceiling", script)
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    rotations = Rotation.random(200, random_state=0).as_matrix()
    clean = ceiling.scene_ceiling(0, 1000.0, (40, 112, 112), rotations)["true object"]
    noisy = ceiling.scene_ceiling(0, 0.05, (40, 112, 112), rotations)["true object"]
    assert set(clean) == set(noisy) and len(clean) >= 6
    assert np.mean(list(clean.values())) >= 0.85, clean
    assert np.mean(list(noisy.values())) < np.mean(list(clean.values())) - 0.1, noisy
    # the click itself counts as found (as bench accuracy counts it): F1 >= 2 / (1 + copies)
    scene = simulate(SimulationConfig(shape=(40, 112, 112), seed=0, snr=0.05, preset="crowded"))
    copies = {k: len(scene.points(k)) for k in noisy}
    assert all(noisy[k] >= 2 / (1 + copies[k]) - 1e-9 for k in noisy), (noisy, copies)


def test_the_losses_script_ranks_true_centres_by_each_part() -> None:
    """docs/benchmarks/losses.py (where one click loses on the crowded preset): the score's
    density description at the true centres ranks a clean scene's copies well and a very
    noisy one's far worse; the features' ranking is a best F1 like any other. A wrong
    centre, reach or reference breaks the first."""
    import importlib.util
    import tempfile

    script = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "losses.py"
    spec = importlib.util.spec_from_file_location("losses", script)
    losses = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(losses)
    model = losses.weight_free_model()
    with tempfile.TemporaryDirectory() as cache:
        clean = losses.scene_losses(model, 0, 1000.0, (40, 112, 112), cache, pipeline=False)
    with tempfile.TemporaryDirectory() as cache:
        noisy = losses.scene_losses(model, 0, 0.05, (40, 112, 112), cache, pipeline=False)
    assert len(clean["density"]) >= 6 and set(clean["features"]) == set(clean["density"])
    assert not clean["pipeline"] and not clean["found"]  # not asked for
    assert np.mean(list(clean["density"].values())) >= 0.7, clean["density"]
    assert (np.mean(list(noisy["density"].values()))
            < np.mean(list(clean["density"].values())) - 0.15), noisy["density"]
    scene = simulate(SimulationConfig(shape=(40, 112, 112), seed=0, preset="crowded"))
    for kind, f1 in clean["features"].items():  # the click counts as found
        assert 2 / (1 + len(scene.points(kind))) - 1e-9 <= f1 <= 1.0, (kind, f1)
