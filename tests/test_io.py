"""Tomogram and point I/O: modes, geometry, refusals, readers and writers round-tripping."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

import cryosam.io
from cryosam.errors import InputError
from cryosam.io import (
    CryosamWarning,
    Tomogram,
    negative_rows,
    read_points,
    read_tomogram,
    star_tomo_names,
    write_mrc,
    write_napari_csv,
    write_picks_csv,
    write_picks_star,
)

RNG = np.random.default_rng(0)


def _volume(shape=(6, 7, 8)) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _new_mrc(path: Path, data: np.ndarray, voxel_size=None, **header) -> Path:
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile on NaN/inf test data
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
        mrc.update_header_stats()
        for key, value in header.items():
            setattr(mrc.header, key, value)
    return path


def _no_cryosam_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryosamWarning)
        return fn(*args, **kwargs)


# ------------------------------------------------------------------ MRC: round trip and modes


def test_write_mrc_round_trip_keeps_geometry_and_validates(tmp_path):
    vol = _volume()
    path = tmp_path / "out" / "vol.mrc"
    write_mrc(path, vol, voxel_size=(12.0, 11.0, 10.0), origin=(30.0, 20.0, 10.0))
    report = io.StringIO()
    assert mrcfile.validate(str(path), print_file=report), report.getvalue()
    with pytest.warns(CryosamWarning, match="unequal voxel sizes"):
        tomo = read_tomogram(path)
    np.testing.assert_array_equal(tomo.data, vol)
    assert tomo.voxel_size == pytest.approx((12.0, 11.0, 10.0))
    assert tomo.origin == pytest.approx((30.0, 20.0, 10.0))
    assert tomo.shape == vol.shape
    assert tomo.memory_mapped and isinstance(tomo.data, np.memmap)
    assert not tomo.data.flags.writeable
    assert tomo.value_range == pytest.approx((float(vol.min()), float(vol.max())))
    assert tomo.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(tmp_path.joinpath("out").iterdir()) == [path]


def test_first_voxel_index_is_read_and_written_like_the_origin(tmp_path):
    """nxstart/nystart/nzstart (where the volume's first voxel sits in the header's grid)
    come in as ``start`` (z, y, x) and go out again."""
    path = _new_mrc(tmp_path / "sub.mrc", _volume(), voxel_size=10.0, nxstart=5, nystart=-6,
                    nzstart=7)
    tomo = _no_cryosam_warnings(read_tomogram, path)
    assert tomo.start == (7, -6, 5)
    copy = tmp_path / "copy.mrc"
    write_mrc(copy, tomo.data, tomo.voxel_size, tomo.origin, tomo.start)
    with mrcfile.open(copy, header_only=True) as mrc:
        assert (mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart) == (5, -6, 7)
    assert _no_cryosam_warnings(read_tomogram, copy).start == (7, -6, 5)
    write_mrc(copy, tomo.data)
    assert _no_cryosam_warnings(read_tomogram, copy, voxel_size=1.0).start == (0, 0, 0)


@pytest.mark.parametrize(
    ("data", "expected_mode"),
    [
        (np.array([[[-3, 0], [5, 127]], [[-128, 1], [2, 3]]], dtype=np.int8), 0),
        (np.array([[[-300, 0], [5, 3000]], [[-1, 1], [2, 3]]], dtype=np.int16), 1),
        (np.array([[[0, 60000], [5, 7]], [[1, 1], [2, 3]]], dtype=np.uint16), 6),
        (np.array([[[0.5, -2.25], [5, 7]], [[1, 1], [2, 3]]], dtype=np.float16), 12),
    ],
)
def test_modes_are_read_as_float32_values(tmp_path, data, expected_mode):
    path = _new_mrc(tmp_path / "m.mrc", data, voxel_size=5.0)
    tomo = _no_cryosam_warnings(read_tomogram, path)
    assert tomo.mode == expected_mode
    assert tomo.data.dtype == np.float32
    assert not tomo.memory_mapped
    np.testing.assert_array_equal(tomo.data, data.astype(np.float32))


def test_mode0_unsigned_from_header_stats(tmp_path):
    values = np.array([[[141, 163], [150, 128]], [[200, 0], [255, 1]]], dtype=np.uint8)
    path = _new_mrc(tmp_path / "u8.mrc", values.view(np.int8), voxel_size=5.0)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.dmin, mrc.header.dmax = 0, 255
    tomo = read_tomogram(path)
    np.testing.assert_array_equal(tomo.data, values.astype(np.float32))
    assert "uint8" in tomo.file_dtype


@pytest.mark.parametrize(("flags", "unsigned"), [(1, False), (0, True)])
def test_mode0_imod_stamp_decides(tmp_path, flags, unsigned):
    raw = np.array([[[-3, 0], [5, 127]], [[-128, 1], [2, 3]]], dtype=np.int8)
    path = _new_mrc(tmp_path / "imod.mrc", raw, voxel_size=5.0)
    with mrcfile.open(path, mode="r+") as mrc:
        extra = bytearray(bytes(mrc.header.extra2))
        extra[40:48] = np.array([1146047817, flags], dtype="<i4").tobytes()
        mrc.header.extra2 = bytes(extra)
        mrc.header.dmin, mrc.header.dmax = -128, 255  # contradictory stats: the stamp wins
    expected = raw.view(np.uint8 if unsigned else np.int8).astype(np.float32)
    np.testing.assert_array_equal(read_tomogram(path).data, expected)


@pytest.mark.parametrize("unsigned", [True, False])
def test_mode0_without_stats_uses_the_data(tmp_path, unsigned):
    noise = np.random.default_rng(1).normal(0, 8, size=(5, 6, 7)).round()
    values = (noise + 128).astype(np.uint8) if unsigned else noise.astype(np.int8)
    path = _new_mrc(tmp_path / "b.mrc", values.view(np.int8), voxel_size=5.0)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.dmin = mrc.header.dmax = mrc.header.dmean = 0
    np.testing.assert_array_equal(read_tomogram(path).data, values.astype(np.float32))


def test_gzip_and_bzip2_are_read(tmp_path):
    vol = _volume()
    plain = tmp_path / "v.mrc"
    write_mrc(plain, vol, voxel_size=7.5)
    gz = tmp_path / "v.mrc.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    bz = tmp_path / "v.mrc.bz2"
    bz.write_bytes(bz2.compress(plain.read_bytes()))
    for path in (gz, bz):
        tomo = _no_cryosam_warnings(read_tomogram, path)
        np.testing.assert_array_equal(tomo.data, vol)
        assert tomo.voxel_size == pytest.approx((7.5, 7.5, 7.5))
        assert not tomo.memory_mapped


def test_non_standard_axis_order_is_transposed(tmp_path):
    vol = _volume((4, 5, 6))  # (z, y, x)
    stored = np.ascontiguousarray(vol.transpose(1, 2, 0))  # sections = y, rows = x, cols = z
    path = _new_mrc(tmp_path / "crs.mrc", stored)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = 3, 1, 2
        mrc.header.mx, mrc.header.my, mrc.header.mz = 6, 5, 4
        mrc.header.cella = (6 * 10.0, 5 * 10.0, 4 * 10.0)
        mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = 3, 2, 1  # z, x, y
    with pytest.warns(CryosamWarning, match="axis order"):
        tomo = read_tomogram(path)
    np.testing.assert_array_equal(tomo.data, vol)
    assert tomo.voxel_size == pytest.approx((10.0, 10.0, 10.0))
    assert tomo.start == (3, 1, 2)


def test_zero_voxel_size_warns_and_override_wins(tmp_path):
    path = _new_mrc(tmp_path / "zero.mrc", _volume())
    with pytest.warns(CryosamWarning, match="no usable voxel size"):
        assert read_tomogram(path).voxel_size is None
    tomo = _no_cryosam_warnings(read_tomogram, path, voxel_size=13.5)
    assert tomo.voxel_size == (13.5, 13.5, 13.5)
    assert tomo.mean_voxel_size == pytest.approx(13.5)
    with pytest.raises(InputError, match="voxel-size"):
        read_tomogram(path, voxel_size=-1.0)


# ------------------------------------------------------------------------- MRC: refusals


def _refuse(path: Path, match: str) -> str:
    with pytest.raises(InputError, match=match) as exc:
        read_tomogram(path)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    return message


def test_refusals(tmp_path):
    _refuse(tmp_path / "missing.mrc", "not found")
    text = tmp_path / "notes.mrc"
    text.write_text("this is not a tomogram\n" * 100)
    _refuse(text, "not an MRC file")
    tiny = tmp_path / "tiny.mrc"
    tiny.write_bytes(b"MRC?")
    _refuse(tiny, "not an MRC file")
    noise = tmp_path / "noise.mrc"
    noise.write_bytes(np.random.default_rng(5).bytes(8192))
    _refuse(noise, "not an MRC file")
    _refuse(tmp_path, "folder")

    image = _new_mrc(tmp_path / "image.mrc", _volume((1, 7, 8))[0])
    _refuse(image, "2-D image")
    stack = tmp_path / "stack.mrcs"
    with mrcfile.new(stack) as mrc:
        mrc.set_data(_volume((5, 7, 8)))
        mrc.set_image_stack()
    _refuse(stack, "stack of 5 2-D images")
    volumes = tmp_path / "volumes.mrc"  # two 4-section volumes flagged as a volume stack
    with mrcfile.new(volumes) as mrc:
        mrc.set_data(_volume((8, 7, 8)))
        mrc.header.ispg = 401
        mrc.header.mz = 4
    _refuse(volumes, "a stack of 2 volumes of 4 sections each")

    for bad in (np.nan, np.inf):
        vol = _volume()
        vol[2, 3, 4] = bad
        _refuse(_new_mrc(tmp_path / f"bad{bad}.mrc", vol), "NaN or infinite")

    good = _new_mrc(tmp_path / "good.mrc", _volume((6, 7, 8)), voxel_size=5.0)
    cut = tmp_path / "cut.mrc"
    cut.write_bytes(good.read_bytes()[:-100])
    _refuse(cut, "truncated")
    cut_gz = tmp_path / "cut.mrc.gz"
    cut_gz.write_bytes(gzip.compress(good.read_bytes())[:-200])
    _refuse(cut_gz, "truncated")

    cplx = tmp_path / "fft.mrc"
    with mrcfile.new(cplx) as mrc:
        mrc.set_data(np.zeros((3, 4, 5), dtype=np.complex64))
    _refuse(cplx, "mode 4")


def test_cli_info_prints_geometry(tmp_path, run_cli):
    path = tmp_path / "t.mrc"
    write_mrc(path, _volume((6, 7, 8)), voxel_size=9.5, origin=(1.0, 2.0, 3.0))
    code, out, err = run_cli("info", str(path))
    assert code == 0, err
    assert "x 8, y 7, z 6 voxels" in out
    assert "x 9.5, y 9.5, z 9.5 Å" in out
    assert "x 3, y 2, z 1 Å" in out  # origin
    assert "memory-mapped" in out
    code, out, _ = run_cli("info", str(path), "--voxel-size", "4")
    assert code == 0 and "x 4, y 4, z 4 Å (from --voxel-size)" in out


def test_cli_info_warns_on_one_line_each(tmp_path, run_cli):
    path = _new_mrc(tmp_path / "zero.mrc", _volume())
    code, out, err = run_cli("info", str(path))
    assert code == 0
    assert err.startswith("warning: ") and len(err.strip().splitlines()) == 1
    assert "voxel size:  unknown" in out


@pytest.mark.parametrize("kind", ["missing", "text", "image", "nan"])
def test_cli_info_refusals_exit_2_one_line(tmp_path, run_cli, kind):
    path = tmp_path / f"{kind}.mrc"
    if kind == "text":
        path.write_text("x,y,z\n1,2,3\n" * 200)
    elif kind == "image":
        _new_mrc(path, _volume((1, 7, 8))[0])
    elif kind == "nan":
        vol = _volume()
        vol[0, 0, 0] = np.nan
        _new_mrc(path, vol)
    code, out, err = run_cli("info", str(path))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert "Traceback" not in err


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "mask.mrc"
    with pytest.raises(ValueError):
        write_mrc(path, np.zeros(5, dtype=np.float32))  # mrcfile refuses 1-D data mid-write
    assert list(tmp_path.iterdir()) == []
    write_mrc(path, np.ones((2, 3, 4), dtype=bool))
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_mrc(path, np.zeros(5, dtype=np.float32))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["mask.mrc"]
    assert read_tomogram(path, voxel_size=1.0).data.sum() == 24


@pytest.mark.parametrize(
    ("labels", "mode"),
    [
        (np.arange(24).reshape(2, 3, 4) > 10, 0),
        (np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10, 6),
        (np.arange(24, dtype=np.int64).reshape(2, 3, 4) * 1000, 1),
        (np.arange(24, dtype=np.int64).reshape(2, 3, 4) * 2800, 6),
        (np.arange(24, dtype=np.int64).reshape(2, 3, 4) * 100_000, 2),
    ],
)
def test_write_mrc_label_volumes_exact(tmp_path, labels, mode):
    path = tmp_path / "labels.mrc"
    write_mrc(path, labels, voxel_size=4.0)
    report = io.StringIO()
    assert mrcfile.validate(str(path), print_file=report), report.getvalue()
    tomo = _no_cryosam_warnings(read_tomogram, path)
    assert tomo.mode == mode
    np.testing.assert_array_equal(tomo.data, labels.astype(np.float64))


def test_tomogram_sha256(tmp_path):
    path = tmp_path / "t.mrc"
    write_mrc(path, _volume(), voxel_size=5.0)
    assert read_tomogram(path).sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Tomogram(data=_volume(), voxel_size=None).sha256() is None
    assert not hasattr(cryosam.io, "file_sha256")  # one hashing helper: cryosam.utils


# ---------------------------------------------------------------------------- points: CSV


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_header_any_case_with_extra_columns(tmp_path):
    path = _write(tmp_path / "p.csv", "Kind,X,Y,Z,score\nribo,1,2,3,0.5\nmem,4.5,5,6,1\n")
    points = read_points(path)
    np.testing.assert_array_equal(points.zyx, [[3, 2, 1], [6, 5, 4.5]])
    np.testing.assert_array_equal(points.xyz, [[1, 2, 3], [4.5, 5, 6]])
    assert list(points.columns["kind"]) == ["ribo", "mem"]
    np.testing.assert_array_equal(points.columns["score"], [0.5, 1.0])
    assert points.source == path and len(points) == 2


def test_csv_no_header_comments_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"# clicks\r\n1, 2, 3\r\n\r\n4,5,6\r\n")
    np.testing.assert_array_equal(read_points(path).zyx, [[3, 2, 1], [6, 5, 4]])


def test_csv_napari_axes(tmp_path):
    path = _write(tmp_path / "n.csv", "index,axis-0,axis-1,axis-2\n0,10,20,30\n1,1,2,3\n")
    points = read_points(path)
    np.testing.assert_array_equal(points.zyx, [[10, 20, 30], [1, 2, 3]])
    np.testing.assert_array_equal(points.columns["index"], [0, 1])


def test_csv_angstrom_unit(tmp_path):
    path = _write(tmp_path / "a.csv", "x,y,z\n100,200,300\n")
    points = read_points(path, unit="angstrom", voxel_size=10.0)
    np.testing.assert_allclose(points.zyx, [[30, 20, 10]])
    with pytest.raises(InputError, match="voxel size"):
        read_points(path, unit="angstrom")
    with pytest.raises(InputError, match="points-unit"):
        read_points(path, unit="furlong")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("# only a comment\n\n", "no points"),
        ("x,y,z\n", "header but no points"),
        ("x,y,z\n1,2,3\n4,five,6\n", r"line 3: y = 'five' is not a number"),
        ("x,y,z\n1,2,nan\n", "line 2: z is nan"),
        ("x,y,z\n1,2,3\n1,2\n", "line 3 has 2 values"),
        ("1,2,3,4,5,6\n", "no header"),
        ("a,b,c\n1,2,3\n", "names no x,y,z"),
        ("x|y|z\n1|2|3\n", "'|'-separated"),
    ],
)
def test_csv_refusals_name_file_and_line(tmp_path, text, match):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(InputError, match=match) as exc:
        read_points(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_points_outside_volume(tmp_path):
    path = _write(tmp_path / "p.csv", "x,y,z\n1,2,3\n7.4,2,3\n8,2,3\n")
    with pytest.raises(InputError, match=r"line 4: point x,y,z = 8,2,3 .* outside"):
        read_points(path, shape=(5, 6, 8))
    points = read_points(path, shape=(5, 6, 8), check_bounds=False)
    assert len(points) == 3
    read_points(_write(tmp_path / "edge.csv", "x,y,z\n-0.5,5.5,4.5\n"), shape=(5, 6, 8))


def test_points_file_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_points(tmp_path / "nope.csv")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(InputError, match="not a text file"):
        read_points(binary)


# --------------------------------------------------------------------------- points: STAR


def _star(path: Path, blocks: dict) -> Path:
    starfile.write(blocks, path)
    return path


def test_star_pixel_coordinates_and_tomogram_choice(tmp_path):
    import pandas as pd

    df = pd.DataFrame(
        {
            "rlnTomoName": ["TS_1", "TS_1", "TS_2"],
            "rlnCoordinateX": [1.0, 2.0, 3.0],
            "rlnCoordinateY": [4.0, 5.0, 6.0],
            "rlnCoordinateZ": [7.0, 8.0, 9.0],
            "rlnAutopickFigureOfMerit": [0.9, 0.8, 0.7],
        }
    )
    path = _star(tmp_path / "p.star", {"particles": df})
    with pytest.raises(InputError, match=r"2 tomograms \(TS_1, TS_2\).*--tomo-name"):
        read_points(path)
    points = read_points(path, tomo_name="TS_2")
    np.testing.assert_array_equal(points.zyx, [[9, 6, 3]])
    np.testing.assert_array_equal(points.columns["score"], [0.7])
    with pytest.raises(InputError, match="no points for tomogram 'TS_3'.*TS_1, TS_2"):
        read_points(path, tomo_name="TS_3")
    assert star_tomo_names(path) == ["TS_1", "TS_2"]
    with pytest.raises(InputError, match=r"row 3 of data_particles: point .* outside"):
        read_points(path, tomo_name="TS_2", shape=(9, 10, 10))
    # without --tomo-name, the tomogram's own file name picks its rows ...
    np.testing.assert_array_equal(read_points(path, own_tomo_name="TS_2").zyx, [[9, 6, 3]])
    np.testing.assert_array_equal(read_points(path, own_tomo_name="TS_1.mrc").zyx,
                                  [[7, 4, 1], [8, 5, 2]])
    # ... but never overrides a name the user gave
    np.testing.assert_array_equal(read_points(path, tomo_name="TS_2", own_tomo_name="TS_1").zyx,
                                  [[9, 6, 3]])
    with pytest.raises(InputError, match=r"2 tomograms .*none of them this tomogram \(TS_3\)"):
        read_points(path, own_tomo_name="TS_3")


def test_points_of_another_tomogram_are_used_with_a_warning_and_csv_names_select(tmp_path):
    """A file whose only tomogram is not this one is used, with a warning naming both; a
    combined CSV's tomo_name column selects rows like a STAR file's rlnTomoName."""
    import pandas as pd

    df = pd.DataFrame({"rlnTomoName": ["TS_04"], "rlnCoordinateX": [1.0],
                       "rlnCoordinateY": [2.0], "rlnCoordinateZ": [3.0]})
    path = _star(tmp_path / "p.star", {"particles": df})
    with pytest.warns(CryosamWarning, match="for tomogram 'TS_04', not 'TS_03'.*--tomo-name TS_04"):
        np.testing.assert_array_equal(read_points(path, own_tomo_name="TS_03").zyx, [[3, 2, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own name, or the name given: no warning
        read_points(path, own_tomo_name="TS_04")
        read_points(path, tomo_name="TS_04", own_tomo_name="TS_03")
    csv = tmp_path / "all.csv"
    csv.write_text("x,y,z,tomo_name\n1,2,3,TS_01\n4,5,6,TS_02\n7,8,9,TS_01\n")
    got = read_points(csv, own_tomo_name="TS_01")
    np.testing.assert_array_equal(got.zyx, [[3, 2, 1], [9, 8, 7]])
    assert list(got.columns["tomo_name"]) == ["TS_01", "TS_01"]
    np.testing.assert_array_equal(read_points(csv, tomo_name="TS_02").zyx, [[6, 5, 4]])
    with pytest.raises(InputError, match=r"all.csv: holds points for 2 tomograms"):
        read_points(csv)


def test_names_with_dots_select_their_own_rows(tmp_path):
    """Warp names tomograms L1.2_TS_01.tomostar: only the file extension is dropped when
    matching, so lamella L1.2's tomograms stay apart (they were all 'L1', and TS_01 got
    TS_02's clicks). The file rows of the selected points are kept (click_row)."""
    star = tmp_path / "warp.star"
    star.write_text("data_\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n_rlnCoordinateZ\n"
                    "_rlnMicrographName\n1 2 3 L1.2_TS_01.tomostar\n4 5 6 L1.2_TS_02.tomostar\n"
                    "7 8 9 L1.2_TS_02.tomostar\n")
    for kwargs in ({"own_tomo_name": "L1.2_TS_01"}, {"tomo_name": "L1.2_TS_01"}):
        got = read_points(star, **kwargs)
        np.testing.assert_array_equal(got.zyx, [[3, 2, 1]])
    got = read_points(star, own_tomo_name="L1.2_TS_02")
    np.testing.assert_array_equal(got.zyx, [[6, 5, 4], [9, 8, 7]])
    np.testing.assert_array_equal(got.file_rows, [1, 2])
    # a tomogram named with a descriptive dot still finds its rows when that is unambiguous
    csv = tmp_path / "all.csv"
    csv.write_text("x,y,z,tomo_name\n1,2,3,TS_01\n4,5,6,TS_02\n")
    np.testing.assert_array_equal(read_points(csv, own_tomo_name="TS_01.denoised").zyx,
                                  [[3, 2, 1]])
    with pytest.raises(InputError, match="holds points for 2 tomograms"):
        read_points(star, own_tomo_name="L1.denoised")  # L1 would name both


