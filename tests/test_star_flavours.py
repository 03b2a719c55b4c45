"""One STAR file per tool beside picks.star: RELION-5 (centred Å), Warp/M (tomogram pixels,
NAME.tomostar) and RELION-4 (unbinned tilt-series pixels), each read back with starfile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryosam import io
from cryosam.errors import CryosamWarning, InputError
from cryosam.export import OUTPUT_FILES, write_outputs
from cryosam.io import (
    STAR_FLAVOURS,
    StarOutputs,
    read_points,
    star_tomo_name,
    write_flavour_star,
)

ZYX = np.array([[3.0, 10.5, 20.25], [0.0, 0.0, 0.0], [43.0, 135.0, 83.0]])
SHAPE, VS = (44, 136, 84), 10.52  # cylindra's TS_01/TS_02 tomograms (tomograms.star)
SCORES = [0.9, 0.5, 0.25]
XYZ = ZYX[:, ::-1]


def _read(path: Path) -> dict:
    return starfile.read(path, always_dict=True)


@pytest.mark.parametrize(("name", "expected"), [
    ("rec_TS_01.mrc", "TS_01"),  # RELION-5 reconstructions
    ("/data/warp/reconstruction/TS_01_10.00Apx.mrc", "TS_01"),  # Warp
    ("TS_01_10.00Apx", "TS_01"),
    ("TS_01_7Apx_denoised.mrc", "TS_01"),
    ("TS_01.mrc.gz", "TS_01"),
    ("TS_01.tomostar", "TS_01"),
    ("tomo_0054", "tomo_0054"),
    ("rec_", "rec_"),
    ("14069", "14069"),
])
def test_star_tomo_name_strips_relion_and_warp_decorations(name: str, expected: str) -> None:
    assert star_tomo_name(name) == expected


def test_relion5_flavour_columns_and_centred_angstrom(tmp_path: Path) -> None:
    path = tmp_path / "r5.star"
    write_flavour_star(path, "relion5", ZYX, tomo_name="TS_01", voxel_size=VS, shape=SHAPE,
                       scores=SCORES)
    blocks = _read(path)
    assert list(blocks) == ["particles"]  # RELION-5 takes the optics from tomograms.star
    df = blocks["particles"]
    assert list(df.columns) == ["rlnTomoName", "rlnCenteredCoordinateXAngst",
                                "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst",
                                "rlnAutopickFigureOfMerit", "rlnPixelSize"]
    assert set(df["rlnTomoName"]) == {"TS_01"}
    size_xyz = np.array(SHAPE[::-1], float)
    centred = df[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy(float)
    # RELION's convention: Å = (voxel - size / 2) * voxel size; the centre voxel is size / 2
    np.testing.assert_allclose(centred, (XYZ - size_xyz / 2) * VS, atol=1e-4)
    np.testing.assert_allclose(df["rlnPixelSize"], VS)
    np.testing.assert_allclose(df["rlnAutopickFigureOfMerit"], SCORES)
    back = read_points(path, shape=SHAPE, voxel_size=VS, tomo_name="TS_01")
    np.testing.assert_allclose(back.zyx, ZYX, atol=1e-4)


def test_warp_flavour_tomostar_and_tomogram_pixels(tmp_path: Path) -> None:
    path = tmp_path / "warp.star"
    write_flavour_star(path, "warp", ZYX, tomo_name="TS_01", voxel_size=VS, shape=SHAPE,
                       scores=SCORES)
    blocks = _read(path)
    assert list(blocks) == ["particles"]
    df = blocks["particles"]
    assert list(df.columns) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                                "rlnCoordinateZ", "rlnAutopickFigureOfMerit", "rlnPixelSize"]
    assert set(df["rlnMicrographName"]) == {"TS_01.tomostar"}
    np.testing.assert_allclose(df[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
                               .to_numpy(float), XYZ, atol=1e-5)
    np.testing.assert_allclose(df["rlnPixelSize"], VS)
    # cryosam reads it back by the tomogram's name (".tomostar" is a name suffix)
    back = read_points(path, shape=SHAPE, voxel_size=VS, tomo_name="TS_01")
    np.testing.assert_allclose(back.zyx, ZYX, atol=1e-5)
    # a name that already ends in .tomostar is kept; no voxel size: no pixel-size column
    write_flavour_star(path, "warp", ZYX, tomo_name="TS_02.tomostar")
    df = _read(path)["particles"]
    assert set(df["rlnMicrographName"]) == {"TS_02.tomostar"}
    assert "rlnPixelSize" not in df.columns and "rlnAutopickFigureOfMerit" not in df.columns


def test_relion4_flavour_unbinned_tilt_series_pixels(tmp_path: Path) -> None:
    path = tmp_path / "r4.star"
    ts = 2.63  # the tomogram is the tilt series binned 4x
    write_flavour_star(path, "relion4", ZYX, tomo_name="TS_01", voxel_size=VS, shape=SHAPE,
                       scores=SCORES, tilt_series_pixel_size=ts)
    blocks = _read(path)
    assert list(blocks) == ["optics", "particles"]
    optics, df = blocks["optics"], blocks["particles"]
    assert list(optics.columns) == ["rlnOpticsGroup", "rlnOpticsGroupName",
                                    "rlnTomoTiltSeriesPixelSize"]
    assert optics["rlnTomoTiltSeriesPixelSize"].iloc[0] == pytest.approx(ts)
    assert list(df.columns) == ["rlnTomoName", "rlnCoordinateX", "rlnCoordinateY",
                                "rlnCoordinateZ", "rlnOpticsGroup", "rlnAutopickFigureOfMerit"]
    np.testing.assert_allclose(df[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
                               .to_numpy(float), XYZ * VS / ts, atol=1e-4)
    assert set(df["rlnOpticsGroup"]) == {1}
    # cryosam's reader scales tilt-series pixels back to this tomogram's voxels
    with pytest.warns(CryosamWarning, match="scaled by"):
        back = read_points(path, shape=SHAPE, voxel_size=VS, tomo_name="TS_01")
    np.testing.assert_allclose(back.zyx, ZYX, atol=1e-4)


def test_relion5_flavour_agrees_with_cylindra(interop_dir: Path, tmp_path: Path) -> None:
    """Same block, name and coordinate columns, same units (Å from the centre) as cylindra's
    RELION-5 particles; its coordinates come back unchanged through cryosam's voxels."""
    cyl = _read(interop_dir / "cylindra_relion5_particles.star")
    tomos = starfile.read(interop_dir / "cylindra_relion5_tomograms.star")
    row = tomos[tomos["rlnTomoName"] == "TS_01"].iloc[0]
    shape = (int(row["rlnTomoSizeZ"]), int(row["rlnTomoSizeY"]), int(row["rlnTomoSizeX"]))
    vs = float(row["rlnTomoTiltSeriesPixelSize"]) * float(row["rlnTomoTomogramBinning"])
    theirs = cyl["particles"][cyl["particles"]["rlnTomoName"] == "TS_01"]
    zyx = theirs[[f"rlnCenteredCoordinate{a}Angst" for a in "ZYX"]].to_numpy(float) / vs \
        + np.array(shape) / 2.0
    out = tmp_path / "picks_relion5.star"
    write_flavour_star(out, "relion5", zyx, tomo_name=star_tomo_name("rec_TS_01.mrc"),
                       voxel_size=vs, shape=shape)
    ours = _read(out)
    assert list(ours) == list(cyl) == ["particles"]
    df = ours["particles"]
    assert list(df.columns[:4]) == list(cyl["particles"].columns)
    assert set(df["rlnTomoName"]) == {"TS_01"}
    for axis in "XYZ":
        column = f"rlnCenteredCoordinate{axis}Angst"
        np.testing.assert_allclose(df[column], theirs[column], atol=1e-4)


