"""End-to-end pipeline on small synthetic tomograms: outputs and formats (the command line
is in test_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryosam import io
from cryosam.export import OUTPUT_FILES, write_outputs
from cryosam.pipeline import CryoSAM
from cryosam.utils import sha256_file


@pytest.fixture(scope="module")
def small_run(small_sim, weight_free, tmp_path_factory: pytest.TempPathFactory):
    sim, files = small_sim
    result = CryoSAM(weight_free).segment(files["tomo.mrc"], files["prompt.csv"],
                                          tomo_name="TS_07")
    out = tmp_path_factory.mktemp("run") / "out"
    written = write_outputs(result, out, tomo_name="TS_07")
    return result, out, written


DEFAULT_FILES = set(OUTPUT_FILES) - {"picks_relion4.star",  # that one needs a pixel size
                                     "membranes.csv"}  # membrane runs only


def test_every_output_is_written(small_run) -> None:
    result, out, written = small_run
    assert sorted(p.name for p in out.iterdir()) == sorted(DEFAULT_FILES)
    assert set(written) == DEFAULT_FILES
    # nothing hidden (staging folders, temporaries) is left beside the output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert len(result.picks_zyx) >= 1
    assert result.pick_is_prompt.sum() == 1


def test_picks_csv_star_and_napari_agree(small_run, small_sim) -> None:
    result, out, _ = small_run
    sim, _ = small_sim
    csv = io.read_points(out / "picks.csv")
    np.testing.assert_allclose(csv.zyx, result.picks_zyx, atol=1e-3)
    scores = csv.columns["score"]
    assert np.all(np.diff(scores) <= 1e-9), "picks.csv is sorted by score"
    assert set(csv.columns) >= {"score", "instance_id", "n_voxels"}

    star = starfile.read(out / "picks.star")
    df = star if not isinstance(star, dict) else next(iter(star.values()))
    xyz = df[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(float)
    np.testing.assert_allclose(xyz[:, ::-1], result.picks_zyx, atol=1e-3)
    assert set(df["rlnTomoName"]) == {"TS_07"}
    np.testing.assert_allclose(df["rlnAutopickFigureOfMerit"].to_numpy(float), scores,
                               atol=1e-5)
    # RELION-5 centred coordinates: (voxel - size/2) * voxel size, in Å
    vs = sim.voxel_size
    size = np.array(result.tomogram.shape[::-1], dtype=float)  # x, y, z
    centred = df[["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                  "rlnCenteredCoordinateZAngst"]].to_numpy(float)
    np.testing.assert_allclose(centred, (xyz - size / 2) * vs, atol=1e-2)
    back = io.read_points(out / "picks.star", shape=result.tomogram.shape,
                          voxel_size=result.tomogram.voxel_size)
    np.testing.assert_allclose(back.zyx, result.picks_zyx, atol=1e-3)

    napari = io.read_points(out / "picks_napari.csv")
    np.testing.assert_allclose(napari.zyx, result.picks_zyx, atol=1e-3)


def test_mrc_outputs_carry_voxel_size_and_match_labels(small_run, small_sim) -> None:
    result, out, _ = small_run
    sim, _ = small_sim
    for name in ("semantic.mrc", "instances.mrc"):
        assert mrcfile.validate(str(out / name), print_file=open("/dev/null", "w"))
        with mrcfile.open(out / name, permissive=False) as mrc:
            assert mrc.data.shape == sim.volume.shape
            assert float(mrc.voxel_size.x) == pytest.approx(sim.voxel_size, rel=1e-4)
    labels = io.read_tomogram(out / "instances.mrc").data.astype(int)
    semantic = io.read_tomogram(out / "semantic.mrc").data
    assert set(np.unique(semantic)) <= {0.0, 1.0}
    np.testing.assert_array_equal(labels > 0, semantic > 0)
    picks = io.read_points(out / "picks.csv")
    ids = picks.columns["instance_id"].astype(int)
    counts = picks.columns["n_voxels"].astype(int)
    for iid, n in zip(ids, counts, strict=True):
        assert (labels == iid).sum() <= n  # overlaps go to the better instance
        assert (labels == iid).sum() > 0


def test_run_record_holds_what_reproduces_the_run(small_run, small_sim) -> None:
    result, out, _ = small_run
    _, files = small_sim
    rec = json.loads((out / "run.json").read_text())
    assert rec["inputs"]["tomogram"]["sha256"] == sha256_file(files["tomo.mrc"])
    assert rec["inputs"]["points"]["sha256"] == sha256_file(files["prompt.csv"])
    assert rec["parameters"]["matching"]["ratios"] == [16, 8, 4]
    assert rec["parameters"]["propagation"]["iou_threshold"] == 0.5
    assert rec["models"]["segmenter"] and rec["models"]["encoder"]
    assert rec["device"]["type"] == "cpu"
    assert "torch" in rec["versions"] and "numpy" in rec["versions"]
    import cryosam  # the running code's version, not a stale install's metadata

    assert rec["versions"]["cryosam"] == rec["cryosam_version"] == cryosam.__version__
    counts = rec["counts"]
    assert counts["prompts"] == 1 and counts["instances"] == len(result.instances)
    assert counts["decoder_calls"] > 0
    for stage in ("load", "segment_prompts", "features", "matching", "merge"):
        assert stage in rec["seconds"] and stage in rec["peak_memory_bytes"]
    assert set(rec["outputs"]) == DEFAULT_FILES
    # the filter bank pools 2x2-voxel patches on every axis
    vpp = rec["scale"]["encoder_voxels_per_patch"]
    assert set(vpp) == {"z", "y", "x"} and all(v == [2.0, 2.0] for v in vpp.values())


def test_same_input_same_output(small_sim, small_run, weight_free) -> None:
    _, files = small_sim
    first, _, _ = small_run
    again = CryoSAM(weight_free).segment(files["tomo.mrc"], files["prompt.csv"])
    np.testing.assert_array_equal(again.labels, first.labels)
    np.testing.assert_allclose(again.pick_scores, first.pick_scores)


def test_existing_output_needs_overwrite(small_run, tmp_path: Path) -> None:
    result, _, _ = small_run
    out = tmp_path / "o"
    write_outputs(result, out)
    with pytest.raises(io.InputError, match="--overwrite"):
        write_outputs(result, out)
    (out / "picks.csv").unlink()
    write_outputs(result, out, overwrite=True)  # an earlier cryosam output is replaced
    assert (out / "picks.csv").exists()
    (out / "mine.txt").write_text("keep!")
    with pytest.raises(io.InputError, match="did not write"):
        write_outputs(result, out, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep!"


def test_an_unwritable_output_folder_is_one_line(small_run) -> None:
    """Where no folder can be made (here /proc, unwritable even for root), one line names the
    folder the user chose, not cryosam's lock file beside it."""
    result, _, _ = small_run
    if not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc as a place where nothing can be written")
    # as root the write itself fails ("there"); as a user the check before it ("under")
    with pytest.raises(io.InputError, match=r"^(--out )?/proc/cryosam_out: cannot write "
                                            r"(there|under /proc)"):
        write_outputs(result, "/proc/cryosam_out")


