"""Shared test fixtures: f32 matmuls, quiet torch threads, and the DAVIS-2016 subset."""

import os
import pathlib

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare against torch in f32; XLA's default CPU matmul precision is already f32, but make it explicit.
jax.config.update("jax_default_matmul_precision", "float32")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DAVIS_ROOT = REPO_ROOT.parent / "shared" / "data" / "davis2016"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def davis_root() -> pathlib.Path:
    """The shared DAVIS-2016 subset; skipped where absent (a user's clone), an error under CI."""
    if not (DAVIS_ROOT / "JPEGImages" / "480p").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the DAVIS-2016 subset is missing at {DAVIS_ROOT}")
        pytest.skip(f"DAVIS-2016 subset not found at {DAVIS_ROOT}")
    return DAVIS_ROOT
