"""Shared fixtures: the interop files beside the repository, and a small CLI runner."""

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