def test_star_outputs_choices_fail_before_work() -> None:
    assert StarOutputs().selected() == ("relion5", "warp")
    assert StarOutputs(tilt_series_pixel_size=2.5).selected() == ("relion5", "warp", "relion4")
    assert StarOutputs(("warp", "warp")).selected() == ("warp",)
    with pytest.raises(InputError, match="--star relion4.*--tilt-series-pixel-size"):
        StarOutputs(("relion4",))
    with pytest.raises(InputError, match="--star 'relion3'.*relion5, warp, relion4"):
        StarOutputs(("relion3",))
    with pytest.raises(InputError, match="--tilt-series-pixel-size"):
        StarOutputs(tilt_series_pixel_size=0.0)
    with pytest.raises(InputError, match="--star-tomo-name"):
        StarOutputs(tomo_name=" ")
    assert set(STAR_FLAVOURS.values()) <= set(OUTPUT_FILES)


@pytest.fixture(scope="module")
def warp_named_run(small_sim, weight_free, tmp_path_factory: pytest.TempPathFactory):
    """One weight-free run on the small tomogram saved under a Warp name."""
    from cryosam.pipeline import CryoSAM

    _, files = small_sim
    folder = tmp_path_factory.mktemp("warp")
    tomo = folder / "TS_07_10.00Apx.mrc"
    shutil.copy(files["tomo.mrc"], tomo)
    result = CryoSAM(weight_free).segment(tomo, files["prompt.csv"])
    return result, folder


