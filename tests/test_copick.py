"""copick projects in and out: a project made here with copick's own API (tomogram in the
static root, clicks and cryosam's results in the overlay) goes through
``cryosam segment --copick``, and copick reads back the picks and the segmentation."""

from __future__ import annotations

import ast
import contextlib
import csv as csv_module
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryosam import io
from cryosam.errors import InputError

copick = pytest.importorskip("copick")

SRC = Path(__file__).resolve().parents[1] / "src" / "cryosam"
FAST = ("--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu", "-q")
OBJECTS = [{"name": "ribosome", "is_particle": True, "label": 1, "radius": 60.0},
           {"name": "membrane", "is_particle": False, "label": 2}]


def _config(path: Path, overlay: Path, static: Path | None = None) -> Path:
    data = {"config_type": "filesystem", "name": "cryosam test", "pickable_objects": OBJECTS,
            "overlay_root": f"local://{overlay}", "overlay_fs_args": {"auto_mkdir": True}}
    if static is not None:
        data["static_root"] = f"local://{static}"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def make_project(folder: Path, volume: np.ndarray, voxel_size: float,
                 picks: dict[tuple[str, str, str], np.ndarray],
                 tomo_types: tuple[str, ...] = ("wbp",)) -> Path:
    """A local copick project with run TS_01: the tomogram(s) in the static root, the given
    pick sets {(object, user, session): zyx voxels} in the overlay; returns its config."""
    folder.mkdir(parents=True, exist_ok=True)
    static, overlay = folder / "static", folder / "overlay"
    builder = copick.from_file(str(_config(folder / "build.json", static)))
    spacing = builder.new_run("TS_01").new_voxel_spacing(voxel_size)
    for tomo_type in tomo_types:
        spacing.new_tomogram(tomo_type).from_numpy(volume.astype(np.float32))
    config = _config(folder / "project.json", overlay, static)
    run = copick.from_file(str(config)).get_run("TS_01")
    for (name, user, session), zyx in picks.items():
        run.new_picks(name, session, user_id=user).from_numpy(np.asarray(zyx)[:, ::-1]
                                                              * voxel_size)
    return config


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _cli(*args: object) -> int:
    from cryosam.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def project(small_sim, tmp_path_factory: pytest.TempPathFactory):
    """The small simulated tomogram as a copick project, alice's one click as the clicks and
    one ``cryosam segment --copick`` run from inside the project folder (default --out)."""
    sim, files = small_sim
    folder = tmp_path_factory.mktemp("copick")
    clicks = io.read_points(files["prompt.csv"]).zyx
    config = make_project(folder, sim.volume, sim.voxel_size, {
        ("ribosome", "alice", "1"): clicks,
        ("membrane", "alice", "1"): np.array([[5.0, 5.0, 5.0]]),
    })
    with contextlib.chdir(folder):
        code = _cli("segment", "--copick", config.name, "--run", "TS_01", "--object",
                    "ribosome", *FAST)
    assert code == 0
    return sim, files, config, folder / "TS_01_cryosam", clicks


def test_picks_read_back_with_copick_at_the_csv_angstrom(project) -> None:
    sim, _, config, out, _ = project
    run = copick.from_file(str(config)).get_run("TS_01")
    sets = run.get_picks(object_name="ribosome", user_id=io.COPICK_USER)
    assert [p.session_id for p in sets] == ["0"]  # the first free session: copick's tool "0"
    positions, _ = sets[0].numpy()
    csv = io.read_points(out / "picks.csv")
    assert len(positions) == len(csv) >= 2
    # picks.csv keeps 3 decimals of a voxel: within 0.0005 voxel
    np.testing.assert_allclose(positions, csv.zyx[:, ::-1] * sim.voxel_size,
                               atol=6e-4 * sim.voxel_size)
    np.testing.assert_allclose(sets[0].scores(), csv.columns["score"], atol=1e-6)
    np.testing.assert_array_equal(sets[0].instance_ids(), csv.columns["instance_id"])
    assert sets[0].meta.unit == "angstrom"
    # alice's clicks are untouched; nothing else was written by cryosam
    assert len(run.get_picks(object_name="ribosome", user_id="alice")[0].points) == 1
    assert not run.get_picks(object_name="membrane", user_id=io.COPICK_USER)


