"""Files written by other tools (../shared/interop, see its README): read or refused as stated."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import starfile

from cryosam.errors import InputError
from cryosam.io import CryosamWarning, read_points, read_tomogram, write_picks_star

# ------------------------------------------------------------------------------ tomograms


def _read_quietly(path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CryosamWarning)
        tomo = read_tomogram(path, **kwargs)
    return tomo, [str(w.message) for w in caught if issubclass(w.category, CryosamWarning)]


def test_emd_3197_map_and_bz2(interop_dir):
    plain, w1 = _read_quietly(interop_dir / "mrcfile_EMD-3197.map")
    packed, w2 = _read_quietly(interop_dir / "mrcfile_EMD-3197.map.bz2")
    assert w1 == w2 == []
    assert plain.shape == (20, 20, 20) and plain.data.dtype == np.float32
    assert plain.voxel_size == pytest.approx((11.4, 11.4, 11.4))
    assert plain.memory_mapped and not packed.memory_mapped
    np.testing.assert_array_equal(plain.data, packed.data)


def test_emd_3001_axis_order_and_unequal_sizes(interop_dir):
    tomo, messages = _read_quietly(interop_dir / "mrcfile_emd_3001.map.gz")
    assert any("axis order (mapc, mapr, maps) = (3, 1, 2)" in m for m in messages)
    assert any("unequal voxel sizes" in m for m in messages)
    # stored (sections, rows, columns) = (y, x, z) = 25 × 43 × 73 → (z, y, x) = 73 × 25 × 43
    assert tomo.shape == (73, 25, 43)
    assert tomo.voxel_size == pytest.approx((33.03 / 72, 4.71 / 12, 17.93 / 40), rel=1e-4)
    import mrcfile

    with mrcfile.open(interop_dir / "mrcfile_emd_3001.map.gz") as mrc:
        np.testing.assert_array_equal(tomo.data, np.asarray(mrc.data).transpose(2, 0, 1))


def test_float16_reads_as_float32(interop_dir):
    half, _ = _read_quietly(interop_dir / "mrcfilejl_emd_3197_f16.mrc")
    full, _ = _read_quietly(interop_dir / "mrcfile_EMD-3197.map")
    assert half.mode == 12 and half.data.dtype == np.float32
    import mrcfile

    with mrcfile.open(interop_dir / "mrcfilejl_emd_3197_f16.mrc", permissive=True) as mrc:
        np.testing.assert_array_equal(half.data, np.asarray(mrc.data, dtype=np.float32))
    # the same map as EMD-3197 to float16 precision, except 2 voxels that MRCFile.jl stored
    # as 4.0 where the map has 1.9997 (a quirk of that file, not of the reader)
    close = np.isclose(half.data, full.data, atol=5e-3)
    assert np.count_nonzero(~close) <= 2


def test_old_header_int16(interop_dir):
    tomo, _ = _read_quietly(interop_dir / "pyto_tomo_int16.mrc")
    assert tomo.mode == 1 and tomo.shape == (4, 6, 5)
    assert tomo.value_range == (-5.0, 30.0)


def test_imod_unsigned_bytes(interop_dir):
    tomo, messages = _read_quietly(interop_dir / "tardis_mrc3D.mrc")
    assert messages == []
    assert tomo.shape == (78, 64, 32)
    assert tomo.voxel_size == pytest.approx((23.2, 23.2, 23.2), rel=1e-5)
    assert tomo.value_range == (141.0, 163.0)
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile: no MAP stamp
        with mrcfile.open(interop_dir / "tardis_mrc3D.mrc", permissive=True) as mrc:
            raw = np.asarray(mrc.data)  # int8 as mrcfile gives it: all negative
    assert raw.max() < 0
    np.testing.assert_array_equal(tomo.data, raw.view(np.uint8).astype(np.float32))


def test_czportal_signed_and_unsigned_bytes(interop_dir):
    signed, _ = _read_quietly(interop_dir / "czportal_signed_ints.mrc")
    unsigned, _ = _read_quietly(interop_dir / "czportal_unsigned_ints.mrc")
    assert signed.value_range == (-128.0, 127.0)
    assert unsigned.value_range == (0.0, 255.0)
    # same bytes on disk: the signed reading wraps to the unsigned one modulo 256
    np.testing.assert_array_equal(np.mod(signed.data, 256), unsigned.data)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("mrcfilejl_emd_3197_proj.mrcs", "stack of 10 2-D images"),
        ("tardis_mrc2D.mrc", "2-D image"),
        ("README.md", "not an MRC file"),
    ],
)
def test_refused_tomograms_via_cli(interop_dir, run_cli, name, match):
    with pytest.raises(InputError, match=match):
        read_tomogram(interop_dir / name)
    code, out, err = run_cli("info", str(interop_dir / name))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0]
    assert "Traceback" not in err


def test_cli_info_on_emd_3001_warns(interop_dir, run_cli):
    code, out, err = run_cli("info", str(interop_dir / "mrcfile_emd_3001.map.gz"))
    assert code == 0
    assert "x 43, y 25, z 73 voxels" in out
    assert [line.split(":")[0] for line in err.strip().splitlines()] == ["warning", "warning"]


# --------------------------------------------------------------------------------- points


def test_czportal_comma_csv_with_and_without_header(interop_dir):
    expected_xyz = [[1, 2, 3], [2, 2, 2], [0, 3, 0]]
    for name in ("czportal_points.csv", "czportal_points_with_header.csv",
                 "czportal_points_tab_delim.csv"):
        np.testing.assert_array_equal(read_points(interop_dir / name).xyz, expected_xyz)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("czportal_points_with_header_pipe_delim.csv", "'|'-separated"),
        ("czportal_tardis.csv", r"in Å; pass --points-unit angstrom"),
        ("starfile_empty_loop.star", "no points"),
        ("starfile_rln3.1_data_style.star", "2 data blocks hold coordinates"),
        ("cylindra_relion5_optimisation_set.star", "optimisation set"),
        ("cylindra_relion5_tomograms.star", "tomogram set"),
    ],
)
def test_refused_point_files(interop_dir, name, match):
    with pytest.raises(InputError, match=match) as exc:
        read_points(interop_dir / name)
    assert name in str(exc.value) and "\n" not in str(exc.value)


def test_tardis_csv_in_angstrom(interop_dir):
    points = read_points(interop_dir / "czportal_tardis.csv", unit="angstrom", voxel_size=2.0)
    np.testing.assert_allclose(points.xyz[:2], [[2, 4, 6], [2, 2, 2]])
    np.testing.assert_array_equal(points.columns["ids"], [0, 0, 1, 1, 1, 2])


def test_chlamy_relion3(interop_dir):
    path = interop_dir / "chlamy_hsp60_relion3.star"
    points = read_points(path)  # one tomogram: no choice needed
    assert len(points) == 27
    np.testing.assert_allclose(points.xyz[0], [1142.0204, 3235.5812, 1015.192])
    assert set(points.columns["tomo_name"]) == {"tomo_0054"}
    assert len(read_points(path, tomo_name="tomo_0054")) == 27
    with pytest.raises(InputError, match="tomo_0054"):
        read_points(path, tomo_name="tomo_0055")


@pytest.mark.parametrize(
    ("name", "tomo", "xyz"),
    [
        ("czportal_relion_3_star.star", "tomo_2", [[6, 4, 2], [0, 6, 0], [8, 4, 2]]),
        ("czportal_relion_3_star.star", "tomo_1.tomostar", [[4, 8, 12], [4, 4, 4]]),
        ("czportal_relion_4_star.star", "TS_003", [[3, 2, 1]]),
        ("czportal_tomoman_relion_star.star", "grid_1_lamella1_pos1", [[4, 8, 12], [4, 4, 4]]),
    ],
)
def test_czportal_star_selection(interop_dir, name, tomo, xyz):
    path = interop_dir / name
    with pytest.raises(InputError, match="3 tomograms"):
        read_points(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryosamWarning)  # rlnOrigin shifts are not applied
        np.testing.assert_allclose(read_points(path, tomo_name=tomo).xyz, xyz)


def test_tomoman_pixel_size_scales_to_a_binned_tomogram(interop_dir):
    path = interop_dir / "czportal_tomoman_relion_star.star"  # rlnPixelSize 1.96
    with pytest.warns(CryosamWarning, match="scaled by 0.25"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*rlnOrigin", CryosamWarning)
        points = read_points(path, tomo_name="grid_1_lamella1_pos1", voxel_size=7.84)
    np.testing.assert_allclose(points.xyz, [[1, 2, 3], [1, 1, 1]])


def _cylindra_tomograms(interop_dir) -> dict[str, tuple[tuple[int, int, int], float]]:
    df = starfile.read(interop_dir / "cylindra_relion5_tomograms.star")
    out = {}
    for _, row in df.iterrows():
        binning = float(row["rlnTomoTomogramBinning"])
        shape = tuple(int(row[f"rlnTomoSize{a}"] / binning) for a in "ZYX")
        out[row["rlnTomoName"]] = (shape, float(row["rlnTomoTiltSeriesPixelSize"]) * binning)
    return out


def test_cylindra_relion5_centered_coordinates(interop_dir):
    path = interop_dir / "cylindra_relion5_particles.star"
    tomos = _cylindra_tomograms(interop_dir)
    assert tomos["TS_02"] == ((44, 136, 84), pytest.approx(10.52))
    raw = starfile.read(path)
    with pytest.raises(InputError, match="TS_01, TS_02"):
        read_points(path, shape=(44, 136, 84), voxel_size=10.52)
    for name, (shape, vs) in tomos.items():
        rows = raw[raw["rlnTomoName"] == name]
        angst = rows[[f"rlnCenteredCoordinate{a}Angst" for a in "ZYX"]].to_numpy()
        # RELION-5 ParticleSet decentring: pixel = centered Å / pixel size + size / 2
        expected = angst / vs + np.asarray(shape) / 2.0
        points = read_points(path, shape=shape, voxel_size=vs, tomo_name=name,
                             check_bounds=False)
        np.testing.assert_allclose(points.zyx, expected, atol=1e-9)
    np.testing.assert_allclose(
        read_points(path, shape=(44, 136, 84), voxel_size=10.52, tomo_name="TS_02").xyz[0],
        [-58.030014 / 10.52 + 42, 386.650021 / 10.52 + 68, 9.08 / 10.52 + 22],
    )
    # TS_01's first and third particles lie beyond y = 0 … 136 of the declared tomogram
    with pytest.raises(InputError, match="row 1 of data_particles.*outside.*and 1 more"):
        read_points(path, shape=(44, 136, 84), voxel_size=10.52, tomo_name="TS_01")


def test_our_star_matches_cylindra_and_chlamy_conventions(interop_dir, tmp_path):
    """cryosam's STAR: cylindra's RELION-5 block and columns, chlamy's RELION-3 columns."""
    cyl = starfile.read(interop_dir / "cylindra_relion5_particles.star", always_dict=True)
    chl = starfile.read(interop_dir / "chlamy_hsp60_relion3.star", always_dict=True)
    shape, vs = (44, 136, 84), 10.52
    ts02 = cyl["particles"][cyl["particles"]["rlnTomoName"] == "TS_02"]
    zyx = read_points(interop_dir / "cylindra_relion5_particles.star", shape=shape,
                      voxel_size=vs, tomo_name="TS_02").zyx
    out = tmp_path / "picks.star"
    write_picks_star(out, zyx, tomo_name="TS_02", voxel_size=vs, shape=shape, scores=[1.0, 0.5])
    ours = starfile.read(out, always_dict=True)
    assert list(ours) == list(cyl) == ["particles"]
    df = ours["particles"]
    assert set(cyl["particles"].columns) <= set(df.columns)
    assert {"rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ", "rlnTomoName"} <= set(
        chl[""].columns
    ) & set(df.columns)
    for axis in "XYZ":
        column = f"rlnCenteredCoordinate{axis}Angst"
        np.testing.assert_allclose(df[column], ts02[column], atol=1e-5)


def test_a_click_on_the_imod_crop_warns_that_its_mask_is_no_particle(interop_dir, run_cli,
                                                                     tmp_path):
    """A real IMOD tomogram crop (78x64x32): the probe used to read a 26-voxel 'particle'
    (as wide as the crop) and write a mask of 63 % of it as pick 1 without a word. The size
    is now unknown, and a clicked mask over a tenth of the tomogram is warned of."""
    clicks = tmp_path / "click.csv"
    clicks.write_text("x,y,z\n16,32,39\n")
    out = tmp_path / "out"
    code, _, err = run_cli("segment", interop_dir / "tardis_mrc3D.mrc", "--points", clicks,
                           "--encoder", "filterbank", "--segmenter", "threshold", "--device",
                           "cpu", "--out", out)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["probe"]["radius_voxels"] is None
    assert "of the tomogram: that is no single particle" in err
    assert any("no single particle" in w for w in record["warnings"])
