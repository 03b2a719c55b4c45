"""The command line: defaults from the configuration, --config re-runs, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryosam import io
from cryosam.config import CryosamConfig, MatchingConfig, get_path


def test_cli_segment_no_match_writes_clicked_particles(small_sim, tmp_path: Path,
                                                        run_cli) -> None:
    sim, files = small_sim
    out = tmp_path / "clicked"
    code, stdout, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompts5.csv"],
                                "--no-match", "--segmenter", "threshold", "--out", out,
                                "--device", "cpu")
    assert code == 0, err
    picks = io.read_points(out / "picks.csv")
    assert len(picks) == 5
    assert np.all(picks.columns["prompt"] == 1)
    labels = io.read_tomogram(out / "instances.mrc").data
    assert len(np.unique(labels)) == 6  # five instances + background
    assert "5 click(s)" in stdout


@pytest.mark.parametrize("case", ["missing_tomo", "outside", "empty_points", "image_2d"])
def test_cli_bad_input_is_one_line_exit_2_and_no_output(case: str, small_sim, tmp_path: Path,
                                                        run_cli) -> None:
    _, files = small_sim
    tomo, points = files["tomo.mrc"], files["prompt.csv"]
    if case == "missing_tomo":
        tomo = tmp_path / "nope.mrc"
    elif case == "outside":
        points = tmp_path / "far.csv"
        points.write_text("x,y,z\n5000,10,10\n")
    elif case == "empty_points":
        points = tmp_path / "empty.csv"
        points.write_text("x,y,z\n")
    elif case == "image_2d":
        tomo = tmp_path / "flat.mrc"
        with mrcfile.new(tomo) as mrc:
            mrc.set_data(np.zeros((32, 32), np.float32))
    out = tmp_path / "out"
    code, _, err = run_cli("segment", tomo, "--points", points, "--out", out,
                           "--encoder", "filterbank", "--segmenter", "threshold")
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_missing_weights_is_one_line(small_sim, tmp_path: Path, run_cli,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, files = small_sim
    monkeypatch.setenv("CRYOSAM_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", tmp_path / "o", "--sam-model", "vit_b")
    assert code == 2
    assert "cryosam weights download" in err
    assert not (tmp_path / "o").exists()


def test_cli_demo_runs_offline_and_scores(tmp_path: Path, run_cli,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYOSAM_CHECKPOINTS", str(tmp_path / "no_weights"))
    code, out, err = run_cli("demo", tmp_path / "demo", "--shape", "40,96,112", "--seed", "3",
                             "--device", "cpu")
    assert code == 0, err
    assert "weight-free backends" in out
    f1 = float(out.split(" F1 ")[1].split()[0])
    assert 0.0 <= f1 <= 1.0
    assert (tmp_path / "demo" / "tomo_cryosam" / "preview.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "data" / "truth.csv").exists()
    import starfile  # every STAR file names the tomogram alike (picks.star said 'demo')

    names = {str(starfile.read(tmp_path / "demo" / "tomo_cryosam" / f)["rlnTomoName"][0])
             for f in ("picks.star", "picks_relion5.star")}
    assert names == {"tomo"}


def test_cli_help_lists_built_commands(run_cli) -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    for name in ("segment", "demo", "simulate", "evaluate", "info", "weights", "bench"):
        assert name in out


def test_overwrite_never_deletes_user_files(small_sim, run_cli, tmp_path: Path) -> None:
    _, files = small_sim
    data = files["tomo.mrc"].parent  # the simulation folder: the user's own files
    before = sorted(p.name for p in data.iterdir())
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", data, "--overwrite", "--no-match", "--segmenter",
                           "threshold")
    assert code == 2 and "did not write" in err
    assert sorted(p.name for p in data.iterdir()) == before


@pytest.mark.parametrize("args", [["--out", "FILE/sub"], ["--cache-dir", "FILE"],
                                  ["--nms-radius", "-3"], ["--device", "cuda:7"]])
def test_cli_bad_options_fail_before_any_work(args: list[str], small_sim, tmp_path: Path,
                                              run_cli) -> None:
    _, files = small_sim
    (tmp_path / "FILE").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--encoder", "filterbank", "--segmenter", "threshold", *args)
    assert code == 2
    assert "Traceback" not in err and err.strip()


@pytest.mark.parametrize("command, out, message", [
    ("simulate", "FILE", "OUT_DIR {FILE}: exists and is not a folder"),
    ("simulate", "FILE/sub", "OUT_DIR {FILE}/sub: cannot write under"),
    ("simulate", "/proc/cryosam_nope", "OUT_DIR /proc/cryosam_nope: cannot write"),
    ("query", "FILE/q.cryosam-query", "--out {FILE}/q.cryosam-query: cannot write under"),
    ("query", "/proc/q.cryosam-query", "--out /proc/q.cryosam-query: cannot write"),
])
def test_cli_unwritable_outputs_are_one_line(command: str, out: str, message: str,
                                             small_sim, tmp_path: Path, run_cli) -> None:
    """simulate's folder and query's file: one line naming the place, exit 2 (they were
    tracebacks; query's after all its work). /proc: refused by the check before any work for
    a user, by the failed write for root (who may write anywhere else)."""
    _, files = small_sim
    (tmp_path / "FILE").write_text("not a folder")
    out = out.replace("FILE", str(tmp_path / "FILE"))
    args = (["simulate", out, "--shape", "24,48,48"] if command == "simulate" else
            ["query", files["tomo.mrc"], "--points", files["prompt.csv"], "--out", out,
             "--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu"])
    code, _, err = run_cli(*args)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: " + message.format(FILE=tmp_path / "FILE")), err


# --------------------------------------------------------------------------- defaults


def _segment_params(app=None) -> dict[str, object]:  # noqa: ANN001
    """The ``segment`` command's click parameters by name, from ``app`` (default: the CLI's)."""
    import typer.main

    from cryosam import cli

    group = typer.main.get_command(app or cli.app)
    return {p.name: p for p in group.commands["segment"].params}


def test_every_segment_option_takes_its_default_from_the_config() -> None:
    from cryosam.commands.segment import OPTION_PATHS

    params = _segment_params()
    defaults = CryosamConfig()
    assert len(OPTION_PATHS) >= 15
    for name, path in OPTION_PATHS.items():
        expected = get_path(defaults, path)
        if name == "ratios":
            expected = ",".join(str(r) for r in expected)
        default = params[name].default
        assert (getattr(default, "value", default)) == expected, name


def test_changing_a_config_default_changes_the_cli(monkeypatch: pytest.MonkeyPatch, small_sim,
                                                   tmp_path: Path, capsys) -> None:
    """A default changed in the configuration reaches ``cryosam segment`` (help and run)."""
    from cryosam import cli, config

    changed = CryosamConfig(matching=MatchingConfig(top_k=7, sim_threshold=0.61))
    monkeypatch.setattr(config, "default_config", lambda: changed)
    app = cli.build_app()
    monkeypatch.setattr(cli, "app", app)
    params = _segment_params(app)
    assert params["top_k"].default == 7 and params["sim_threshold"].default == 0.61
    _, files = small_sim
    out = tmp_path / "o"
    code = cli.main(["segment", str(files["tomo.mrc"]), "--points", str(files["prompt.csv"]),
                     "--encoder", "filterbank", "--segmenter", "threshold", "--device", "cpu",
                     "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    params = json.loads((out / "run.json").read_text())["parameters"]
    assert params["matching"]["top_k"] == 7 and params["matching"]["sim_threshold"] == 0.61


# --------------------------------------------------------------------------- --config


def test_config_rerun_reproduces_picks_exactly(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    first = tmp_path / "first"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--encoder", "filterbank", "--segmenter", "threshold",
                           "--device", "cpu", "--sim-threshold", "0.45", "--top-k", "40",
                           "--out", first, "--quiet")
    assert code == 0, err
    again = tmp_path / "again"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--config", first / "run.json", "--out", again, "--quiet")
    assert code == 0, err
    assert (again / "picks.csv").read_bytes() == (first / "picks.csv").read_bytes()
    np.testing.assert_array_equal(io.read_tomogram(again / "instances.mrc").data,
                                  io.read_tomogram(first / "instances.mrc").data)
    p1 = json.loads((first / "run.json").read_text())["parameters"]
    p2 = json.loads((again / "run.json").read_text())["parameters"]
    assert p1 == p2 and p2["encoder"]["name"] == "filterbank"


def test_command_line_overrides_the_config_file(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    saved = CryosamConfig.from_dict({"encoder": {"name": "filterbank"},
                                     "segmenter": {"name": "threshold"},
                                     "matching": {"top_k": 40}, "device": "cpu"})
    cfg_file = tmp_path / "params.json"
    cfg_file.write_text(json.dumps(saved.to_dict()))
    out = tmp_path / "o"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--config", cfg_file, "--top-k", "3", "--no-turns", "--out", out,
                           "--quiet")
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    params = record["parameters"]
    assert params["matching"]["top_k"] == 3  # the command line wins
    assert params["matching"]["turns"] is False
    assert record["matching"]["stats"]["vectors_scored"] == 1
    assert params["segmenter"]["name"] == "threshold"  # the file's value, not the default
    assert len(io.read_points(out / "picks.csv")) <= 3 + 1


def test_a_configuration_built_in_python_keeps_its_values() -> None:
    """NumPy scalars and arrays, whole floats and paths (what Python code holds) are taken as
    their kinds by the parameter checks, also when read back from a run record."""
    from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig

    cfg = CryosamConfig.from_dict({"binning": np.int64(2), "seed": 3.0, "matching": {
        "ratios": np.array([16, 8, 4]), "sim_threshold": np.float32(0.5)}})
    assert (cfg.binning, cfg.seed, cfg.matching.ratios) == (2, 3, (16, 8, 4))
    assert type(cfg.binning) is int and type(cfg.matching.sim_threshold) is float
    again = CryosamConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert SegmenterConfig(backends={"sam": {"model": Path("/x/sam.pth")}}) \
        .backends["sam"].model == "/x/sam.pth"
    assert EncoderConfig(backends={"filterbank": {"patch": np.int64(2)}}) \
        .backends["filterbank"].patch == 2


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    ('{"parameters": {"matching": {"topk": 3}}}', "topk"),
    ('{"matching": {"ratios": [4, 8]}}', "matching.ratios"),
    ('{"matching": {"turns": "false"}}', "matching.turns"),
    ('{"encoder": {"name": "resnet"}}', "resnet"),
    # a hand-edited file of the wrong kinds: tracebacks or Python's own words before
    ('{"matching": {"ratios": "16,8,4"}}', "matching.ratios '16,8,4': give a list of whole "
                                           "numbers"),
    ('{"matching": {"ratios": [16, 8, 4.5]}}', "matching.ratios [16, 8, 4.5]: give a list"),
    ('{"matching": 5}', "matching 5: give a block of its parameters"),
    ('{"matching": {"sim_threshold": "high"}}', "matching.sim_threshold 'high': give a number"),
    ('{"threads": "four"}', "threads 'four': give a whole number or null"),
    ('{"seed": 1.5}', "seed 1.5: give a whole number"),
    ('{"polarity": 3}', "polarity 3: give one of auto, dark, bright"),
])
def test_bad_config_file_is_one_line(content: str, words: str, small_sim, tmp_path: Path,
                                     run_cli) -> None:
    _, files = small_sim
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "o"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--config", bad, "--out", out)
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and "--config" in lines[0]
    assert not out.exists()


def test_missing_weights_of_both_models_name_both_and_one_command(
        small_sim, tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    _, files = small_sim
    monkeypatch.setenv("CRYOSAM_CHECKPOINTS", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", tmp_path / "o")
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert "sam_vit_h" in lines[0] and "dinov2-with-registers-large" in lines[0]
    assert lines[0].count("cryosam weights download") == 1
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- any tomogram


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.strip().splitlines() if ln.startswith("error:")]


def test_clicks_on_background_exit_2_with_a_reason(tmp_path: Path, run_cli) -> None:
    vol = np.random.default_rng(0).normal(size=(32, 48, 48)).astype(np.float32)
    tomo = tmp_path / "noise.mrc"  # nothing but noise: nothing to segment
    io.write_mrc(tomo, vol, voxel_size=(10.0, 10.0, 10.0))
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("x,y,z\n10,20,16\n30,30,10\n")
    out = tmp_path / "o"
    code, _, err = run_cli("segment", tomo, "--points", clicks, "--out", out,
                           "--encoder", "filterbank", "--segmenter", "threshold")
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert "no particle found at any click" in line and "background" in line
    assert line.startswith(f"error: {clicks}: ")  # names the clicks file
    assert not out.exists()


def test_wrong_polarity_is_named_in_the_error(small_sim, tmp_path: Path, run_cli) -> None:
    _, files = small_sim
    out = tmp_path / "o"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--out", out, "--encoder", "filterbank", "--segmenter", "threshold",
                           "--polarity", "bright")
    assert code == 2
    (line,) = _error_lines(err)
    assert "try --polarity dark" in line
    assert not out.exists()


def test_points_in_another_pixel_size_are_scaled(small_sim, tmp_path: Path, run_cli) -> None:
    sim, files = small_sim
    clicks = tmp_path / "bin2.txt"  # IMOD model2point style, picked on a 2x binned copy
    x, y, z = sim.prompt_points[0][::-1] / 2
    clicks.write_text(f"1 1 {x:.2f} {y:.2f} {z:.2f}\n")
    outs = {}
    for flag, value in (("--points-bin", "2"),
                        ("--points-pixel-size", str(2 * sim.voxel_size))):
        outs[flag] = tmp_path / flag.strip("-")
        code, _, err = run_cli("segment", files["tomo.mrc"], "--points", clicks, "--out",
                               outs[flag], "--no-match", "--segmenter", "threshold",
                               "--threads", "1", flag, value)
        assert code == 0, err
        assert "scaled by 2" in err  # said, not silent
    for out in outs.values():
        rec = json.loads((out / "run.json").read_text())
        np.testing.assert_allclose(rec["inputs"]["prompts_zyx"][0], sim.prompt_points[0],
                                   atol=0.02)
        assert rec["device"]["cpu_threads"] == 1 and rec["parameters"]["threads"] == 1
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", clicks, "--out",
                           tmp_path / "both", "--points-bin", "2", "--points-pixel-size", "20")
    assert code == 2 and "give one" in err


def test_segment_reads_its_own_rows_of_a_multi_tomogram_star(small_sim, tmp_path: Path,
                                                             run_cli) -> None:
    """`cryosam segment TS_02.mrc --points all.star` takes TS_02's rows of a file that also
    holds TS_01's (README: --tomo-name defaults to the file stem), as `cryosam batch` does."""
    import pandas as pd
    import starfile

    sim, files = small_sim
    tomo = tmp_path / "TS_02.mrc"
    tomo.symlink_to(files["tomo.mrc"])
    mine = io.read_points(files["prompts5.csv"]).zyx[:2]
    rows = {"rlnTomoName": ["TS_01"] * 3 + ["TS_02"] * 2,
            "rlnCoordinateX": [500.0] * 3 + list(mine[:, 2]),  # TS_01's: outside this one
            "rlnCoordinateY": [1.0] * 3 + list(mine[:, 1]),
            "rlnCoordinateZ": [1.0] * 3 + list(mine[:, 0])}
    star = tmp_path / "all.star"
    starfile.write({"particles": pd.DataFrame(rows)}, star)
    out = tmp_path / "out"
    code, stdout, err = run_cli("segment", tomo, "--points", star, "--no-match",
                                "--segmenter", "threshold", "--out", out, "--device", "cpu")
    assert code == 0, err
    assert len(io.read_points(out / "picks.csv")) == 2 and "2 click(s)" in stdout
    code, _, err = run_cli("segment", tomo, "--points", star, "--tomo-name", "TS_01",
                           "--no-match", "--segmenter", "threshold", "--out",
                           tmp_path / "out1", "--device", "cpu")
    assert code == 2 and "outside" in err  # the name given wins: TS_01's rows, refused


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(where: str, small_sim,
                                                               tmp_path: Path,
                                                               run_cli) -> None:
    """`cryosam --debug segment ...` and `cryosam segment ... --debug` (both in --help) print
    the error's traceback before the one line, and exit 2 all the same."""
    _, files = small_sim
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    args = ["segment", files["tomo.mrc"], "--points", bad, "--no-match", "--segmenter",
            "threshold", "--out",
            tmp_path / "out", "--device", "cpu"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    code, _, err = run_cli(*args)
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("error: ") and "names no x,y,z" in err
    code, _, err = run_cli(*[a for a in args if a != "--debug"])
    assert code == 2 and err.count("\n") == 1 and "names no x,y,z" in err
    # a command without its own --debug (evaluate) takes it after its arguments too
    code, _, err = run_cli("evaluate", bad, bad, "--radius", "3", "--debug")
    assert code == 2 and "Traceback" in err and "No such option" not in err


@pytest.mark.parametrize(("args", "words"), [
    (["segment", "T", "--min-score", "1.5"], "'--min-score'"),
    (["segment", "T", "--threads", "0"], "'--threads'"),
    (["segment", "T", "--top-k", "-1"], "'--top-k'"),
    (["segment", "T", "--no-such-option"], "--no-such-option"),
    (["segmnt"], "segment"),
])
def test_usage_errors_are_one_line_exit_2(args: list[str], words: str, run_cli) -> None:
    """A value out of range, an unknown option or command: one line naming it and where
    the help is, exit 2 (like every other bad input), not click's usage block."""
    code, out, err = run_cli(*args)
    assert code == 2 and not out.strip()
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and words in line and "--help" in line


def test_top_k_zero_is_no_cap_as_in_the_configuration(small_sim, tmp_path: Path,
                                                      run_cli) -> None:
    """`--top-k 0` means no cap (MatchingConfig's 0); the record says so."""
    _, files = small_sim
    out = tmp_path / "out"
    code, _, err = run_cli("segment", files["tomo.mrc"], "--points", files["prompt.csv"],
                           "--encoder", "filterbank", "--segmenter", "threshold", "--device",
                           "cpu", "--top-k", "0", "--out", out, "-q")
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["parameters"]["matching"]["top_k"] == 0


def test_global_quiet_silences_the_command_and_cryosams_log(small_sim, tmp_path: Path,
                                                            run_cli) -> None:
    """`cryosam -q segment ...` (as `cryosam --help` lists -q) prints nothing, like
    `segment -q`, and keeps cryosam's INFO log lines off a terminal another library set
    up for logging."""
    import logging

    _, files = small_sim
    args = [files["tomo.mrc"], "--points", files["prompt.csv"], "--no-match", "--segmenter",
            "threshold", "--device", "cpu"]
    code, out, err = run_cli("segment", *args, "--out", tmp_path / "loud")
    assert code == 0 and "click(s)" in out
    code, out, err = run_cli("-q", "segment", *args, "--out", tmp_path / "quiet")
    assert code == 0 and not out.strip(), out
    assert not logging.getLogger("cryosam.features.extract").isEnabledFor(logging.INFO)
    code, out, _ = run_cli("segment", *args, "--out", tmp_path / "loud2")  # reset per run
    assert "click(s)" in out
    assert logging.getLogger("cryosam").level == logging.NOTSET


@pytest.mark.parametrize("preset", ["default", "crowded"])
def test_bench_accuracy_measures_the_backends_it_is_given(preset: str, run_cli, tmp_path,
                                                          monkeypatch) -> None:
    """--encoder dinov2 --segmenter sam reach the models (here: their missing weights, one
    line naming them), so a machine with the weights measures the paper's models."""
    monkeypatch.setenv("CRYOSAM_CHECKPOINTS", str(tmp_path / "none"))
    code, out, err = run_cli("bench", "accuracy", "--preset", preset, "--seeds", "0",
                             "--shape", "32,64,64", "--encoder", "dinov2", "--segmenter", "sam")
    assert code == 2 and "encoder dinov2, segmenter sam" in out
    assert "weights not on this machine: sam_vit_h, dinov2" in err