def test_segmentation_reads_back_as_the_instance_labels(project) -> None:
    sim, _, config, out, _ = project
    run = copick.from_file(str(config)).get_run("TS_01")
    segs = run.get_segmentations(user_id=io.COPICK_USER, name="ribosome", is_instance=True)
    assert len(segs) == 1 and segs[0].session_id == "0"
    assert segs[0].voxel_size == pytest.approx(sim.voxel_size)
    labels = segs[0].numpy()
    expected = io.read_tomogram(out / "instances.mrc").data.astype(np.int64)
    assert labels.shape == sim.volume.shape
    np.testing.assert_array_equal(labels.astype(np.int64), expected)
    ids = io.read_points(out / "picks.csv").columns["instance_id"].astype(int)
    assert set(ids) == set(np.unique(labels)) - {0}


def test_local_outputs_and_run_record(project) -> None:
    import starfile

    _, _, config, out, _ = project
    assert {"picks.csv", "picks_relion5.star", "picks_warp.star", "run.json"} <= {
        p.name for p in out.iterdir()}
    rec = json.loads((out / "run.json").read_text())
    assert rec["copick"]["run"] == "TS_01" and rec["copick"]["object"] == "ribosome"
    assert rec["copick"]["clicks"] == {"user_id": "alice", "session_id": "1", "n": 1}
    assert rec["copick"]["output"] == {"user_id": "cryosam", "session_id": "0"}
    assert rec["copick"]["tomo_type"] == "wbp" and rec["copick"]["voxel_spacing"] == 10.0
    r5 = starfile.read(out / "picks_relion5.star")
    assert set(r5["rlnTomoName"]) == {"TS_01"}  # named after the run


def test_open_copick_reads_the_tomogram_and_clicks_in_voxels(project) -> None:
    sim, _, config, _, clicks = project
    source = io.open_copick(config, "TS_01", "ribosome")
    assert (source.voxel_spacing, source.tomo_type, source.shape) == (
        sim.voxel_size, "wbp", sim.volume.shape)
    assert (source.clicks_user, source.clicks_session) == ("alice", "1")
    np.testing.assert_allclose(source.clicks_zyx, clicks, atol=1e-6)
    assert source.session_id == "1"  # "0" is taken by the module's run
    tomo = source.load_tomogram()
    assert tomo.voxel_size == (sim.voxel_size,) * 3 and tomo.path is None
    np.testing.assert_allclose(tomo.data, sim.volume, atol=1e-6)


def test_a_second_run_takes_a_new_session_and_an_asked_one_replaces(project,
                                                                    tmp_path: Path) -> None:
    _, _, config, _, _ = project
    root = copick.from_file(str(config))
    before, _ = root.get_run("TS_01").get_picks(object_name="ribosome", user_id="cryosam",
                                                session_id="0")[0].numpy()
    code = _cli("segment", "--copick", config, "--run", "TS_01", "--object", "ribosome",
                "--no-match", "--out", tmp_path / "second", *FAST)
    assert code == 0
    run = copick.from_file(str(config)).get_run("TS_01")
    sessions = sorted(p.session_id for p in run.get_picks(object_name="ribosome",
                                                            user_id="cryosam"))
    assert sessions == ["0", "1"]
    kept, _ = run.get_picks(object_name="ribosome", user_id="cryosam",
                            session_id="0")[0].numpy()
    np.testing.assert_array_equal(kept, before)
    assert len(run.get_picks(object_name="ribosome", user_id="cryosam",
                             session_id="1")[0].points) == 1  # --no-match: the click only
    # asking for session 1 again replaces it, with --overwrite only
    code = _cli("segment", "--copick", config, "--run", "TS_01", "--object", "ribosome",
                "--out", tmp_path / "third", "--copick-session", "1", "--overwrite", *FAST)
    assert code == 0
    run = copick.from_file(str(config)).get_run("TS_01")
    replaced = run.get_picks(object_name="ribosome", user_id="cryosam", session_id="1")
    csv = io.read_points(tmp_path / "third" / "picks.csv")
    assert len(replaced) == 1 and len(replaced[0].points) == len(csv) >= 2
    assert len(run.get_segmentations(user_id="cryosam", name="ribosome", is_instance=True)) == 2


