"""``cryosam batch``: three small simulated tomograms with their clicks in one STAR file.

On a local Ray with two CPU workers all three finish; killed after the first tomogram, a
rerun skips that one (batch.csv and its untouched run.json show it) and completes the
others; an unreadable tomogram fails alone; changed clicks and fixed files are redone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

FAST = ("--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu", "-q")
NAMES = ("TS_01", "TS_02", "TS_03")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tomos/TS_0{1,2,3}.mrc`` (40x96x112, seeds 3, 4, 5) and ``clicks.star`` with one
    click per tomogram, named by rlnTomoName."""
    import pandas as pd
    import starfile

    from cryosam.io import write_mrc
    from cryosam.simulate import SimulationConfig, simulate

    root = tmp_path_factory.mktemp("dataset")
    (root / "tomos").mkdir()
    rows = []
    for name, seed in zip(NAMES, (3, 4, 5), strict=True):
        sim = simulate(SimulationConfig(shape=(40, 96, 112), seed=seed))
        write_mrc(root / "tomos" / f"{name}.mrc", sim.volume, voxel_size=sim.voxel_size,
                  origin=(0.0, 0.0, 0.0))
        z, y, x = sim.prompt_points[0]
        rows.append({"rlnTomoName": name, "rlnCoordinateX": x, "rlnCoordinateY": y,
                     "rlnCoordinateZ": z})
    starfile.write({"particles": pd.DataFrame(rows)}, root / "clicks.star")
    return root


def _table(out: Path, name: str = "batch.csv") -> dict[str, dict[str, str]]:
    with open(out / name, newline="", encoding="utf-8") as fh:
        return {row["tomogram"]: row for row in csv.DictReader(fh)}


def _complete(folder: Path) -> bool:
    record = folder / "run.json"
    if not record.is_file():
        return False
    outputs = json.loads(record.read_text())["outputs"]
    return all((folder / n).is_file() for n in outputs)


def _cli_process(*args: object) -> list[str]:
    return [sys.executable, "-m", "cryosam._entry", *(str(a) for a in args)]


