"""``cryosam bench pipeline``: recording a weight-free run's workload and replaying it with
real DINOv2 and SAM code (tiny random models here; the paper's on a GPU)."""

from __future__ import annotations

import json

import pytest

from cryosam.benchmarks.workload import STAGES, Workload

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory):
    """A workload recorded by a weight-free run on a small simulated tomogram."""
    from cryosam.benchmarks.workload import record

    path = tmp_path_factory.mktemp("workload") / "workload.json"
    workload, rec = record((32, 64, 64), seed=0, echo=lambda _: None)
    workload.save(path)
    return path, workload, rec


def test_the_workload_is_what_the_run_asked_for(recorded) -> None:
    path, workload, rec = recorded
    back = Workload.load(path)
    assert back.shape == (32, 64, 64) and back.summary() == workload.summary()
    propagation = rec["propagation"]
    for stage, key in zip(STAGES, ("prompts", "proposals"), strict=True):
        assert back.prompts(stage) == propagation[key]["prompts"]
        visited = back.slices(stage)
        assert {a: len(v) for a, v in visited.items()} == propagation[key]["slices_visited"]
    summary = back.summary()
    assert summary["encoder_slices"] == {"z": 32, "y": 64, "x": 64}
    assert summary["proposals"] == rec["counts"]["proposals"] > 0
    assert [lv["ratio"] for lv in summary["matching_levels"]] == [
        lv["ratio"] for lv in rec["matching"]["stats"]["levels"]]


def test_replay_with_tiny_models_writes_the_figures(recorded, tmp_path, run_cli) -> None:
    path, workload, _ = recorded
    small = Workload.load(path)  # a few calls of each stage keep the test quick
    small.calls = {stage: calls[:3] for stage, calls in small.calls.items()}
    small.save(tmp_path / "small.json")
    out = tmp_path / "figures.json"
    code, stdout, err = run_cli("bench", "pipeline", "--models", "tiny", "--workload",
                                tmp_path / "small.json", "--shape", "32,64,64",
                                "--device", "cpu", "--json", out)
    assert code == 0, err
    assert "second query on the cached tomogram" in stdout and "DINOv2 slices/s" in stdout
    fig = json.loads(out.read_text())
    assert set(fig["stages_seconds"]) == {"features", "matching", *STAGES}
    assert fig["total_seconds"] > 0 and fig["peak_memory_bytes"] > 0
    assert set(fig["dinov2_slices_per_s"]) == {"z", "y", "x"}
    distinct = sum(len(v) for v in small.slices().values())
    assert fig["sam_encoder_slices"] == distinct
    assert fig["prompts"] == small.prompts()
    assert fig["sam_decoder_calls"] >= len(small.calls["segment_proposals"])
    assert fig["workload"]["shape_zyx"] == [32, 64, 64]
    second = fig["second_query"]
    assert set(second["stages_seconds"]) == {"features", "matching", *STAGES}
    assert second["sam_encoder_slices"] == 0  # same voxels: the slice embeddings are kept
    assert second["sam_encoder_seconds"] == 0.0  # so no encoding time either (own clock)
    assert fig["sam_encoder_seconds"] > 0 and fig["sam_cache_evictions"] == 0
    assert "SAM embedding cache: budget" in stdout


def test_replay_refuses_a_wrong_shape_or_file(recorded, tmp_path, run_cli) -> None:
    path, _, _ = recorded
    code, _, err = run_cli("bench", "pipeline", "--models", "tiny", "--workload", path,
                           "--shape", "200,512,512", "--device", "cpu")
    assert code == 2 and "recorded on 32,64,64" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = run_cli("bench", "pipeline", "--models", "tiny", "--workload", bad,
                           "--device", "cpu")
    assert code == 2 and "not a cryosam workload" in err
    code, _, err = run_cli("bench", "pipeline", "--models", "paper", "--record-workload",
                           tmp_path / "w.json")
    assert code == 2 and "weight-free" in err
