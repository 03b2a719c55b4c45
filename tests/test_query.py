"""Saved queries: made from the clicks on one tomogram, they pick in another with no clicks;
the file round-trips, and a run whose features could not be compared is refused."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from cryosam.errors import CryosamWarning, InputError
from cryosam.metrics import evaluate_picks
from cryosam.pipeline import CryoSAM
from cryosam.query import FORMAT_VERSION, SavedQuery
from cryosam.utils import sha256_file

FAST = ("--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu")


@pytest.fixture(scope="module")
def other_sim(tmp_path_factory: pytest.TempPathFactory):
    """Tomogram B: another 40x96x112 simulation (seed 5) with its own click and truth."""
    from cryosam.simulate import SimulationConfig, simulate, write_simulation

    sim = simulate(SimulationConfig(shape=(40, 96, 112), seed=5))
    return sim, write_simulation(sim, tmp_path_factory.mktemp("simB"))


@pytest.fixture(scope="module")
def saved(small_sim, weight_free, tmp_path_factory: pytest.TempPathFactory):
    """A query saved from tomogram A's one click (the small simulation, seed 3)."""
    _, files = small_sim
    query = CryoSAM(weight_free).make_query(files["tomo.mrc"], files["prompt.csv"])
    path = query.save(tmp_path_factory.mktemp("query") / "ribosome.cryosam-query")
    return path, SavedQuery.load(path)


def test_query_file_holds_what_matching_needs(saved, small_sim) -> None:
    path, q = saved
    _, files = small_sim
    meta = q.summary()
    assert meta["version"] == FORMAT_VERSION and q.meta["sha256"] == sha256_file(path)
    assert q.encoder_id.startswith("filterbank:")
    assert np.allclose(np.linalg.norm(q.vectors, axis=1), 1.0, atol=1e-4)
    assert q.polarity == "dark" and q.binning == 1 and q.nms_radius > 1.0
    assert meta["mask_voxels"] and meta["mask_voxels"][0] == int(q.masks[0].sum()) > 0
    assert meta["mask_elongation"][0] >= 1.0
    assert q.source["tomogram"]["sha256"] == sha256_file(files["tomo.mrc"])
    assert q.source["voxel_size"] == pytest.approx(10.0)
    assert q.config().encoder.name == "filterbank" and q.config().device == "auto"


def test_query_from_a_picks_in_b_like_bs_own_click(saved, other_sim, weight_free) -> None:
    _, q = saved
    sim, files = other_sim
    model = CryoSAM(weight_free)
    truth = sim.points(sim.target_kind)
    own = model.segment(files["tomo.mrc"], files["prompt.csv"])
    found = model.segment(files["tomo.mrc"], query=q)
    by_own = evaluate_picks(own.picks_zyx, truth, sim.target_radius)
    by_query = evaluate_picks(found.picks_zyx, truth, sim.target_radius)
    assert by_own.f1 >= 0.5  # a meaningful comparison
    # the same particles within one (this scene has 6 targets: one is 0.1-0.2 of F1)
    assert abs(by_query.match.tp - by_own.match.tp) <= 1, (by_query, by_own)
    assert abs(by_query.match.fp - by_own.match.fp) <= 1, (by_query, by_own)
    assert found.record["query"]["sha256"] == q.meta["sha256"]
    for res in (own, found):  # the default turns the query, saved or not
        assert res.record["matching"]["stats"]["vectors_scored"] == 2
    assert found.record["counts"]["prompts"] == 0 and not found.pick_is_prompt.any()


def test_cli_query_then_segment_with_it(run_cli, small_sim, other_sim, tmp_path: Path) -> None:
    _, a = small_sim
    _, b = other_sim
    qfile = tmp_path / "rib.cryosam-query"
    code, out, err = run_cli("query", a["tomo.mrc"], "--points", a["prompt.csv"], "--out",
                             qfile, *FAST)
    assert code == 0, err
    assert "query saved" in out
    code, _, err = run_cli("query", a["tomo.mrc"], "--points", a["prompt.csv"], "--out",
                           qfile, *FAST)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli("segment", b["tomo.mrc"], "--query", qfile, "--out",
                           tmp_path / "B", "-q")  # the query's own encoder is the default
    assert code == 0, err
    record = json.loads((tmp_path / "B" / "run.json").read_text())
    assert record["query"]["path"] == str(qfile.resolve())
    assert record["parameters"]["encoder"]["name"] == "filterbank"
    assert (tmp_path / "B" / "picks.csv").is_file()
    code, out, err = run_cli("segment", b["tomo.mrc"], "--query", qfile, "--out",
                             tmp_path / "B2")  # the summary says where the query came in
    assert code == 0, err
    assert "cryosam: a saved query →" in out and "clicks included" not in out
    assert "(as the query's clicks)" in out