def test_outputs_default_to_relion5_and_warp_named_after_the_tomogram(warp_named_run) -> None:
    result, folder = warp_named_run
    out = folder / "default"
    written = write_outputs(result, out)
    assert {"picks_relion5.star", "picks_warp.star"} <= set(written)
    assert "picks_relion4.star" not in written
    assert set(written) == set(OUTPUT_FILES) - {"picks_relion4.star", "membranes.csv"}
    r5 = _read(out / "picks_relion5.star")["particles"]
    warp = _read(out / "picks_warp.star")["particles"]
    assert set(r5["rlnTomoName"]) == {"TS_07"}
    assert set(warp["rlnMicrographName"]) == {"TS_07.tomostar"}
    # picks.star keeps today's name (the file's stem) and both column sets
    old = _read(out / "picks.star")["particles"]
    assert set(old["rlnTomoName"]) == {"TS_07_10.00Apx"}
    xyz = result.picks_zyx[:, ::-1]
    np.testing.assert_allclose(warp[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
                               .to_numpy(float), xyz, atol=1e-4)
    size = np.array(result.tomogram.shape[::-1], float)
    np.testing.assert_allclose(r5[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]]
                               .to_numpy(float), (xyz - size / 2) * 10.0, atol=1e-3)
    np.testing.assert_allclose(r5["rlnAutopickFigureOfMerit"], result.pick_scores, atol=1e-5)