@pytest.mark.parametrize(("args", "flag"), [
    (("--copick-session", "0"), "--overwrite"),  # cryosam already wrote session 0
    (("--copick-session", "a_b"), "--copick-session"),
    (("--run", "TS_02"), "--run"),
    (("--object", "ribosom"), "--object"),
    (("--voxel-spacing", "7"), "--voxel-spacing"),
    (("--tomo-type", "denoised"), "--tomo-type"),
    (("--clicks-user", "bob"), "--clicks-user"),
    (("--tomo-name", "TS_01"), "--tomo-name"),
    (("--points", "clicks.csv"), "--points"),
    (("--star", "relion4"), "--tilt-series-pixel-size"),
])
def test_bad_copick_input_is_one_line_exit_2_and_writes_nothing(
        args, flag, project, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, config, _, _ = project
    fixed = {"--run": "TS_01", "--object": "ribosome"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    base = [a for k, v in fixed.items() if k not in given for a in (k, v)]
    before = _snapshot(config.parent / "overlay")
    out = tmp_path / "out"
    code = _cli("segment", "--copick", config, *base, *args, "--out", out, *FAST)
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0], lines[0]
    assert not out.exists()
    assert _snapshot(config.parent / "overlay") == before


@pytest.mark.parametrize(("args", "flag"), [
    (("--copick", "{config}", "--run", "TS_01"), "--object"),
    (("{tomo}", "--copick", "{config}", "--run", "TS_01", "--object", "ribosome"), "TOMO"),
    (("{tomo}", "--points", "{points}", "--run", "TS_01"), "--run"),
    (("{tomo}",), "--points"),
    (("--copick", "{missing}", "--run", "TS_01", "--object", "ribosome"), "--copick"),
])
def test_copick_mode_and_file_mode_do_not_mix(args, flag, project, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, files, config, _, _ = project
    names = {"config": config, "tomo": files["tomo.mrc"], "points": files["prompt.csv"],
             "missing": tmp_path / "nope.json"}
    code = _cli("segment", *(a.format(**names) for a in args), "--out", tmp_path / "out",
                *FAST)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert flag in lines[0]
    assert not (tmp_path / "out").exists()


def test_several_candidate_click_sets_are_listed(small_sim, tmp_path: Path) -> None:
    sim, files = small_sim
    clicks = io.read_points(files["prompt.csv"]).zyx
    config = make_project(tmp_path / "p", sim.volume[:8], sim.voxel_size, {
        ("ribosome", "alice", "1"): clicks[:, :] * [0, 1, 1],
        ("ribosome", "bob", "2"): clicks * [0, 1, 1] + [1, 0, 0],
        ("ribosome", "carol", "3"): np.zeros((0, 3)),  # empty sets are not candidates
    }, tomo_types=("wbp", "denoised"))
    with pytest.raises(InputError,
                       match=r"2 tomograms at 10 Å \(denoised, wbp\); choose one with --tomo-type"):
        io.open_copick(config, "TS_01", "ribosome")
    with pytest.raises(InputError, match=r"2 pick sets.*alice/1.*bob/2.*--clicks-user"):
        io.open_copick(config, "TS_01", "ribosome", tomo_type="wbp")
    source = io.open_copick(config, "TS_01", "ribosome", tomo_type="denoised",
                            clicks_user="bob")
    assert (source.clicks_user, source.clicks_session, source.tomo_type) == (
        "bob", "2", "denoised")
    np.testing.assert_allclose(source.clicks_zyx[:, 0], 1.0)
    with pytest.raises(InputError, match=r"clicks-session 9"):
        io.open_copick(config, "TS_01", "ribosome", tomo_type="wbp", clicks_session="9")


def test_clicks_outside_the_tomogram_are_refused(small_sim, tmp_path: Path) -> None:
    sim, _ = small_sim
    config = make_project(tmp_path / "p", sim.volume[:8], sim.voxel_size,
                          {("ribosome", "alice", "1"): np.array([[4.0, 5.0, 500.0]])})
    with pytest.raises(InputError, match=r"pick 1 of ribosome by alice/1.*outside"):
        io.open_copick(config, "TS_01", "ribosome")


def test_a_tomogram_without_data_is_one_line(small_sim, tmp_path: Path) -> None:
    """A tomogram listed by the project whose zarr store holds no data (a half-copied
    project): one line naming the run and the tomogram (zarr's own traceback before)."""
    import shutil

    sim, _ = small_sim
    config = make_project(tmp_path / "p", sim.volume[:8], sim.voxel_size,
                          {("ribosome", "alice", "1"): np.array([[4.0, 5.0, 5.0]])})
    store = next((tmp_path / "p" / "static").rglob("wbp.zarr"))
    for part in store.iterdir():  # the store stays, its arrays go
        shutil.rmtree(part) if part.is_dir() else part.unlink()
    with pytest.raises(InputError, match=r"run TS_01: tomogram 'wbp' at 10 Å has no readable "
                                         r"data .*--tomo-type"):
        io.open_copick(config, "TS_01", "ribosome")


@pytest.mark.parametrize("stop", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing_half_written(stop: BaseException, small_sim,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure or a Ctrl-C between the segmentation and the pick set: neither stays (a
    Ctrl-C used to leave the segmentation and an empty pick set, and a rerun took the next
    session)."""
    sim, _ = small_sim
    config = make_project(tmp_path / "p", sim.volume[:8], sim.voxel_size,
                          {("ribosome", "alice", "1"): np.array([[4.0, 5.0, 6.0]])})
    source = io.open_copick(config, "TS_01", "ribosome")
    labels = np.zeros(source.shape, np.int32)
    labels[3:6, 4:7, 5:8] = 1

    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise stop

    monkeypatch.setattr(copick.models.CopickPicks, "from_numpy", broken)
    expected = ((InputError, "disk full.*overlay is writable") if isinstance(stop, OSError)
                else (KeyboardInterrupt, None))
    with pytest.raises(expected[0], match=expected[1]):
        io.write_copick(source, labels, np.array([[4.0, 5.0, 6.0]]), np.array([0.5]),
                        np.array([1]))
    run = copick.from_file(str(config)).get_run("TS_01")
    assert not run.get_picks(user_id=io.COPICK_USER)
    assert not run.get_segmentations(user_id=io.COPICK_USER, is_instance=None)


def test_copick_is_imported_only_when_used() -> None:
    tree = ast.parse((SRC / "io" / "copick.py").read_text(encoding="utf-8"))
    top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import)
           for a in node.names}
    top |= {(node.module or "").split(".")[0] for node in tree.body
            if isinstance(node, ast.ImportFrom)}
    assert not top & {"copick", "zarr"}
    code = ("import sys, cryosam.cli, cryosam.io, cryosam.export, cryosam.commands.segment; "
            "print(sorted(m for m in ('copick', 'zarr') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_batch_with_a_saved_query_picks_in_a_project_without_clicks(small_sim,
                                                                     tmp_path: Path) -> None:
    """``cryosam batch CONFIG --object X --query Q``: every run is opened without a pick set
    (``io.open_copick(..., clicks=False)``) and cryosam's picks are written back to it."""
    sim, files = small_sim
    config = make_project(tmp_path / "project", sim.volume, sim.voxel_size, {})
    query = tmp_path / "rib.cryosam-query"
    assert _cli("query", files["tomo.mrc"], "--points", files["prompt.csv"], "--out", query,
                *FAST) == 0
    out = tmp_path / "out"
    assert _cli("batch", config, "--object", "ribosome", "--query", query, "--no-ray",
                "--out", out, "-q") == 0
    run = copick.from_file(str(config)).get_run("TS_01")
    sets = run.get_picks(object_name="ribosome", user_id=io.COPICK_USER)
    csv = io.read_points(out / "TS_01" / "picks.csv")
    assert len(sets) == 1 and len(sets[0].points) == len(csv) >= 2
    record = json.loads((out / "TS_01" / "run.json").read_text())
    assert record["copick"]["clicks"]["n"] == 0
    source = io.open_copick(config, "TS_01", "ribosome", clicks=False)
    assert source.clicks_zyx.shape == (0, 3) and source.shape == sim.volume.shape
    # a rerun skips it while copick holds its results, and redoes it once they are deleted
    batch = ["batch", config, "--object", "ribosome", "--query", query, "--no-ray", "--out",
             out, "-q"]
    assert _cli(*batch) == 0
    assert next(csv_module.DictReader(open(out / "batch.csv")))["status"] == "skipped"
    sets[0].delete()
    assert _cli(*batch) == 0
    row = next(csv_module.DictReader(open(out / "batch.csv")))
    assert row["status"] == "done" and "pick set" in row["reason"] and "missing" in row["reason"]
    run = copick.from_file(str(config)).get_run("TS_01")
    assert len(run.get_picks(object_name="ribosome", user_id=io.COPICK_USER)) == 1
