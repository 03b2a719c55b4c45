"""Interrupted, killed, odd files, full disks: nothing lost, nothing half-written, the right
exit code. Signals go to a real ``cryosam segment`` process at chosen points."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryosam import io
from cryosam._atomic import output_lock, sweep_stale
from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
from cryosam.pipeline import CryoSAM

CLI = [sys.executable, "-c", "import sys; from cryosam._entry import main; sys.exit(main())"]
WF = ["--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu", "--quiet"]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _start(args: list[object], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the signal point: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the signal point was never reached")
        time.sleep(0.01)


@pytest.fixture()
def job(small_sim, tmp_path: Path):
    _, files = small_sim
    out = tmp_path / "out"
    return [files["tomo.mrc"], "--points", files["prompts5.csv"], "--out", out, *WF], out


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_the_run_leaves_nothing(job, sig, code, word) -> None:
    args, out = job
    lock = out.parent / f".{out.name}.lock"
    proc = _start(["segment", *args])
    _wait_for(lock.exists, proc)  # past the checks, models and data loading under way
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # a loaded machine let the run end before the signal acted
        assert (out / "picks.csv").is_file() and _hidden(out.parent) == [], err
        pytest.skip("the run finished before the signal arrived; its outputs are whole")
    assert proc.returncode == code
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in err
    assert not out.exists() and _hidden(out.parent) == []


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_starting_is_one_line(sig, code) -> None:
    proc = _start(["--help"])
    time.sleep(0.05)  # still importing
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the process finished starting before the signal arrived")
    assert proc.returncode == code and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sigterm_while_replacing_keeps_the_old_output(job, run_cli) -> None:
    args, out = job
    code, _, err = run_cli("segment", *args)
    assert code == 0, err
    before = (out / "picks.csv").read_bytes()
    proc = _start(["segment", *args, "--overwrite"])
    _wait_for(lambda: any(n.endswith(".partial") for n in _hidden(out.parent)), proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode in (0, 143)  # it may have finished the swap just before
    assert (out / "picks.csv").read_bytes() == before  # old or new: the same job, complete
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in out.iterdir() if not p.name.startswith("."))
    assert _hidden(out.parent) == []


def test_after_sigkill_the_next_run_sweeps_what_was_left(job, run_cli) -> None:
    args, out = job
    proc = _start(["segment", *args])
    _wait_for(lambda: (out.parent / f".{out.name}.lock").exists(), proc)
    proc.kill()
    proc.wait()
    stale = out.parent / f".{out.name}.{proc.pid}.abcd1234.partial"  # as a kill mid-write
    stale.mkdir()
    assert _hidden(out.parent)  # the lock and the staging folder are left
    code, _, err = run_cli("segment", *args)
    assert code == 0, err
    assert _hidden(out.parent) == [] and (out / "picks.csv").exists()


def test_a_killed_swap_is_recovered(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = tmp_path / f".out.{2**22 + 12345}.zz.old"  # a dead pid, killed between two renames
    (old / "out").mkdir(parents=True)
    (old / "out" / "run.json").write_text("{}")
    sweep_stale(tmp_path, "out")
    assert (out / "run.json").exists() and not old.exists()


def test_the_sweep_leaves_other_machines_temporaries_and_fresh_locks(tmp_path: Path) -> None:
    """Shards of a SLURM array on other nodes write into one shared --out: their staging
    folders (whose process ids mean nothing here) are left to them unless a day old, and a
    lock just created, still empty, is not stale (a starting shard swept both)."""
    from cryosam import _atomic

    dead = 2**22 + 4321
    theirs = tmp_path / f".TS_07.{dead}@othernode-3.ab12.partial"
    ours = tmp_path / f".TS_08.{dead}@{_atomic._HOST_TAG}.cd34.partial"
    ancient = tmp_path / f".TS_09.{dead}@othernode-3.ef56.partial"
    for folder in (theirs, ours, ancient):
        folder.mkdir()
    day_ago = time.time() - _atomic.FOREIGN_AGE - 60
    os.utime(ancient, (day_ago, day_ago))
    fresh = tmp_path / ".TS_10.lock"
    fresh.write_text("")  # created, not yet written by its run
    swept = sweep_stale(tmp_path)
    assert sorted(p.name for p in swept) == sorted([ours.name, ancient.name])
    assert theirs.exists() and fresh.exists()
    with _atomic.atomic_path(tmp_path / "x.csv") as tmp:  # this machine's names carry it
        assert f"@{_atomic._HOST_TAG}." in tmp.name
        tmp.write_text("x")


def test_two_runs_cannot_write_one_out(tmp_path: Path, run_cli, small_sim) -> None:
    _, files = small_sim
    out = tmp_path / "o"
    lock = tmp_path / ".o.lock"
    lock.write_text(f"{os.uname().nodename} 1\n")  # held by a live process (pid 1)
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", out, *WF)
    assert code == 2 and "another cryosam run (pid 1" in err and not out.exists()
    lock.write_text(f"{os.uname().nodename} {2**22 + 777}\n")  # its run was killed: stale
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", out, *WF)
    assert code == 0, err
    assert not lock.exists()
    with output_lock(out), output_lock(out):  # re-entrant within one process
        assert lock.read_text().split()[1] == str(os.getpid())
    assert not lock.exists()


# --------------------------------------------------------------------------- the cache


def _cache_run(run_cli, files, tmp_path: Path, cache: Path, name: str):
    out = tmp_path / name
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", out, "--cache-dir", cache, *WF)
    return code, err, out


def test_cache_errors_are_one_warning_and_results_are_written(small_sim, tmp_path, run_cli):
    _, files = small_sim
    cache = tmp_path / "cache"
    code, err, out = _cache_run(run_cli, files, tmp_path, cache, "first")
    assert code == 0 and (out / "picks.csv").exists()
    (feature_file,) = cache.glob("features-*.pt")
    feature_file.write_bytes(b"not a torch file")  # corrupt
    code, err, out = _cache_run(run_cli, files, tmp_path, cache, "corrupt")
    assert code == 0 and (out / "picks.csv").exists()
    warn = [ln for ln in err.splitlines() if "feature cache" in ln]
    assert len(warn) == 1 and warn[0].startswith("warning:")
    feature_file.unlink()
    feature_file.mkdir()  # a folder where the file goes: it can be neither read nor written
    code, err, out = _cache_run(run_cli, files, tmp_path, cache, "folder")
    assert code == 0 and (out / "picks.csv").exists()
    assert "could not write the feature cache" in err and "Traceback" not in err


def test_a_full_disk_under_the_cache_only_warns(small_sim, tmp_path: Path, run_cli) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny file system needs root")
    cache = tmp_path / "tiny"
    cache.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)],
                          capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tiny tmpfs here: {made.stderr.decode().strip()}")
    try:
        _, files = small_sim
        code, err, out = _cache_run(run_cli, files, tmp_path, cache, "full")
        assert code == 0 and (out / "picks.csv").exists()
        assert "could not write the feature cache" in err
        assert list(cache.iterdir()) == []  # no partial file left on the full disk
    finally:
        subprocess.run(["umount", str(cache)], capture_output=True)


# --------------------------------------------------------------------------- odd inputs


def test_malformed_sam_checkpoint_is_one_line(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    bad = tmp_path / "sam_vit_b_random.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", tmp_path / "o", "--sam-model", bad, "--no-match")
    assert code == 2 and "Traceback" not in err and "could not be loaded" in err


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_pipes_and_devices_are_refused(kind: str, small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    if kind == "fifo":
        points = tmp_path / "clicks.csv"
        os.mkfifo(points)
    else:
        points = Path("/dev/zero")
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", points,
                           "--out", tmp_path / "o", *WF)
    assert code == 2 and "not a regular file" in err


def test_late_failures_are_found_before_any_work(small_sim, tmp_path: Path, run_cli,
                                                 monkeypatch) -> None:
    _, files = small_sim
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", ".", *WF)
    assert code == 2 and "current folder" in err
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", "res", "--cache-dir", "res/cache", *WF)
    assert code == 2 and "inside --out" in err
    # a failed run leaves no folders it made on the way
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", tmp_path / "none.csv",
                           "--out", tmp_path / "a" / "b" / "out", *WF)
    assert code == 2 and not (tmp_path / "a").exists()


def test_an_existing_empty_out_keeps_its_mode(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    out = tmp_path / "shared_out"
    out.mkdir()
    os.chmod(out, 0o2770)
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", out, *WF)
    assert code == 0, err
    assert out.stat().st_mode & 0o7777 == 0o2770


# --------------------------------------------------------------------------- agreement


def test_duplicate_and_overlapping_clicks_agree_with_the_labels(small_sim, tmp_path) -> None:
    sim, _ = small_sim
    cfg = CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                        segmenter=SegmenterConfig(name="threshold"), device="cpu")
    p = sim.prompt_points[0]
    clicks = np.array([p, p, p + [0, 0.4, 0.3], p + [0, 1.5, 0], sim.prompt_points[1]])
    with pytest.warns(UserWarning, match="repeat an earlier click"):
        res = CryoSAM(cfg).segment(sim.volume, clicks, voxel_size=sim.voxel_size, match=False)
    assert [w for w in res.record["warnings"] if "repeat an earlier click" in w]  # run.json
    assert len(res.picks_zyx) == 2  # one particle per clicked particle, no phantoms
    for pick, label, n in zip(res.picks_zyx, res.pick_instance_ids, res.pick_n_voxels,
                              strict=True):
        voxels = np.argwhere(res.labels == label)
        assert len(voxels) == n > 0
        np.testing.assert_allclose(voxels.mean(0), pick, atol=1e-6)


def test_identical_runs_give_identical_files(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    outs = []
    for name in ("one", "two"):
        outs.append(tmp_path / name)
        code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                               "--out", outs[-1], *WF)
        assert code == 0, err
    for name in ("picks.csv", "picks_napari.csv", "semantic.mrc", "instances.mrc"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    a, b = (starfile.read(o / "picks.star", always_dict=True) for o in outs)
    for key in a:
        assert a[key].equals(b[key])
    assert io.read_points(outs[0] / "picks.csv").zyx.shape == \
        io.read_points(outs[1] / "picks.csv").zyx.shape


def test_malformed_dinov2_weights_are_one_line(small_sim, tmp_path: Path, run_cli,
                                               tiny_dinov2_model) -> None:
    _, files = small_sim
    model = tmp_path / "dinov2-broken"
    tiny_dinov2_model.config.save_pretrained(model)
    (model / "pytorch_model.bin").write_bytes(np.random.default_rng(1).bytes(2048))
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", tmp_path / "o", "--dinov2-model", model,
                           "--segmenter", "threshold")
    assert code == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "could not be loaded" in line


def test_a_fifo_tomogram_is_refused(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    fifo = tmp_path / "tomo.mrc"
    os.mkfifo(fifo)
    code, _, err = run_cli("segment", fifo, "--points", files["prompt.csv"],
                           "--out", tmp_path / "o", *WF)
    assert code == 2 and "not a regular file" in err


def test_values_near_float32_limits_normalise_quietly() -> None:
    import warnings

    from cryosam.normalise import normalise_volume

    vol = np.random.default_rng(0).uniform(-3.3e38, 3.3e38, (8, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bare numpy overflow warning
        out = normalise_volume(vol)
    assert np.isfinite(out).all() and out.min() >= -1e-6 and out.max() <= 1.0


def test_a_header_naming_an_axis_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("x,x,y,z\n1,2,3,4\n")
    with pytest.raises(io.InputError, match="names x twice"):
        io.read_points(path)


# --------------------------------------------------------------------------- progress


def test_a_log_gets_a_progress_line_while_a_long_step_runs(small_sim, weight_free, capsys,
                                                          monkeypatch) -> None:
    """Not on a terminal (a SLURM log, nohup): plain lines while a step runs, none with
    --quiet, and none at all for a step shorter than LOG_EVERY (here 0 s: every item)."""
    from cryosam import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    monkeypatch.setattr(progress, "_QUIET", False)  # an earlier -q in this process
    assert list(progress.track(range(3), "encoding slices")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "cryosam: encoding slices 1/3 (33%) after 0:00, about 0:00 left"
    assert lines[-1] == "cryosam: encoding slices 3/3 (100%) done in 0:00"
    # items that move the count by 0 (a propagation step that ended no chain) still say so
    assert list(progress.track([0, 0, 2, 1], "chains", total=3, counts=int)) == [0, 0, 2, 1]
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["cryosam: chains 0/3 (0%) after 0:00"] * 2
    assert lines[-1] == "cryosam: chains 3/3 (100%) done in 0:00"
    sim, _ = small_sim
    CryoSAM(weight_free).segment(sim.volume, sim.prompt_points[:1], voxel_size=sim.voxel_size)
    said = capsys.readouterr().err  # the pipeline's own steps, the proposals' first masks too
    assert "cryosam: encoding slices" in said and "cryosam: first masks (slices)" in said
    # propagation counts the chains that ended out of all of them (it printed bare steps)
    ended = [ln for ln in said.splitlines() if ln.startswith("cryosam: propagating")]
    assert ended and all(re.search(r"chains ended\) \d+/\d+ \(", ln) for ln in ended)
    assert re.search(r"(\d+)/\1 \(100%\) done in", ended[-1]), ended[-1]
    progress.set_quiet(True)
    try:
        list(progress.track(range(3), "encoding slices"))
    finally:
        progress.set_quiet(False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "LOG_EVERY", 3600.0)
    list(progress.track(range(3), "encoding slices"))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("option, message", [
    (("--binning", "8"), "binned 8x, the 4.7-voxel particle is 0.6 voxels, too small to "
                         "segment; use --binning 2 or less"),
    # wider than the tomogram (a diameter in the wrong unit): one line, before any binning
    # (1e6 tried to allocate 909 GiB; inf was an OverflowError traceback)
    (("--diameter", "1e6"), "--diameter 1e+06 Å is 1e+05 voxels of 10 Å, wider than the "
                            "tomogram (40 x 96 x 112); give the particle's diameter in Å"),
    (("--diameter", "inf"), "diameter inf: give the particle diameter in Å (> 0)"),
])
def test_a_size_that_loses_the_particle_says_so(option, message, small_sim, run_cli,
                                                tmp_path) -> None:
    """A forced binning or a diameter far from the clicks' own size: the one line names it
    (it used to say the clicks look like background and to check the axis order)."""
    _, files = small_sim
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           *WF, *option, "--out", tmp_path / "o")
    assert code == 2 and message in err, err


def test_nothing_found_with_a_diameter_far_from_the_clicks_names_it() -> None:
    """When nothing is found and --diameter is over three times off the clicks' own size,
    the reason given is the diameter (not the clicks or the axis order)."""
    from cryosam.probe import ClickProbe
    from cryosam.stages import nothing_found_message

    found = ClickProbe("dark", "clicks", 100.0, "diameter", [1.0], [4.7])
    assert nothing_found_message(found).endswith(
        "--diameter makes the particle's radius 100.0 voxels, but at the clicks it looks like "
        "4.7 voxels; check --diameter (in Å) or leave it out")


def test_a_diameter_far_from_the_clicks_is_warned(small_sim, run_cli, tmp_path) -> None:
    _, files = small_sim
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           *WF, "--diameter", "300", "--no-match", "--out", tmp_path / "o")
    assert code == 0, err
    assert "--diameter 300 Å is a radius of 15.0 voxels, but at the clicks" in err


def test_a_signal_after_the_outputs_are_written_changes_nothing() -> None:
    """Inside committed() (the summary after the outputs are on disk) Ctrl-C and SIGTERM are
    ignored, so a late signal cannot turn a finished query or segment into exit 130/143;
    after it, Ctrl-C interrupts again."""
    import os
    import signal

    from cryosam.utils import committed

    before = signal.getsignal(signal.SIGINT)
    with committed():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)


def test_a_folder_written_into_is_checked_itself(tmp_path, monkeypatch) -> None:
    """A cache or simulate folder that exists is written into: its own permission counts,
    not its parent's (a writable folder under a read-only one was refused, a read-only one
    under a writable parent passed)."""
    from cryosam import _atomic

    inner = tmp_path / "ro_parent" / "cache"
    inner.mkdir(parents=True)
    writable = {inner.resolve()}
    monkeypatch.setattr(_atomic.os, "access", lambda p, mode: Path(p).resolve() in writable)
    _atomic.check_writable(inner, "--cache-dir", into=True)
    with pytest.raises(io.InputError, match="cannot write under"):  # replaced as a whole: parent
        _atomic.check_writable(inner, "--out")
    writable.clear()
    with pytest.raises(io.InputError, match=r"--cache-dir .*cache: cannot write in it"):
        _atomic.check_writable(inner, "--cache-dir", into=True)


def test_a_blank_tomogram_is_one_line_naming_it(small_sim, weight_free, run_cli,
                                               tmp_path) -> None:
    """An all-zero tomogram (a failed reconstruction): the line names the tomogram, not the
    clicks or the contrast (it said the clicks look like background; with a query, it ran
    and advised --polarity)."""
    from cryosam import CryoSAM, io

    _, files = small_sim
    blank = tmp_path / "blank.mrc"
    io.write_mrc(blank, np.zeros((20, 48, 48), np.float32), voxel_size=10.0)
    code, _, err = run_cli("segment", blank, "--points", files["prompt.csv"], *WF,
                           "--out", tmp_path / "o")
    assert code == 2 and err.startswith(f"error: {blank}: every voxel is 0; the tomogram is "
                                        "empty"), err
    assert not (tmp_path / "o").exists()
    with pytest.raises(io.InputError, match="tomogram: every voxel is 3"):
        CryoSAM(weight_free).segment(np.full((8, 16, 16), 3.0), [[4, 8, 8]])