def test_star_pixel_size_scaling_warns(tmp_path):
    import pandas as pd

    df = pd.DataFrame(
        {"rlnCoordinateX": [400.0], "rlnCoordinateY": [800.0], "rlnCoordinateZ": [40.0],
         "rlnPixelSize": [2.5]}
    )
    path = _star(tmp_path / "p.star", {"": df})
    with pytest.warns(CryosamWarning, match="scaled by 0.25.*pass --points-pixel-size"):
        points = read_points(path, voxel_size=10.0)
    np.testing.assert_allclose(points.zyx, [[10, 200, 100]])
    np.testing.assert_allclose(read_points(path).zyx, [[40, 800, 400]])  # no voxel size: as is
    np.testing.assert_allclose(
        _no_cryosam_warnings(read_points, path, voxel_size=10.0, star_pixel_size=10.0).zyx,
        [[40, 800, 400]],
    )


def test_star_centered_needs_shape_and_voxel_size(tmp_path):
    import pandas as pd

    df = pd.DataFrame(
        {"rlnTomoName": ["a"], "rlnCenteredCoordinateXAngst": [10.0],
         "rlnCenteredCoordinateYAngst": [-20.0], "rlnCenteredCoordinateZAngst": [0.0]}
    )
    path = _star(tmp_path / "c.star", {"particles": df})
    with pytest.raises(InputError, match="size and voxel size"):
        read_points(path)
    points = read_points(path, shape=(31, 40, 50), voxel_size=10.0)
    # RELION-5 decentring: voxel = Å / voxel size + size / 2 (x: 1 + 25, y: -2 + 20, z: 15.5)
    np.testing.assert_allclose(points.zyx, [[15.5, 18.0, 26.0]])