def test_click_with_empty_mask_is_kept_at_the_click(small_sim, small_run, weight_free,
                                                    tmp_path: Path) -> None:
    sim, _ = small_sim
    first, _, _ = small_run
    background = np.array([[1.0, 1.0, 1.0]])  # a corner: no particle there
    points = np.vstack([first.prompt_zyx, background])
    with pytest.warns(UserWarning, match="empty mask"):
        res = CryoSAM(weight_free).segment(sim.volume, points, voxel_size=sim.voxel_size,
                                           match=False)
    row = np.nonzero(res.pick_click_row == 1)[0]
    assert len(row) == 1
    np.testing.assert_allclose(res.picks_zyx[row[0]], background[0])
    assert res.pick_n_voxels[row[0]] == 0 and res.pick_scores[row[0]] == 0
    written = write_outputs(res, tmp_path / "o")
    assert len(io.read_points(written["picks.csv"])) == 2


def test_output_folder_is_readable_by_the_group(small_run, tmp_path: Path) -> None:
    import os

    result, _, _ = small_run
    old = os.umask(0o022)
    try:
        written = write_outputs(result, tmp_path / "o")
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert written["picks.csv"].stat().st_mode & 0o777 == 0o644


def test_mrc_outputs_carry_the_first_voxel_index(small_sim, tmp_path: Path, run_cli) -> None:
    """nxstart/nystart/nzstart of the tomogram (a sub-volume's place in its parent's grid)
    go into semantic.mrc and instances.mrc, like the voxel size and the origin."""
    sim, files = small_sim
    tomo = tmp_path / "sub.mrc"
    io.write_mrc(tomo, sim.volume, sim.voxel_size, (30.0, -20.0, 10.0), start=(7, -6, 5))
    out = tmp_path / "out"
    code, _, err = run_cli("segment", tomo, "--points", files["prompt.csv"], "--no-match",
                           "--segmenter", "threshold", "--device", "cpu", "--out", out)
    assert code == 0, err
    for name in ("semantic.mrc", "instances.mrc"):
        with mrcfile.open(out / name, header_only=True) as mrc:
            h = mrc.header
            assert (int(h.nxstart), int(h.nystart), int(h.nzstart)) == (5, -6, 7), name
            assert (float(h.origin.x), float(h.origin.z)) == (10.0, 30.0)