def test_ray_two_cpu_workers_finish_all_three(dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray>=2.9')")
    out = tmp_path / "out"
    proc = subprocess.run(_cli_process("batch", dataset / "tomos", "--out", out, "--points",
                                       dataset / "clicks.star", "--workers", "2", *FAST[:-1]),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 2 and "cannot start Ray" in proc.stderr:
        pytest.skip(f"Ray cannot start here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert (f"3 tomogram(s) from {dataset / 'tomos'} on embedded Ray, 2 worker(s) x 1 thread(s)"
            in proc.stdout)
    rows = _table(out)
    assert sorted(rows) == list(NAMES)
    assert {r["status"] for r in rows.values()} == {"done"}
    for name in NAMES:
        assert _complete(out / name)
        record = json.loads((out / name / "run.json").read_text())
        assert record["device"]["cpu_threads"] == 1  # CPUs / workers
        assert int(rows[name]["picks"]) == record["counts"]["picks"] >= 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_killed_after_the_first_tomogram_resumes(dataset: Path, tmp_path: Path,
                                                  run_cli) -> None:
    out = tmp_path / "out"
    args = ("batch", dataset / "tomos", "--out", out, "--points", dataset / "clicks.star",
            "--no-ray", *FAST)
    proc = subprocess.Popen(_cli_process(*args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not any(_complete(out / n) for n in NAMES):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no cleanup at all: the worst case
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    finished = [n for n in NAMES if _complete(out / n)]
    assert 1 <= len(finished) < len(NAMES), "killed too late to test resuming"
    before = {n: ((out / n / "run.json").read_bytes(), (out / n / "run.json").stat().st_mtime_ns)
              for n in finished}
    assert {r["status"] for n, r in _table(out).items() if n not in finished} == {"pending"}

    code, _, err = run_cli(*args)
    assert code == 0, err
    rows = _table(out)
    for name in NAMES:
        assert _complete(out / name)
        if name in finished:
            assert rows[name]["status"] == "skipped"
            assert rows[name]["reason"] == "same inputs and parameters"
            record = out / name / "run.json"
            assert (record.read_bytes(), record.stat().st_mtime_ns) == before[name]
        else:
            assert rows[name]["status"] == "done", rows[name]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # leftovers swept


def test_interrupted_batch_lists_as_done_what_it_completed(dataset: Path, tmp_path: Path,
                                                          weight_free) -> None:
    """The interrupt lands after a tomogram's outputs are complete but before its outcome is
    back (a Ray worker finishing as Ctrl-C arrives): batch.csv says done, as the disk does. A
    folder an earlier batch completed stays pending (a rerun checks it and skips it)."""
    from collections.abc import Iterator

    from cryosam.batch import Options, Outcome, Task, tasks_from_files
    from cryosam.batch_ray import InProcess, run_batch

    out = tmp_path / "out"
    tasks = tasks_from_files(dataset / "tomos", out, dataset / "clicks.star")
    run_batch(tasks[2:], InProcess(weight_free, Options()), out / "earlier.csv")
    assert _complete(out / "TS_03")

    class Interrupted(InProcess):
        closed = False

        def outcomes(self, tasks: list[Task]) -> Iterator[Outcome]:
            yield self.worker.run(tasks[0])
            self.worker.run(tasks[1])  # complete on disk, its outcome lost
            raise KeyboardInterrupt

        def close(self) -> None:
            self.closed = True

    engine = Interrupted(weight_free, Options())
    with pytest.raises(KeyboardInterrupt):
        run_batch(tasks, engine, out / "batch.csv")
    rows = _table(out)
    assert _complete(out / "TS_02")
    assert [rows[n]["status"] for n in NAMES] == ["done", "done", "pending"]
    record = json.loads((out / "TS_02" / "run.json").read_text())
    assert int(rows["TS_02"]["picks"]) == record["counts"]["picks"]
    assert rows["TS_02"]["reason"] == "new"
    assert engine.closed  # stopped before the disk is read: nothing still running


def test_start_line_says_where_it_runs(dataset: Path, tmp_path: Path, run_cli) -> None:
    code, out, err = run_cli("batch", dataset / "tomos", "--out", tmp_path / "out", "--points",
                             dataset / "clicks.star", "--no-ray", "--shard", "0/3", *FAST[:-1])
    assert code == 0, err
    assert f"1 tomogram(s) from {dataset / 'tomos'} in this process, " in out, out


def test_unreadable_tomogram_fails_alone_then_fixed_and_changed_are_redone(
        dataset: Path, tmp_path: Path, run_cli) -> None:
    tomos = tmp_path / "tomos"
    shutil.copytree(dataset / "tomos", tomos)
    (tomos / "TS_02.mrc").write_bytes(os.urandom(4096))  # unreadable as MRC
    clicks = tmp_path / "clicks.star"
    shutil.copy(dataset / "clicks.star", clicks)
    out = tmp_path / "out"
    args = ("batch", tomos, "--out", out, "--points", clicks, "--no-ray", *FAST)
    code, _, _ = run_cli(*args)
    assert code == 1  # some tomogram failed
    rows = _table(out)
    assert rows["TS_02"]["status"] == "failed" and "TS_02.mrc" in rows["TS_02"]["error"]
    assert rows["TS_01"]["status"] == rows["TS_03"]["status"] == "done"
    assert not (out / "TS_02").exists()
    code, _, _ = run_cli(*args)  # fails again: the table says it was tried before
    assert code == 1 and _table(out)["TS_02"]["reason"] == "failed before"

    shutil.copy(dataset / "tomos" / "TS_02.mrc", tomos / "TS_02.mrc")  # fixed
    import starfile

    df = starfile.read(clicks)
    df.loc[df["rlnTomoName"] == "TS_03", "rlnCoordinateX"] += 1.0  # a changed click
    starfile.write({"particles": df}, clicks, overwrite=True)
    code, _, err = run_cli(*args)
    assert code == 0, err
    rows = _table(out)
    assert [rows[n]["status"] for n in NAMES] == ["skipped", "done", "done"]
    assert rows["TS_03"]["reason"] == "clicks changed"
    assert rows["TS_02"]["reason"] == "failed before"  # not "new": it was tried
    tuning = tmp_path / "smaller-gpu.json"  # speed and memory only: nothing to redo
    tuning.write_text(json.dumps({"encoder": {"batch_size": 2},
                                  "segmenter": {"decoder_batch_size": 8,
                                                "embedding_cache_mb": 64},
                                  "matching": {"chunk_size": 1024, "backend": "torch"}}))
    code, _, err = run_cli(*args, "--config", tuning)
    assert code == 0, err
    assert {r["status"] for r in _table(out).values()} == {"skipped"}
    record = json.loads((out / "TS_01" / "run.json").read_text())  # as an older cryosam
    record["batch"]["parameters"]["segmenter"]["embedding_cache_mb"] = None  # wrote it
    (out / "TS_01" / "run.json").write_text(json.dumps(record))
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert _table(out)["TS_01"]["status"] == "skipped"
    code, _, _ = run_cli(*args, "--top-k", "3")  # another parameter: everything again
    assert {r["reason"] for r in _table(out).values()} == {
        "parameters changed (matching.top_k 512 -> 3)"}  # names what changed


def test_query_over_the_dataset_and_a_shard(dataset: Path, tmp_path: Path, run_cli) -> None:
    query = tmp_path / "rib.cryosam-query"
    code, _, err = run_cli("query", dataset / "tomos" / "TS_01.mrc", "--points",
                           dataset / "clicks.star", "--tomo-name", "TS_01", "--out", query,
                           *FAST)
    assert code == 0, err
    out = tmp_path / "out"
    code, _, err = run_cli("batch", dataset / "tomos", "--out", out, "--query", query,
                           "--no-ray", "--shard", "1/3", "-q")
    assert code == 0, err
    rows = _table(out, "batch-1-of-3.csv")
    assert list(rows) == ["TS_02"] and rows["TS_02"]["status"] == "done"
    record = json.loads((out / "TS_02" / "run.json").read_text())
    assert record["query"]["path"] == str(query.resolve())
    assert record["batch"]["prompts_zyx"] == [] and record["inputs"]["points"] is None


def test_folder_of_click_files_leaves_out_tomograms_without(dataset: Path, tmp_path: Path,
                                                            run_cli) -> None:
    import starfile

    clicks = tmp_path / "clicks"
    clicks.mkdir()
    row = starfile.read(dataset / "clicks.star").iloc[2]  # TS_03's click, as a CSV
    (clicks / "TS_03.csv").write_text(
        f"x,y,z\n{row.rlnCoordinateX},{row.rlnCoordinateY},{row.rlnCoordinateZ}\n")
    out = tmp_path / "out"
    code, _, err = run_cli("batch", dataset / "tomos", "--out", out, "--points", clicks,
                           "--no-ray", "--no-match", "--encoder", "filterbank", "--segmenter",
                           "threshold", "--device", "cpu")
    assert code == 0, err
    assert "left out: TS_01, TS_02" in err
    rows = _table(out)
    assert [rows[n]["status"] for n in NAMES] == ["no-clicks", "no-clicks", "done"]
    pick = np.loadtxt(out / "TS_03" / "picks.csv", delimiter=",", skiprows=1, ndmin=2)
    assert len(pick) == 1  # only the click: --no-match


@pytest.mark.parametrize("args, message", [
    (("--points", "P", "--query", "Q"), "give one"),
    ((), "--points CLICKS"),
    (("--points", "P", "--shard", "3/3"), "--shard 3/3"),
    (("--points", "P", "--no-ray", "--ray-address", "auto"), "--ray-address"),
    (("--points", "P", "--object", "ribosome"), "--object"),
    (("--points", "P", "--ray-address", "127.0.0.1:1"), "127.0.0.1:1: nothing answers there"),
])
def test_bad_arguments_are_one_line_before_any_work(dataset: Path, tmp_path: Path, run_cli,
                                                    args: tuple[str, ...], message: str
                                                    ) -> None:
    fixed = [str(dataset / "clicks.star") if a == "P" else a for a in args]
    code, _, err = run_cli("batch", dataset / "tomos", "--out", tmp_path / "out", *fixed,
                           *FAST)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("stop", "code", "word"), [(KeyboardInterrupt, 130, "interrupted"),
                                                    ("Terminated", 143, "terminated")])
def test_a_stopped_batch_says_what_it_kept_in_one_line(stop, code: int, word: str,
                                                       dataset: Path, tmp_path: Path, run_cli,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C or SIGTERM during the tomograms: one line saying the finished ones are kept
    and how to resume, the signal's exit code, and not the single-run 'nothing was written'."""
    from cryosam import batch_ray
    from cryosam.errors import Terminated

    signal_ = Terminated if stop == "Terminated" else stop

    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003 - the signal arrives mid-batch
        raise signal_()

    monkeypatch.setattr(batch_ray, "run_batch", stopped)
    got, out, err = run_cli("batch", dataset / "tomos", "--out", tmp_path / "out", "--points",
                            dataset / "clicks.star", "--no-ray", "--quiet", *FAST[:-1])
    assert got == code
    (line,) = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert line.startswith(word) and "finished tomograms are complete" in line
    assert "nothing was written" not in err and "resume" in line
    # a stopped --force batch: "the same command" would redo every tomogram again
    got, out, err = run_cli("batch", dataset / "tomos", "--out", tmp_path / "out", "--points",
                            dataset / "clicks.star", "--no-ray", "--quiet", "--force",
                            *FAST[:-1])
    (line,) = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert got == code and "run it again without --force to finish" in line, line


def test_a_combined_csv_gives_each_tomogram_its_own_rows(dataset: Path, tmp_path: Path,
                                                         run_cli) -> None:
    """A CSV with a tomo_name column (two clicks for TS_01, one for TS_02, none for TS_03)
    is read per tomogram: each run gets exactly its rows."""
    import starfile

    star = starfile.read(dataset / "clicks.star")
    lines = ["x,y,z,tomo_name"]
    for i, name in ((0, "TS_01"), (0, "TS_01"), (1, "TS_02")):
        r = star.iloc[i]
        shift = 1.0 if len(lines) == 2 else 0.0  # the second TS_01 click one voxel over
        lines.append(f"{r.rlnCoordinateX + shift},{r.rlnCoordinateY},{r.rlnCoordinateZ},{name}")
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, _, err = run_cli("batch", dataset / "tomos", "--out", out, "--points", clicks,
                           "--no-ray", "--no-match", "--encoder", "filterbank", "--segmenter",
                           "threshold", "--device", "cpu", "-q")
    assert code == 0, err
    rows = _table(out)
    assert [rows[n]["status"] for n in NAMES] == ["done", "done", "no-clicks"]
    for name, n in (("TS_01", 2), ("TS_02", 1)):
        record = json.loads((out / name / "run.json").read_text())
        assert record["counts"]["prompts"] == n, (name, record["counts"])
    # names with a descriptive suffix match as cryosam segment matches them (one matcher)
    clicks.write_text(clicks.read_text().replace(",TS_01", ",TS_01.denoised")
                      .replace(",TS_02", ",TS_02.denoised"))
    code, _, err = run_cli("batch", dataset / "tomos", "--out", tmp_path / "dots", "--points",
                           clicks, "--no-ray", "--no-match", "--encoder", "filterbank",
                           "--segmenter", "threshold", "--device", "cpu", "-q")
    assert code == 0, err
    rows = _table(tmp_path / "dots")
    assert [rows[n]["status"] for n in NAMES] == ["done", "done", "no-clicks"]


def test_the_batch_example_script_resumes(dataset: Path, tmp_path: Path) -> None:
    """examples/batch_segment.sh run twice: the second run skips every tomogram (its header
    promises resuming; rebuilding the query each time made every tomogram 'query changed')."""
    script = Path(__file__).resolve().parents[1] / "examples" / "batch_segment.sh"
    tomos = tmp_path / "tomos"
    shutil.copytree(dataset / "tomos", tomos)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "BATCH_OPTS": "--no-ray"}  # an option only batch takes (query refuses it)
    args = ["bash", str(script), str(tomos), str(tomos / "TS_01.mrc"),
            str(dataset / "clicks.star"), *FAST[:-1]]
    for _ in range(2):
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
    rows = _table(tomos / "picks")
    assert [rows[n]["status"] for n in NAMES] == ["skipped"] * 3, rows


def test_a_worker_sharing_a_gpu_takes_its_share_of_the_cache_budget(monkeypatch) -> None:
    """When workers outnumber GPUs, Ray gives each a fraction of one; each worker's automatic
    SAM cache budget is that fraction of what one process alone would take, so that together
    they leave the GPU the same working memory."""
    import torch

    from cryosam import backends
    from cryosam.batch import Options
    from cryosam.batch_ray import Worker
    from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig
    from cryosam.device import cache_budget_mb, hold_gpu_share

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    cfg = CryosamConfig(encoder=EncoderConfig(name=backends.weight_free("encoder")),
                        segmenter=SegmenterConfig(name=backends.weight_free("segmenter")),
                        device="cpu").to_dict()
    cuda = torch.device("cuda")
    try:
        Worker(cfg, Options(), gpu_share=0.5)  # two workers per GPU
        assert cache_budget_mb(cuda, None) == 10 * 1024 // 2
        Worker(cfg, Options())  # alone on its GPU: a third of what is free
        assert cache_budget_mb(cuda, None) == 10 * 1024
    finally:
        hold_gpu_share(1.0)


def test_a_speed_config_keeps_the_query_and_resumes(dataset: Path, tmp_path: Path,
                                                    run_cli) -> None:
    """A --config that only sets batch sizes goes on top of a saved query's parameters: the
    query's own (encoder, top-K, threshold) stay, and a batch resumed with it skips all."""
    query = tmp_path / "q.cryosam-query"
    code, _, err = run_cli("query", dataset / "tomos" / "TS_01.mrc", "--points",
                           dataset / "clicks.star", "--tomo-name", "TS_01", "--top-k", "100",
                           "--sim-threshold", "0.55", "--out", query, *FAST)
    assert code == 0, err
    out = tmp_path / "out"
    args = ("batch", dataset / "tomos", "--out", out, "--query", query, "--no-ray", "--device",
            "cpu", "-q")
    code, _, err = run_cli(*args)
    assert code == 0, err
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"segmenter": {"decoder_batch_size": 8},
                                 "encoder": {"batch_size": 2}}))
    code, _, err = run_cli(*args, "--config", speed)
    assert code == 0, err
    assert {r["status"] for r in _table(out).values()} == {"skipped"}
    time.sleep(1.1)  # the same query saved again: another file (its time is in it) ...
    again = tmp_path / "again.cryosam-query"
    code, _, err = run_cli("query", dataset / "tomos" / "TS_01.mrc", "--points",
                           dataset / "clicks.star", "--tomo-name", "TS_01", "--top-k", "100",
                           "--sim-threshold", "0.55", "--out", again, *FAST)
    assert code == 0, err
    from cryosam.utils import sha256_file

    assert sha256_file(again) != sha256_file(query)
    code, _, err = run_cli(*args[:5], again, *args[6:])  # ... but the same query: all skipped
    assert code == 0, err
    assert {r["status"] for r in _table(out).values()} == {"skipped"}
    record_path = out / "TS_02" / "run.json"  # as cryosam wrote it before the content digest
    record = json.loads(record_path.read_text())
    record["batch"]["query_sha256"] = sha256_file(query)
    record_path.write_text(json.dumps(record))
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert _table(out)["TS_02"]["status"] == "skipped"
    seg = tmp_path / "seg"
    code, _, err = run_cli("segment", dataset / "tomos" / "TS_02.mrc", "--query", query,
                           "--config", speed, "--out", seg, "--device", "cpu", "-q")
    assert code == 0, err
    params = json.loads((seg / "run.json").read_text())["parameters"]
    assert params["encoder"]["name"] == "filterbank" and params["encoder"]["batch_size"] == 2
    assert params["segmenter"]["decoder_batch_size"] == 8
    assert (params["matching"]["top_k"], params["matching"]["sim_threshold"]) == (100, 0.55)