def test_star_refusals(tmp_path):
    import pandas as pd

    path = _star(tmp_path / "o.star", {"optics": pd.DataFrame({"rlnVoltage": [300.0]})})
    with pytest.raises(InputError, match="no particle coordinates"):
        read_points(path)
    bad = _write(tmp_path / "bad.star", "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
                 "_rlnCoordinateZ #3\n1 2 3\n4 x 6\n")
    with pytest.raises(InputError, match=r"row 2 of data_: rlnCoordinateY = 'x'"):
        read_points(bad)
    partial = _star(tmp_path / "xy.star", {"particles": pd.DataFrame(
        {"rlnCoordinateX": [1.0], "rlnCoordinateY": [2.0]})})
    with pytest.raises(InputError, match="not all three axes"):
        read_points(partial)


# ------------------------------------------------------------------------ writers round trip


def _picks(n=5):
    rng = np.random.default_rng(3)
    zyx = rng.uniform(0, 40, size=(n, 3)).round(3)
    return zyx, rng.uniform(0, 1, n).round(6), np.arange(1, n + 1), rng.integers(5, 500, n)


def test_picks_csv_round_trip(tmp_path):
    zyx, scores, ids, nvox = _picks()
    path = tmp_path / "picks.csv"
    write_picks_csv(path, zyx, {"score": scores, "instance_id": ids, "n_voxels": nvox})
    assert path.read_text().splitlines()[0] == "x,y,z,score,instance_id,n_voxels"
    points = read_points(path)
    np.testing.assert_allclose(points.zyx, zyx, atol=1e-9)
    np.testing.assert_allclose(points.columns["score"], scores, atol=1e-9)
    np.testing.assert_array_equal(points.columns["instance_id"], ids)
    np.testing.assert_array_equal(points.columns["n_voxels"], nvox)
    assert points.columns["instance_id"].dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["picks.csv"]