@pytest.mark.parametrize("where", ["clicks", "negatives"])
def test_api_points_outside_are_one_line_in_the_input_voxels(where: str, small_sim,
                                                            weight_free) -> None:
    """Clicks or negative clicks given as (z, y, x) arrays beyond the tomogram: one error
    naming which and the input's own size (not the binned grid's, nor a 'prompt point')."""
    from cryosam.errors import InputError

    sim, _ = small_sim
    far = [[20.0, 90.0, 400.0]]
    clicks, negatives = (far, None) if where == "clicks" else (sim.prompt_points[:1], far)
    word = "click 0" if where == "clicks" else "negative click 0"
    with pytest.raises(InputError, match=rf"^{word} at z,y,x = 20,90,400 voxels lies outside "
                                         r"the tomogram \(z,y,x size 40×96×112\)"):
        CryoSAM(weight_free).segment(sim.volume, clicks, negative_points=negatives)


@pytest.mark.parametrize("clicks, message", [
    (lambda p: p[:2].T, r"^clicks: an array of shape \(3, 2\); give one \(z, y, x\) row per "
                        r"click, shape \(N, 3\) \(transpose it\?\)"),
    (lambda p: p[:2].ravel(), r"^clicks: an array of shape \(6,\)"),
    (lambda p: [[10.0, 10.0]], r"^clicks: an array of shape \(1, 2\)"),
    (lambda p: [[np.nan, 10.0, 10.0]], r"^click 0 is not finite"),
    (lambda p: "not a file.csv", r"not a file.csv: file not found"),
])
def test_api_clicks_of_the_wrong_shape_are_one_line(clicks, message, small_sim,
                                                    weight_free) -> None:
    """A (3, N) array, a flat list of two clicks, two coordinates or NaN are refused in one
    line, not read as other clicks (reshape(-1, 3) used to turn a (3, 2) array into two
    wrong clicks)."""
    from cryosam.errors import InputError

    sim, _ = small_sim
    with pytest.raises(InputError, match=message):
        CryoSAM(weight_free).segment(sim.volume, clicks(sim.prompt_points), match=False)


def test_api_clicks_convert_as_a_files_do(small_sim, weight_free) -> None:
    """Array clicks in Å, on a 2x binned copy, or as a DataFrame with x, y, z and negative
    columns land on the same voxels as the same clicks written to a file."""
    import pandas as pd

    from cryosam.errors import InputError

    sim, _ = small_sim
    model = CryoSAM(weight_free)
    p = np.asarray(sim.prompt_points[:1], float)
    vs = float(sim.voxel_size)

    def clicked(points: object, **kw: object) -> np.ndarray:
        return model.segment(sim.volume, points, voxel_size=vs, match=False, **kw).prompt_zyx

    np.testing.assert_allclose(clicked(p * vs, points_unit="angstrom"), p)
    np.testing.assert_allclose(clicked(p / 2, points_bin=2), p)
    np.testing.assert_allclose(clicked(p / 2, points_pixel_size=2 * vs), p)
    # anisotropic voxels: a copy binned 2x is 2x on every axis (the mean size scaled z and x
    # by 1.33 and 2.67 for 10 x 10 x 20 Å voxels)
    from cryosam.inputs import load_inputs

    aniso = (10.0, 10.0, 20.0)
    with pytest.warns(UserWarning, match=r"scaled by 2 to this"):
        got = load_inputs(sim.volume, p / 2, voxel_size=aniso, points_bin=2).prompts
    np.testing.assert_allclose(got, p)
    far = sim.prompt_points[1]
    table = pd.DataFrame({"X": [p[0, 2], far[2]], "Y": [p[0, 1], far[1]],
                          "Z": [p[0, 0], far[0]], "negative": [0, 1]})
    result = model.segment(sim.volume, table, voxel_size=vs)  # x, y, z read by name
    np.testing.assert_allclose(result.prompt_zyx, p)
    assert result.record["inputs"]["negatives_zyx"] == [list(map(float, far))]
    with pytest.raises(InputError, match=r"^clicks \(a table\): the header \(a, b, c\) "
                                         "names no x,y,z columns"):
        model.segment(sim.volume, pd.DataFrame({"a": [1.0], "b": [2.0], "c": [3.0]}))
    with pytest.raises(InputError, match=r"^clicks \(a table\): line 2: x = 'left' is not"):
        model.segment(sim.volume, pd.DataFrame({"x": ["left"], "y": [2.0], "z": [3.0]}))
    # a table of several tomograms' clicks: tomo_name picks the rows, as in a file
    mixed = pd.concat([table.assign(tomo_name="TS_01"),
                       table.assign(tomo_name="TS_02", X=table["X"] + 3)], ignore_index=True)
    picked = model.segment(sim.volume, mixed, voxel_size=vs, tomo_name="TS_01", match=False)
    np.testing.assert_allclose(picked.prompt_zyx, p)
    # pd.DataFrame(array) has no named columns: an array, z, y, x (its header is no click)
    with pytest.warns(UserWarning, match="repeat an earlier click"):  # the same click twice
        twice = clicked(pd.DataFrame(np.vstack([p, p])))
    np.testing.assert_allclose(twice, np.vstack([p, p]))
    # a tomogram named 001 keeps its zeros in a table's name column
    named = pd.DataFrame({"x": [p[0, 2]], "y": [p[0, 1]], "z": [p[0, 0]], "tomo_name": ["001"]})
    np.testing.assert_allclose(clicked(named, tomo_name="001"), p)
    # Å headers as a CSV has them (TARDIS, the CryoET Data Portal)
    in_a = pd.DataFrame({"X [A]": p[:, 2] * vs, "Y [A]": p[:, 1] * vs, "Z [A]": p[:, 0] * vs})
    np.testing.assert_allclose(clicked(in_a, points_unit="angstrom"), p, atol=1e-6)
    with pytest.raises(InputError, match="'nm' is not known"):
        clicked(p, points_unit="nm")