def test_batch_csv_and_run_json_keep_each_tomograms_warnings(dataset: Path, tmp_path: Path,
                                                            run_cli) -> None:
    import starfile

    clicks = tmp_path / "clicks"
    clicks.mkdir()
    table = starfile.read(dataset / "clicks.star")
    for i, name in enumerate(("TS_01", "TS_02")):
        row = table.iloc[i]
        line = f"{row.rlnCoordinateX},{row.rlnCoordinateY},{row.rlnCoordinateZ}\n"
        # TS_02's click twice: the run warns that it repeats and was merged
        (clicks / f"{name}.csv").write_text("x,y,z\n" + line * (1 + i))
    out = tmp_path / "out"
    args = ("batch", dataset / "tomos", "--out", out, "--points", clicks, "--no-ray",
            "--no-match", "--encoder", "filterbank", "--segmenter", "threshold", "--device",
            "cpu")
    code, said_first, err = run_cli(*args)
    assert code == 0, err
    rows = _table(out)
    assert rows["TS_01"]["warnings"] == "" and rows["TS_03"]["warnings"] == ""
    assert "repeat an earlier click" in rows["TS_02"]["warnings"]
    assert "  warning: 1 click(s) repeat" in said_first + err
    said = json.loads((out / "TS_02" / "run.json").read_text())["warnings"]
    assert len(said) == 1 and said[0] in rows["TS_02"]["warnings"]
    assert json.loads((out / "TS_01" / "run.json").read_text())["warnings"] == []

    code, said_again, err = run_cli(*args)  # resumed: skipped, the earlier warning kept
    assert code == 0, err
    rows = _table(out)
    assert rows["TS_02"]["status"] == "skipped"
    assert "repeat an earlier click" in rows["TS_02"]["warnings"]
    assert "repeat" not in said_again + err  # not said again for a tomogram not run again