def test_napari_csv_round_trip(tmp_path):
    zyx = _picks()[0]
    path = tmp_path / "picks_napari.csv"
    write_napari_csv(path, zyx)
    assert path.read_text().splitlines()[0] == "index,axis-0,axis-1,axis-2"
    np.testing.assert_allclose(read_points(path).zyx, zyx, atol=1e-9)


def test_picks_star_round_trip_relion3_and_relion5(tmp_path):
    zyx, scores, ids, _ = _picks()
    shape, vs = (41, 50, 60), 8.5
    path = tmp_path / "picks.star"
    write_picks_star(path, zyx, tomo_name="tomo_7", voxel_size=vs, shape=shape, scores=scores,
                     extra={"instance_id": ids})
    blocks = starfile.read(path, always_dict=True)
    assert list(blocks) == ["particles"]
    df = blocks["particles"]
    np.testing.assert_allclose(df[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]],
                               zyx[:, ::-1], atol=1e-6)
    assert set(df["rlnTomoName"]) == {"tomo_7"} and set(df["rlnMicrographName"]) == {"tomo_7"}
    np.testing.assert_allclose(df["rlnAutopickFigureOfMerit"], scores, atol=1e-6)

    points = _no_cryosam_warnings(read_points, path, shape=shape, voxel_size=vs)
    np.testing.assert_allclose(points.zyx, zyx, atol=1e-6)
    np.testing.assert_allclose(points.columns["score"], scores, atol=1e-6)
    np.testing.assert_array_equal(points.columns["instance_id"], ids)

    # a RELION-5 reader uses only the centered Å columns: they give the same voxels
    only5 = df.drop(columns=["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"])
    path5 = _star(tmp_path / "r5.star", {"particles": only5})
    np.testing.assert_allclose(
        read_points(path5, shape=shape, voxel_size=vs, tomo_name="tomo_7").zyx, zyx, atol=1e-5
    )


