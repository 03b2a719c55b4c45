"""Shared fixtures: the interop files beside the repository, a CLI runner, a small simulated
tomogram on disk, and tiny real models (random weights, the pipeline's own classes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def interop_dir() -> Path:
    """``../shared/interop`` (real files written by other tools); skip when it is absent."""
    path = SHARED / "interop"
    if not path.is_dir():
        pytest.skip("../shared/interop is not beside this checkout")
    return path


@pytest.fixture()
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run ``cryosam ARGS`` in-process; return (exit code, stdout, stderr)."""
    from cryosam.cli import main

    def _run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared 2-core machine: one intra-op torch thread is faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def weight_free():
    """The weight-free backends on the CPU: what runs end to end without any download."""
    from cryosam.config import CryosamConfig, EncoderConfig, SegmenterConfig

    return CryosamConfig(encoder=EncoderConfig(name="filterbank"),
                         segmenter=SegmenterConfig(name="threshold"), device="cpu")


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory: pytest.TempPathFactory):
    """A 40x96x112 simulated tomogram (seed 3) and its files (tomo.mrc, prompt.csv, ...)."""
    from cryosam.simulate import SimulationConfig, simulate, write_simulation

    sim = simulate(SimulationConfig(shape=(40, 96, 112), seed=3))
    files = write_simulation(sim, tmp_path_factory.mktemp("sim"))
    return sim, files


@pytest.fixture(scope="session")
def tiny_sam_model():
    """segment-anything's Sam at 256 px input, random weights (the real code path)."""
    from cryosam.testing import tiny_sam

    return tiny_sam(img_size=256, seed=1)


@pytest.fixture(scope="session")
def tiny_dinov2_model():
    """transformers' DINOv2 with registers, one layer, 16 channels, random weights."""
    from cryosam.testing import tiny_dinov2

    return tiny_dinov2(registers=True)