@pytest.mark.parametrize("option", [("--encoder", "dinov2"), ("--slice-stride", "2")])
def test_other_features_are_refused_with_one_line(run_cli, saved, other_sim, tmp_path: Path,
                                                  option: tuple[str, str]) -> None:
    path, _ = saved
    _, b = other_sim
    code, out, err = run_cli("segment", b["tomo.mrc"], "--query", path, *option, "--out",
                             tmp_path / "x")
    assert code == 2
    assert err.count("\n") == 1 and option[0] in err and "cryosam query" in err
    assert not (tmp_path / "x").exists()


def test_other_encoder_id_and_width_are_refused(saved) -> None:
    _, q = saved
    with pytest.raises(InputError, match="other weights or version"):
        q.check_encoder("filterbank:v0:other")
    with pytest.raises(InputError, match="channels"):
        q.check_dim(q.vectors.shape[1] + 1)


def test_a_query_leaves_its_machine_settings_behind(saved) -> None:
    """A query made on a big GPU with big batches and a big cache travels without them: the
    machine that uses it starts from its own defaults; what decides the picks travels."""
    import copy
    import dataclasses

    from cryosam.config import CryosamConfig

    _, q = saved
    moved = dataclasses.replace(q, parameters=copy.deepcopy(q.parameters))
    moved.parameters.update(device="cuda", threads=64)
    moved.parameters["encoder"]["batch_size"] = 64
    moved.parameters["segmenter"].update(embedding_cache_mb=40000, decoder_batch_size=512)
    moved.parameters["matching"].update(chunk_size=1 << 20, top_k=7)
    cfg, default = moved.config(), CryosamConfig()
    assert (cfg.device, cfg.threads) == (default.device, default.threads)
    assert cfg.encoder.batch_size == default.encoder.batch_size
    assert cfg.segmenter.embedding_cache_mb is None
    assert cfg.segmenter.decoder_batch_size == default.segmenter.decoder_batch_size
    assert cfg.matching.chunk_size == default.matching.chunk_size
    assert cfg.matching.top_k == 7  # a result parameter travels
    assert cfg.encoder.name == q.parameters["encoder"]["name"]


def test_other_voxel_size_or_polarity_warns(saved, other_sim, weight_free) -> None:
    _, q = saved
    sim, _ = other_sim
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = q.warn_data(20.0, "bright")
    assert len(lines) == 2 and "20 Å" in lines[0] and "--polarity bright" in lines[1]
    assert all(issubclass(w.category, CryosamWarning) for w in caught)
    with pytest.warns(CryosamWarning, match="voxel"):
        CryoSAM(weight_free).segment(sim.volume, query=q, voxel_size=15.0)
    assert q.warn_data(10.2, "dark") == []  # within 5 %, same contrast
    assert q.warn_data(10.0, "bright", flips=True) == []  # the encoder sees it flipped
    # the whole binning closest to the query's 10 A grid: no warning within 5 %
    assert (q.binning, q.grid) == (1, 10.0)
    assert [q.binning_for(v) for v in (10.2, 5.0, 2.5, 3.4, 4.7, 13.0, 6.5, None)] == \
        [1, 2, 4, 3, 2, 1, 2, 1]
    assert q.binning_for(5.0, given=1) == 1  # --binning wins
    assert q.warn_data(5.0, "dark") == [] and q.warn_data(2.5, "dark") == []
    with pytest.warns(CryosamWarning, match="binned 2x give 9.4 Å, 6% off"):
        q.warn_data(4.7, "dark")  # the nearest binning, with how far off it is
    with pytest.warns(CryosamWarning, match="--binning 2"):  # coarser: bin the query
        q.warn_data(20.0, "dark")
    with pytest.warns(CryosamWarning, match="resample the tomogram to 10 Å"):
        q.warn_data(13.0, "dark")
    with pytest.warns(CryosamWarning, match="drop --binning"):  # a given binning off grid
        q.warn_data(5.0, "dark", binning=1, given=True)