def test_picks_star_without_voxel_size_has_no_centered_columns(tmp_path):
    zyx = _picks()[0]
    path = tmp_path / "p.star"
    write_picks_star(path, zyx, tomo_name="t")
    df = starfile.read(path)
    assert not any("Centered" in c for c in df.columns)
    np.testing.assert_allclose(read_points(path).zyx, zyx, atol=1e-6)


def test_writers_refuse_bad_points_and_leave_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_picks_csv(tmp_path / "a.csv", np.zeros((3, 2)))
    with pytest.raises(ValueError):
        write_picks_csv(tmp_path / "a.csv", np.zeros((3, 3)), {"score": [1.0, 2.0]})
    with pytest.raises(ValueError):
        write_picks_star(tmp_path / "a.star", np.full((2, 3), np.nan), tomo_name="t")
    assert list(tmp_path.iterdir()) == []


def test_empty_picks_write_header_only_files(tmp_path):
    write_picks_csv(tmp_path / "p.csv", np.zeros((0, 3)), {"score": np.zeros(0)})
    assert (tmp_path / "p.csv").read_text() == "x,y,z,score\n"
    write_picks_star(tmp_path / "p.star", np.zeros((0, 3)), tomo_name="t")
    with pytest.raises(InputError, match="no points"):
        read_points(tmp_path / "p.star")