@pytest.mark.parametrize("voxel_size", [0, -5, float("nan"), "ten"])
def test_api_voxel_size_is_checked_before_any_work(voxel_size, small_sim,
                                                   weight_free) -> None:
    """A voxel size that is not a positive number is refused for an array and a Tomogram as
    for a file (an array used to run the whole pipeline with -5 Å and fail when written)."""
    import cryosam
    from cryosam.errors import InputError

    sim, files = small_sim
    for tomo in (sim.volume, cryosam.read_tomogram(files["tomo.mrc"])):
        with pytest.raises(InputError, match="voxel_size"):
            CryoSAM(weight_free).segment(tomo, sim.prompt_points[:1], voxel_size=voxel_size)
    three = CryoSAM(weight_free).segment(sim.volume, sim.prompt_points[:1], match=False,
                                         voxel_size=(10.0, 10.0, 12.0))
    assert three.tomogram.voxel_size == (10.0, 10.0, 12.0)


def test_config_paths_and_values_are_one_line() -> None:
    from cryosam.config import CryosamConfig
    from cryosam.errors import InputError

    with pytest.raises(InputError, match="^matching.topk: no such parameter"):
        CryosamConfig().replace_path("matching.topk", 3)
    with pytest.raises(InputError, match="^matchin.top_k: no such parameter"):
        CryosamConfig().replace_path("matchin.top_k", 3)
    with pytest.raises(InputError, match="^matching.top_k = '100': not a valid value"):
        CryosamConfig().replace_path("matching.top_k", "100")
    assert CryosamConfig().replace_path("matching.top_k", 100).matching.top_k == 100
    for path, value in (("matching.top_k", 3.7), ("matching.top_k", True),
                        ("matching.turns", 1)):
        with pytest.raises(InputError, match=f"^{path} = {value!r}: not a valid value"):
            CryosamConfig().replace_path(path, value)
    with pytest.raises(InputError, match="^matching is a block of parameters"):
        CryosamConfig().replace_path("matching", 3)
    # the kind is the default's, not what a --config wrote (0 for a float score)
    params = CryosamConfig().to_dict()
    params["score"] = {**params["score"], "min_score": 0, "size_tolerance": 1}
    written = CryosamConfig.from_dict(params)
    assert written.replace_path("score.min_score", 0.3).score.min_score == 0.3
    assert written.replace_path("score.size_tolerance", 0.5).score.size_tolerance == 0.5


def test_a_negative_click_on_a_click_is_one_line(small_sim, run_cli, tmp_path) -> None:
    """The same point as a click and a negative click: refused, naming both (it used to run
    as if no negative had been given)."""
    sim, files = small_sim
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--negative-points", files["prompt.csv"], "--encoder",
                           "filterbank", "--segmenter", "threshold", "--device", "cpu")
    assert code == 2 and f"error: the negative click at data row 0 of {files['prompt.csv']} " \
        f"(z,y,x =" in err and f"lies on the click at data row 0 of {files['prompt.csv']}:" \
        in err, err
    # rows of the file itself: a negative row between two clicks, on the second click
    mixed = tmp_path / "mixed.csv"
    x, y, z = sim.prompt_points[1][::-1]
    x0, y0, z0 = sim.prompt_points[0][::-1]
    mixed.write_text(f"x,y,z,negative\n{x0},{y0},{z0},0\n{x},{y},{z},1\n{x},{y},{z},0\n")
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", mixed, "--encoder",
                           "filterbank", "--segmenter", "threshold", "--device", "cpu")
    assert code == 2 and f"negative click at data row 1 of {mixed}" in err and \
        f"lies on the click at data row 2 of {mixed}" in err, err