def test_a_damaged_output_is_redone(dataset: Path, tmp_path: Path, run_cli) -> None:
    """A file cut short after the run (a full disk, an interrupted copy) differs from the
    size run.json recorded: the rerun redoes that tomogram and says why."""
    out = tmp_path / "out"
    args = ("batch", dataset / "tomos", "--out", out, "--points", dataset / "clicks.star",
            "--no-ray", "--no-match", *FAST)
    code, _, err = run_cli(*args)
    assert code == 0, err
    sizes = json.loads((out / "TS_02" / "run.json").read_text())["output_bytes"]
    assert sizes["semantic.mrc"] == (out / "TS_02" / "semantic.mrc").stat().st_size
    with open(out / "TS_02" / "semantic.mrc", "r+b") as fh:
        fh.truncate(1000)
    code, _, err = run_cli(*args)
    assert code == 0, err
    rows = _table(out)
    assert rows["TS_01"]["status"] == "skipped"
    assert rows["TS_02"]["status"] == "done"
    assert rows["TS_02"]["reason"].startswith("outputs damaged (semantic.mrc is 1000 bytes")
    assert (out / "TS_02" / "semantic.mrc").stat().st_size == sizes["semantic.mrc"]
    with open(out / "TS_03" / "picks_napari.csv", "a") as fh:  # curated by hand: kept
        fh.write("1,2,3,0.5,1\n")
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert _table(out)["TS_03"]["status"] == "skipped"