@pytest.mark.parametrize(("text", "xyz", "extra"), [
    ("1\t2\t3\n4\t5\t6\n", [[1, 2, 3], [4, 5, 6]], {}),
    ("  10.5  20.25   3\n 1 2 3\n", [[10.5, 20.25, 3], [1, 2, 3]], {}),
    # IMOD model2point -object -contour: object, contour, x, y, z
    ("     1     1   100.00   200.00    30.00\n     1     2   110.00   210.00    31.00\n",
     [[100, 200, 30], [110, 210, 31]], {"object": [1, 1], "contour": [1, 2]}),
    ("1 100 200 30\n", [[100, 200, 30]], {"object": [1]}),
    ("x y z\n1 2 3\n", [[1, 2, 3]], {}),
])
def test_whitespace_and_imod_point_files(tmp_path, text, xyz, extra):
    points = read_points(_write(tmp_path / "clicks.txt", text))
    np.testing.assert_allclose(points.xyz, xyz)
    for name, values in extra.items():
        np.testing.assert_array_equal(points.columns[name], values)


@pytest.mark.parametrize("text", [
    "34.20,11.82,28.09,1\n48.73,49.58,11.95,1\n",  # x,y,z,score, commas: never IMOD
    "34.2 11.82 28.09 0.93\n",  # a fraction is no IMOD object number
    "1,1,100,200,30\n",
    "1 0.5 100 200 30\n",
    "nan 10 12 5\n",  # (a traceback before: NaN has no whole value)
    "inf 10 12 5\n",
])
def test_four_or_five_columns_without_a_header_must_be_imod(tmp_path, text):
    """Without a header only IMOD's whole object (and contour) numbers may come before x y z;
    an x,y,z,score file was read with its columns shifted (z from the score)."""
    with pytest.raises(InputError, match=r"no header; only IMOD model2point's .* add a "
                                         r"header naming x,y,z"):
        read_points(_write(tmp_path / "clicks.csv", text))


