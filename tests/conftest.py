"""Shared test fixtures: deterministic seeds, two CPU threads, and the official parity fixtures.

The parity fixtures live beside the repository, in `<repo>/../shared/fixtures`; tests that need
them are skipped, with the reason, when that directory is absent.
"""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = (REPO_ROOT / ".." / "shared" / "fixtures").resolve()
SEED = 0

torch.set_num_threads(2)


def fixture_files(pattern: str):
    """Sorted parity fixture files matching a glob pattern (empty if the directory is absent)."""
    return sorted(FIXTURES_DIR.glob(pattern)) if FIXTURES_DIR.is_dir() else []


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(SEED)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (thread start-up costs more than it saves there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"parity fixtures not found at {FIXTURES_DIR} (expected <repo>/../shared/fixtures)")
    return FIXTURES_DIR


def pytest_generate_tests(metafunc):
    """`illama_fixture_path`: one test per official iLLaMA parity fixture file."""
    if "illama_fixture_path" in metafunc.fixturenames:
        paths = fixture_files("illama_*.pt")
        if paths:
            params = [pytest.param(p, id=p.stem) for p in paths]
        else:
            params = [pytest.param(None, id="no-fixtures", marks=pytest.mark.skip(
                reason=f"no illama_*.pt parity fixtures in {FIXTURES_DIR} (expected <repo>/../shared/fixtures)"))]
        metafunc.parametrize("illama_fixture_path", params)


@pytest.fixture(scope="session")
def tiny_fm_run(tmp_path_factory) -> str:
    """One epoch of a tiny iLLaMA (patch 7, D 32, depth 2) on the first 256 Fashion-MNIST training images: a real
    classifier run directory for the tests of commands that read one (shape bias, shipped-weight releases)."""
    from llamavit.cli import main
    out = str(tmp_path_factory.mktemp("fm") / "illama")
    assert main(["train", "--model", "illama_tiny_patch16_224", "--model-kwargs", "patch_size=7", "embed_dim=32",
                 "depth=2", "num_heads=2", "--img-size", "28", "--in-chans", "1", "--data", "fashion_mnist",
                 "--train-subset", "256", "--val-subset", "32", "--batch-size", "32", "--epochs", "1",
                 "--no-progress", "--output", out]) == 0
    return out