def test_clicks_naming_no_tomogram_are_said(dataset: Path, tmp_path: Path, run_cli) -> None:
    """Rows for a tomogram not in the dataset (a typo) are warned of with both sides' names;
    when no row names a tomogram of the dataset, one line lists what the clicks name."""
    import starfile

    row = starfile.read(dataset / "clicks.star").iloc[0]
    xyz = f"{row.rlnCoordinateX},{row.rlnCoordinateY},{row.rlnCoordinateZ}"
    some = tmp_path / "some.csv"
    some.write_text(f"tomo_name,x,y,z\nTS_01,{xyz}\nTS_99,{xyz}\n")
    args = ("--no-ray", "--no-match", *FAST)
    code, _, err = run_cli("batch", dataset / "tomos", "--out", tmp_path / "a", "--points",
                           some, *args)
    assert code == 0, err
    assert "clicks for TS_99 match no tomogram of the dataset" in err
    assert "(the dataset's: TS_01, TS_02, TS_03)" in err
    typo = tmp_path / "typo.csv"
    typo.write_text(f"tomo_name,x,y,z\nTS_1,{xyz}\nTS_2,{xyz}\n")
    code, _, err = run_cli("batch", dataset / "tomos", "--out", tmp_path / "b", "--points",
                           typo, *args)
    assert code == 2 and err.count("\n") == 1
    assert "its clicks name TS_1, TS_2, none of them a tomogram of the dataset" in err