def test_points_outside_name_the_binning_options(tmp_path):
    """Clicks made on a differently binned copy land outside: the message names the options
    that scale them."""
    path = tmp_path / "c.csv"
    path.write_text("x,y,z\n400,20,10\n")
    with pytest.raises(InputError, match=r"outside .*--points-pixel-size / --points-bin"):
        read_points(path, shape=(20, 50, 50))


def test_a_pixel_size_of_zero_moves_no_click(tmp_path):
    """rlnPixelSize 0 (or a tilt-series pixel size of 0, or magnification 0) states nothing:
    ignored with a warning, the coordinates stay (they were scaled by 0 onto voxel 0);
    --points-pixel-size 0 is one line."""
    rows = "1 2 3 {v}\n4 5 6 {v}\n"
    for column, value, shown in (("rlnPixelSize", "0.0", "0"), ("rlnPixelSize", "nan", "nan")):
        star = tmp_path / "p.star"
        star.write_text("data_particles\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n"
                        f"_rlnCoordinateZ\n_{column}\n" + rows.format(v=value))
        with pytest.warns(CryosamWarning, match=f"{column} is {shown} Å, not a pixel size"):
            got = read_points(star, voxel_size=10.0)
        np.testing.assert_array_equal(got.zyx, [[3, 2, 1], [6, 5, 4]])
    star = tmp_path / "m.star"
    star.write_text("data_particles\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n_rlnCoordinateZ\n"
                    "_rlnDetectorPixelSize\n_rlnMagnification\n1 2 3 5 0\n")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(read_points(star, voxel_size=10.0).zyx, [[3, 2, 1]])
    assert [str(w.message) for w in said if "divide" in str(w.message)] == []
    csv = tmp_path / "c.csv"
    csv.write_text("x,y,z\n1,2,3\n")
    for path in (csv, tmp_path / "p.star"):
        with pytest.raises(InputError, match="pixel size of 0 Å.*positive number"):
            read_points(path, voxel_size=10.0, pixel_size=0.0)