def test_outputs_with_a_tilt_series_pixel_size_add_relion4_and_overwrite_cleanly(
        warp_named_run) -> None:
    result, folder = warp_named_run
    out = folder / "all"
    written = write_outputs(result, out, tomo_name="ignored_for_flavours",
                            star=StarOutputs(tomo_name="TS_99", tilt_series_pixel_size=2.5))
    assert set(written) == set(OUTPUT_FILES) - {"membranes.csv"}
    r4 = _read(out / "picks_relion4.star")
    assert set(r4["particles"]["rlnTomoName"]) == {"TS_99"}
    np.testing.assert_allclose(
        r4["particles"][["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
        .to_numpy(float), result.picks_zyx[:, ::-1] * 10.0 / 2.5, atol=1e-3)
    assert set(_read(out / "picks_warp.star")["particles"]["rlnMicrographName"]) \
        == {"TS_99.tomostar"}
    assert set(_read(out / "picks.star")["particles"]["rlnTomoName"]) \
        == {"ignored_for_flavours"}
    # run.json records what the STAR files were written with (RELION-4's pixel size was lost)
    assert json.loads((out / "run.json").read_text())["star"] == {
        "flavours": ["relion5", "warp", "relion4"], "tomo_name": "TS_99",
        "tilt_series_pixel_size": 2.5}
    # a folder holding picks_relion4.star is still cryosam's own: --overwrite replaces it
    written = write_outputs(result, out, overwrite=True, star=StarOutputs(("warp",)))
    names = {p.name for p in out.iterdir()}
    assert "picks_warp.star" in names and "picks_relion5.star" not in names
    assert "picks_relion4.star" not in names and "picks_relion5.star" not in written


def test_no_voxel_size_writes_warp_and_says_why_relion5_is_missing(warp_named_run) -> None:
    import dataclasses

    result, folder = warp_named_run
    bare = dataclasses.replace(result, tomogram=dataclasses.replace(result.tomogram,
                                                                    voxel_size=None))
    with pytest.warns(CryosamWarning, match="picks_relion5.star not written.*--voxel-size"):
        written = write_outputs(bare, folder / "bare", preview=False)
    assert "picks_warp.star" in written and "picks_relion5.star" not in written
    assert "rlnPixelSize" not in _read(written["picks_warp.star"])["particles"].columns


def test_run_json_keeps_the_warnings_of_writing_the_outputs(small_sim, tmp_path: Path,
                                                            run_cli) -> None:
    """The run record holds every warning the run gave, the outputs' own included (the
    missing RELION-5 file was said on screen but not recorded)."""
    from cryosam.io import write_mrc

    sim, files = small_sim
    bare = tmp_path / "bare.mrc"
    write_mrc(bare, sim.volume, voxel_size=None)
    out = tmp_path / "out"
    code, _, err = run_cli("segment", bare, "--points", files["prompt.csv"], "--encoder",
                           "filterbank", "--segmenter", "threshold", "--device", "cpu",
                           "--no-match", "--out", out)
    assert code == 0, err
    said = json.loads((out / "run.json").read_text())["warnings"]
    assert any("no usable voxel size" in w for w in said)
    assert any(w.startswith("picks_relion5.star not written") for w in said)


def test_cli_star_options(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    out = tmp_path / "out"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--encoder", "filterbank", "--segmenter", "threshold",
                           "--device", "cpu", "--out", out, "-q",
                           "--tomo-name", "clicks", "--star-tomo-name", "TS_42",
                           "--star", "relion4", "--star", "warp",
                           "--tilt-series-pixel-size", "5")
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {"picks_relion4.star", "picks_warp.star", "picks.star"} <= names
    assert "picks_relion5.star" not in names
    r4 = _read(out / "picks_relion4.star")
    assert set(r4["particles"]["rlnTomoName"]) == {"TS_42"}
    assert r4["optics"]["rlnTomoTiltSeriesPixelSize"].iloc[0] == pytest.approx(5.0)
    csv = io.read_points(out / "picks.csv")
    np.testing.assert_allclose(
        r4["particles"][["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
        .to_numpy(float), csv.zyx[:, ::-1] * 10.0 / 5.0, atol=1e-3)
    assert set(_read(out / "picks.star")["particles"]["rlnTomoName"]) == {"clicks"}


@pytest.mark.parametrize("args", [("--star", "relion4"), ("--star-tomo-name", ""),
                                  ("--star", "relion4", "--tilt-series-pixel-size", "0")])
def test_cli_bad_star_choice_is_one_line_exit_2_before_work(args, small_sim, tmp_path: Path,
                                                            run_cli) -> None:
    _, files = small_sim
    out = tmp_path / "out"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--encoder", "filterbank", "--segmenter", "threshold", "--out", out,
                           *args)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert any(flag in lines[0] for flag in args if flag.startswith("--")), lines[0]
    assert not out.exists()


def test_cli_unknown_star_flavour_is_a_usage_error(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", tmp_path / "out", "--star", "relion3")
    assert code == 2 and "--star" in err and "relion5" in err
    assert not (tmp_path / "out").exists()


def test_anisotropic_voxels_give_right_angstroms_and_read_back(tmp_path: Path) -> None:
    """Voxels of 9.1 x 6.5 x 7.84 Å (z, y, x): Warp multiplies every axis by its one pixel
    size, so its coordinates are pixels of the mean size (they were raw voxels beside the mean
    size: 39 Å off); RELION-5 states no single rlnPixelSize for them. Both read back to the
    same voxels, and the reader's warning names each axis's factor."""
    vs = (9.1, 6.5, 7.84)
    warp, r5 = tmp_path / "w.star", tmp_path / "r5.star"
    write_flavour_star(warp, "warp", ZYX, tomo_name="TS_01", voxel_size=vs, shape=SHAPE)
    write_flavour_star(r5, "relion5", ZYX, tomo_name="TS_01", voxel_size=vs, shape=SHAPE)
    df = _read(warp)["particles"]
    angst = df[["rlnCoordinateZ", "rlnCoordinateY", "rlnCoordinateX"]].to_numpy(float) * \
        df["rlnPixelSize"].to_numpy(float)[:, None]
    np.testing.assert_allclose(angst, ZYX * np.array(vs), atol=1e-3)
    assert "rlnPixelSize" not in _read(r5)["particles"].columns
    for path in (warp, r5):
        with pytest.warns(CryosamWarning) if path is warp else _no_warning():
            back = read_points(path, shape=SHAPE, voxel_size=vs, tomo_name="TS_01")
        np.testing.assert_allclose(back.zyx, ZYX, atol=1e-4)
    iso = tmp_path / "iso.star"  # 7.84 Å pixels read into the anisotropic tomogram
    write_flavour_star(iso, "warp", ZYX, tomo_name="TS_01", voxel_size=7.84, shape=SHAPE)
    with pytest.warns(CryosamWarning, match=r"scaled by 0\.8615/1\.2062/1 \(z/y/x\)"):
        read_points(iso, shape=SHAPE, voxel_size=vs, tomo_name="TS_01", check_bounds=False)


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def none():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    return none()