def test_a_query_saved_with_other_parameters_names_the_one(dataset: Path, tmp_path: Path,
                                                           run_cli) -> None:
    """The same clicks saved again with --top-k 2: the resumed batch says which parameter
    changed (it said only 'query changed'), and a cap the user set is not warned of as a
    tomogram without particles."""
    query = tmp_path / "q.cryosam-query"
    make = ("query", dataset / "tomos" / "TS_01.mrc", "--points", dataset / "clicks.star",
            "--tomo-name", "TS_01", "--out", query, *FAST)
    assert run_cli(*make)[0] == 0
    out = tmp_path / "out"
    batch = ("batch", dataset / "tomos", "--out", out, "--query", query, "--no-ray",
             "--shard", "1/3", "-q")
    code, _, err = run_cli(*batch)
    assert code == 0, err
    code, _, err = run_cli(*make, "--top-k", "2", "--overwrite")
    assert code == 0, err
    code, _, err = run_cli(*batch)
    assert code == 0, err
    row = _table(out, "batch-1-of-3.csv")["TS_02"]
    assert row["reason"] == "parameters changed (matching.top_k 512 -> 2)"
    assert "in this tomogram (the query was made on" not in row["warnings"]


def test_the_dataset_gets_one_star_per_tool(dataset: Path, tmp_path: Path, run_cli) -> None:
    """DIR/picks_relion5.star and DIR/picks_warp.star hold every tomogram's picks, named
    per row, as RELION-5's extraction and Warp take them (the per-tomogram files had to be
    merged by hand); a shard writes none (its tomograms are not the dataset)."""
    import starfile

    out = tmp_path / "out"
    code, said, err = run_cli("batch", dataset / "tomos", "--out", out, "--points",
                              dataset / "clicks.star", "--no-ray", "--no-match",
                              *FAST[:-1])
    assert code == 0, err
    relion = starfile.read(out / "picks_relion5.star")
    assert list(relion["rlnTomoName"]) == list(NAMES)  # --no-match: the click of each
    one = starfile.read(out / "TS_02" / "picks_relion5.star")
    row = relion[relion["rlnTomoName"] == "TS_02"].reset_index(drop=True)
    assert row["rlnCenteredCoordinateXAngst"][0] == one["rlnCenteredCoordinateXAngst"][0]
    warp = starfile.read(out / "picks_warp.star")
    assert list(warp["rlnMicrographName"]) == [f"{n}.tomostar" for n in NAMES]
    assert f"{out / 'picks_relion5.star'}: 3 particle(s) of 3 tomogram(s)" in said
    code, _, err = run_cli("batch", dataset / "tomos", "--out", out, "--points",
                           dataset / "clicks.star", "--no-ray", "--no-match", "--star",
                           "warp", *FAST)
    assert code == 0, err  # no RELION-5 files now: the dataset's earlier one goes too
    assert not (out / "picks_relion5.star").exists() and (out / "picks_warp.star").exists()
    assert _table(out)["TS_01"]["reason"] == 'options changed (star null -> ["warp"])'
    (out / "TS_01" / "picks_warp.star").write_text("garbage\n")  # re-saved badly by hand
    code, said, err = run_cli("batch", dataset / "tomos", "--out", out, "--points",
                              dataset / "clicks.star", "--no-ray", "--no-match",
                              "--star-tomo-name", "x", *FAST)
    assert code == 2 and "--star-tomo-name" in err  # (a segment-only option, refused)
    code, said, err = run_cli("batch", dataset / "tomos", "--out", out, "--points",
                              dataset / "clicks.star", "--no-ray", "--no-match", "--star",
                              "warp", *FAST[:-1])  # as the last run: every tomogram skipped
    assert code == 0, err
    assert f"{out / 'TS_01' / 'picks_warp.star'}: left out of" in err
    assert list(starfile.read(out / "picks_warp.star")["rlnMicrographName"]) == [
        "TS_02.tomostar", "TS_03.tomostar"]
    # the dataset's own file as this batch's clicks: read, never removed or rewritten
    before = (out / "picks_warp.star").read_text()
    code, _, err = run_cli("batch", dataset / "tomos", "--out", out, "--points",
                           out / "picks_warp.star", "--no-ray", "--no-match", "--star", "warp",
                           *FAST)
    assert code == 0, err
    assert (out / "picks_warp.star").read_text() == before and "not rewritten" in err
    # relion4 without its pixel size: one line before any work, the dataset files untouched
    code, _, err = run_cli("batch", dataset / "tomos", "--out", out, "--points",
                           dataset / "clicks.star", "--no-ray", "--no-match", "--star",
                           "relion4", *FAST)
    assert code == 2 and err.count("\n") == 1 and "--tilt-series-pixel-size" in err
    assert (out / "picks_warp.star").exists()
    sharded = tmp_path / "sharded"
    code, said, err = run_cli("batch", dataset / "tomos", "--out", sharded, "--points",
                              dataset / "clicks.star", "--no-ray", "--no-match", "--shard",
                              "0/3", *FAST[:-1])
    assert code == 0, err
    assert not (sharded / "picks_relion5.star").exists()
    assert "run the same command without --shard" in said  # how to get them
    # a shard in a folder with dataset files drops them: they would no longer match
    code, _, err = run_cli("batch", dataset / "tomos", "--out", out, "--points",
                           dataset / "clicks.star", "--no-ray", "--no-match", "--top-k", "2",
                           "--shard", "0/3", *FAST)
    assert code == 0, err
    assert not (out / "picks_warp.star").exists()