def test_utf16_text_from_excel_is_read(tmp_path):
    """Excel's 'Unicode Text' export is UTF-16 with a byte-order mark, tab-separated: read as
    it is (it was refused as 'not a text file')."""
    path = tmp_path / "clicks.txt"
    path.write_bytes("# picked\u00a0by hand\r\nx\ty\tz\r\n1\t2\t3\r\n4\t5\t6\r\n"
                     .encode("utf-16"))  # a non-breaking space is text
    np.testing.assert_array_equal(read_points(path).zyx, [[3, 2, 1], [6, 5, 4]])


def test_a_label_column_of_other_things_says_to_rename_it(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("x,y,z,label\n1,2,3,ribosome\n")
    with pytest.raises(InputError, match="row 1 has label 'ribosome'; a label column marks "
                                         "negative clicks: .*rename the column"):
        negative_rows(read_points(path))


def test_clicks_on_a_binned_copy_of_anisotropic_voxels_scale_per_axis(tmp_path):
    """--points-bin 2 on 10 x 10 x 20 Å voxels (z, y, x) gives pixels of 20 x 20 x 40 Å: every
    axis doubles, in CSV and STAR files alike, and the warning names one factor."""
    csv = tmp_path / "c.csv"
    csv.write_text("x,y,z\n1,2,3\n")
    star = tmp_path / "c.star"
    star.write_text("data_particles\nloop_\n_rlnCoordinateX\n_rlnCoordinateY\n"
                    "_rlnCoordinateZ\n1 2 3\n")
    for path in (csv, star):
        with pytest.warns(CryosamWarning, match=r"scaled by 2 to this tomogram"):
            got = read_points(path, voxel_size=(10.0, 10.0, 20.0), pixel_size=(20.0, 20.0, 40.0))
        np.testing.assert_allclose(got.zyx, [[6, 4, 2]])
    with pytest.raises(InputError, match=r"pixel size of 20/0/40 \(z/y/x\) Å"):
        read_points(csv, voxel_size=10.0, pixel_size=(20.0, 0.0, 40.0))