def test_a_query_picks_in_a_finer_tomogram_on_its_own_grid(saved, other_sim,
                                                          weight_free) -> None:
    """Tomogram B sampled twice as finely (5 A): the 10 A query bins it 2x onto its own grid
    and picks the same particles as in B at 10 A, without a voxel-size warning."""
    from cryosam.simulate import SimulationConfig, simulate

    _, q = saved
    sim, files = other_sim
    fine = simulate(SimulationConfig(shape=(40, 96, 112), seed=5, zoom=2.0))
    assert fine.voxel_size == 5.0 and fine.shape == (80, 192, 224)
    model = CryoSAM(weight_free)
    coarse = model.segment(files["tomo.mrc"], query=q)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryosamWarning)
        found = model.segment(fine.volume, query=q, voxel_size=fine.voxel_size)
    assert found.record["work"]["binning"] == 2
    nms = (coarse.record["matching"]["nms_radius"], found.record["matching"]["nms_radius"])
    assert nms[1] == pytest.approx(2 * nms[0])  # the same radius in Å: twice the voxels
    by_coarse = evaluate_picks(coarse.picks_zyx, sim.points(sim.target_kind), sim.target_radius)
    by_fine = evaluate_picks(found.picks_zyx, fine.points(fine.target_kind), fine.target_radius)
    assert by_coarse.f1 >= 0.5 and by_fine.f1 >= by_coarse.f1 - 0.15, (by_fine, by_coarse)


def test_a_query_without_a_voxel_size_says_it_cannot_move(small_sim, other_sim,
                                                         weight_free) -> None:
    """A query made on a tomogram whose voxel size is unknown warns when it is made and when
    it is used on a tomogram that has one."""
    a, files = small_sim
    with pytest.warns(CryosamWarning, match="no voxel size.*--voxel-size"):
        q = CryoSAM(weight_free).make_query(a.volume, files["prompt.csv"])
    assert q.grid is None and q.binning_for(5.0) == q.binning
    sim, _ = other_sim
    with pytest.warns(CryosamWarning, match="unknown voxel size, so it assumes this one's 10 Å"):
        CryoSAM(weight_free).segment(sim.volume, query=q, voxel_size=sim.voxel_size)