def test_numeric_looking_tomogram_names_stay_names(dataset: Path, tmp_path: Path,
                                                   run_cli) -> None:
    """Tomograms 001 and 1e3: a combined clicks STAR selects their rows by name, and the
    dataset STAR keeps the names (they were read back as the numbers 1 and 1000)."""
    import pandas as pd
    import starfile

    tomos = tmp_path / "tomos"
    tomos.mkdir()
    table = starfile.read(dataset / "clicks.star")
    rows = []
    for name, source in (("001", "TS_01"), ("1e3", "TS_02")):
        shutil.copy(dataset / "tomos" / f"{source}.mrc", tomos / f"{name}.mrc")
        row = table[table["rlnTomoName"] == source].iloc[0]
        rows.append({"rlnTomoName": name, "rlnCoordinateX": row.rlnCoordinateX,
                     "rlnCoordinateY": row.rlnCoordinateY,
                     "rlnCoordinateZ": row.rlnCoordinateZ})
    clicks = tmp_path / "clicks.star"
    starfile.write({"particles": pd.DataFrame(rows)}, clicks)
    out = tmp_path / "out"
    code, _, err = run_cli("batch", tomos, "--out", out, "--points", clicks, "--no-ray",
                           "--no-match", *FAST)
    assert code == 0, err
    assert {r["status"] for r in _table(out).values()} == {"done"}
    text = (out / "picks_relion5.star").read_text()
    names = [line.split()[0] for line in text.splitlines() if line and line[0] in "01"]
    assert names == ["001", "1e3"]


def test_the_dataset_star_reads_back_as_clicks_for_warp_named_tomograms(
        dataset: Path, tmp_path: Path, run_cli) -> None:
    """Tomograms named as Warp and RELION-5 write them (TS_01_10.00Apx.mrc, rec_TS_02.mrc):
    the dataset STAR names them TS_01, TS_02, and a batch or a segment reads it back as
    their clicks (the names did not match before)."""
    tomos = tmp_path / "tomos"
    tomos.mkdir()
    shutil.copy(dataset / "tomos" / "TS_01.mrc", tomos / "TS_01_10.00Apx.mrc")
    shutil.copy(dataset / "tomos" / "TS_02.mrc", tomos / "rec_TS_02.mrc")
    first = tmp_path / "first"
    code, _, err = run_cli("batch", tomos, "--out", first, "--points", dataset / "clicks.star",
                           "--no-ray", "--no-match", *FAST)
    assert code == 0, err
    assert {r["status"] for r in _table(first).values()} == {"done"}
    again = tmp_path / "again"
    code, _, err = run_cli("batch", tomos, "--out", again, "--points",
                           first / "picks_relion5.star", "--no-ray", "--no-match", *FAST)
    assert code == 0, err
    assert {r["status"] for r in _table(again).values()} == {"done"}
    code, _, err = run_cli("segment", tomos / "TS_01_10.00Apx.mrc", "--points",
                           first / "picks_relion5.star", "--no-match", "--out",
                           tmp_path / "one", *FAST)
    assert code == 0, err


def test_two_tomograms_with_one_star_name_are_said_and_left_out_of_the_dataset_star(
        dataset: Path, tmp_path: Path, run_cli) -> None:
    """TS_01.mrc beside rec_TS_01.mrc: both are TS_01 to RELION-5 and Warp. The batch says so
    before any work, and the dataset STAR files leave both out (they were merged silently
    under one name, the second one's particles read back at the first one's centre)."""
    import starfile

    tomos = tmp_path / "tomos"
    tomos.mkdir()
    for source, name in (("TS_01", "TS_01"), ("TS_01", "rec_TS_01"), ("TS_02", "TS_02")):
        shutil.copy(dataset / "tomos" / f"{source}.mrc", tomos / f"{name}.mrc")
    out = tmp_path / "out"
    code, said, err = run_cli("batch", tomos, "--out", out, "--points",
                              dataset / "clicks.star", "--no-ray", "--no-match", *FAST)
    assert code == 0, err
    assert "TS_01.mrc and rec_TS_01.mrc are both TS_01 in STAR files" in err
    assert "picks_relion5.star: leaves out TS_01, the STAR name of more than one" in err
    assert {r["status"] for r in _table(out).values()} == {"done"}
    relion = starfile.read(out / "picks_relion5.star")
    assert set(relion["rlnTomoName"]) == {"TS_02"}
    warp = starfile.read(out / "picks_warp.star")
    assert set(warp["rlnMicrographName"]) == {"TS_02.tomostar"}


def test_symlinked_tomograms_keep_their_own_names(dataset: Path, tmp_path: Path,
                                                  run_cli) -> None:
    """A dataset of links (TS_01.mrc -> ../proc/TS_01/tomogram.mrc), as pipelines lay them
    out: each runs under the link's name and gets its clicks (they were named after the
    targets: two 'tomogram's refused, or one link's clicks unused)."""
    links = tmp_path / "links"
    links.mkdir()
    for name in NAMES[:2]:
        target = tmp_path / "proc" / name / "tomogram.mrc"
        target.parent.mkdir(parents=True)
        shutil.copy(dataset / "tomos" / f"{name}.mrc", target)
        (links / f"{name}.mrc").symlink_to(target)
    out = tmp_path / "out"
    code, _, err = run_cli("batch", links, "--out", out, "--points", dataset / "clicks.star",
                           "--no-ray", "--no-match", *FAST)
    assert code == 0, err
    table = _table(out)
    assert set(table) == set(NAMES[:2]) and {r["status"] for r in table.values()} == {"done"}


def test_a_signal_wrapped_by_ray_is_raised_as_itself() -> None:
    """A SIGTERM arriving in Ray's C code comes back as a SystemError caused by it: it is
    raised as the signal (exit 143), not as a worker that could not start (exit 2)."""
    from cryosam.batch_ray import _reraise_signal
    from cryosam.errors import Terminated

    try:
        try:
            raise Terminated()
        except Terminated as inner:
            raise SystemError("returned a result with an exception set") from inner
    except SystemError as wrapped:
        with pytest.raises(Terminated):
            _reraise_signal(wrapped)
    _reraise_signal(RuntimeError("weights missing"))  # no signal: nothing raised


def test_a_full_batch_and_a_shard_do_not_run_on_one_out_together(dataset: Path,
                                                                  tmp_path: Path,
                                                                  run_cli) -> None:
    """A shard running while the full batch starts on the same --out (or the other way
    round): one line before any work (both computed the same tomograms)."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    shard_lock = out / ".batch-1-of-2.csv.lock"
    shard_lock.write_text(f"{os.uname().nodename} 1\n")  # a live process holds it
    args = ("batch", dataset / "tomos", "--out", out, "--points", dataset / "clicks.star",
            "--no-ray", "--no-match", *FAST)
    code, _, err = run_cli(*args)
    assert code == 2 and "a --shard is writing this --out (.batch-1-of-2.csv.lock)" in err
    shard_lock.unlink()
    (out / ".batch.csv.lock").write_text(f"{os.uname().nodename} 1\n")
    code, _, err = run_cli(*args, "--shard", "0/2")
    assert code == 2 and "a full batch is writing this --out" in err
    assert not (out / "batch-0-of-2.csv").exists() and not (out / "TS_01").exists()