def test_a_query_on_inverted_contrast_says_what_to_try(saved, other_sim, weight_free) -> None:
    """Tomogram B with its contrast the other way round: the dark query matches (almost)
    nothing there, and says so with the fix (--polarity bright), which then picks like on B,
    without a warning that the contrast differs (the weight-free encoder flips B)."""
    from cryosam import config as config_mod

    _, q = saved
    sim, _ = other_sim
    inverted = (-sim.volume).astype(np.float32)
    truth = sim.points(sim.target_kind)
    with pytest.warns(CryosamWarning, match="pick.* in this tomogram.*dense matter looks "
                      "bright: pass --polarity bright"):  # B's own contrast says so
        few = CryoSAM(weight_free).segment(inverted, query=q, voxel_size=sim.voxel_size)
    assert len(few.picks_zyx) < 4
    bright = config_mod.CryosamConfig.from_dict({**weight_free.to_dict(), "polarity": "bright"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryosamWarning)
        found = CryoSAM(bright).segment(inverted, query=q, voxel_size=sim.voxel_size)
    same = CryoSAM(weight_free).segment(sim.volume, query=q, voxel_size=sim.voxel_size)
    assert evaluate_picks(found.picks_zyx, truth, sim.target_radius).f1 == pytest.approx(
        evaluate_picks(same.picks_zyx, truth, sim.target_radius).f1, abs=0.15)
    assert len(found.picks_zyx) > 0


def test_damaged_or_newer_files_are_one_line(saved, tmp_path: Path) -> None:
    path, _ = saved
    junk = tmp_path / "junk.cryosam-query"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a cryosam query file"):
        SavedQuery.load(junk)
    with pytest.raises(InputError, match="file not found"):
        SavedQuery.load(tmp_path / "missing.cryosam-query")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta["version"] = FORMAT_VERSION + 1
    arrays["meta"] = np.asarray(json.dumps(meta))
    newer = tmp_path / "newer.cryosam-query"
    with open(newer, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(InputError, match="upgrade cryosam"):
        SavedQuery.load(newer)


def test_points_and_query_together_are_refused(saved, other_sim, weight_free) -> None:
    _, q = saved
    _, files = other_sim
    with pytest.raises(InputError, match="not both"):
        CryoSAM(weight_free).segment(files["tomo.mrc"], files["prompt.csv"], query=q)


def test_query_keeps_negatives_and_densities(small_sim, other_sim, weight_free,
                                             tmp_path: Path) -> None:
    """Format 2: the negative clicks' vectors and masks and the clicks' density descriptions
    travel with the query and act in the other tomogram; a format-1 file still loads."""
    sim, files = small_sim
    blob = next(p for p in sim.particles if p.kind != sim.target_kind)
    model = CryoSAM(weight_free)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryosamWarning)
        q = model.make_query(files["tomo.mrc"], files["prompt.csv"],
                             negative_points=np.asarray([blob.zyx]))
    path = q.save(tmp_path / "neg.cryosam-query")
    back = SavedQuery.load(path)
    assert back.negatives is not None and back.negatives.shape == (1, q.vectors.shape[1])
    assert len(back.negative_crops) == 1 and back.densities is not None
    assert back.reach == pytest.approx(q.reach)
    refs = back.references(weight_free.score)
    assert refs is not None and refs.density is not None
    other, other_files = other_sim
    res = model.segment(other_files["tomo.mrc"], query=str(path))  # the file itself
    assert res.record["query"]["sha256"] == back.meta["sha256"]
    assert res.record["negatives"]["clicks"] == 1
    # the masks were on the query's tomogram: nothing here is dropped for lying "inside" them
    assert res.record["negatives"]["dropped"]["inside"] == 0
    # a version-1 file: no negatives, no densities; size and shape still score
    v1 = SavedQuery(back.vectors, back.masks, back.encoder_id, back.parameters, back.polarity,
                    back.radius, back.binning, back.nms_radius, back.particle_radius,
                    back.source)
    old = v1.save(tmp_path / "v1.cryosam-query")
    loaded = SavedQuery.load(old)
    assert loaded.negatives is None and loaded.densities is None
    refs = loaded.references(weight_free.score)
    assert refs is not None and refs.density is None
    assert len(model.segment(other_files["tomo.mrc"], query=loaded).picks_zyx) > 0


def test_three_clicks_range_travels_with_the_query(small_sim, weight_free,
                                                   tmp_path: Path) -> None:
    """The clicked kind's density range (3+ clicks) is learned from the saved density
    descriptions alone: the same limit on the other tomogram as on the query's own."""
    sim, files = small_sim
    model = CryoSAM(weight_free)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryosamWarning)
        q = model.make_query(files["tomo.mrc"], np.asarray(sim.prompt_points[:3]))
        own = model.segment(files["tomo.mrc"], np.asarray(sim.prompt_points[:3]))
    limit = own.record["score"]["references"]["density_limit"]
    assert limit is not None and limit > 0
    back = SavedQuery.load(q.save(tmp_path / "three.cryosam-query"))
    refs = back.references(weight_free.score)
    assert refs is not None and refs.density_limit == pytest.approx(limit, abs=1e-5)


@pytest.mark.parametrize("preset", ["default", "crowded"])
def test_a_tomogram_without_clicks_shows_its_contrast(preset: str, saved) -> None:
    """Dense matter gives the strongest particle-scale LoG responses one sign: a simulated
    tomogram reads dark, its inverse bright, and noise alone neither (also at SNR 0.1)."""
    from cryosam.probe import looks_polarity
    from cryosam.simulate import SimulationConfig, simulate

    for snr in (0.5, 0.1):
        sim = simulate(SimulationConfig(shape=(40, 96, 112), seed=1, snr=snr, preset=preset))
        radius = float(np.median([p.radius for p in sim.particles]))
        assert looks_polarity(sim.volume, radius)[0] == "dark", snr
        assert looks_polarity(-sim.volume, radius)[0] == "bright", snr
    noise = np.random.default_rng(0).normal(size=(40, 96, 112)).astype(np.float32)
    assert looks_polarity(noise, 4.0)[0] is None
    _, q = saved  # what the warning says in each case (the query was made on dark particles)
    assert q.polarity == "dark"
    assert "looks dark too" in q.nothing_matched(0, False, True, "dark")
    assert "--polarity bright" in q.nothing_matched(0, False, True, "bright")
    assert "make the query on a tomogram" in q.nothing_matched(0, False, False, "bright")
    assert "if this tomogram's particles are bright" in q.nothing_matched(0, False, True, None)

