import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture
def repo() -> Path:
    return REPO


def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """The tiny random LLaVA and open_clip models, built once per test session and loaded by every
    test through the real from_pretrained / create_model path."""
    from mllmfl_dist.models.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a real tmpfs of ``size`` (e.g. "256k") mounted in tmp_path, to run out of space
    on; unmounted (lazily, so even a file left open cannot keep it) at the end. Skips where mounting is not
    permitted (it needs root and mount rights)."""
    import subprocess

    mounts = []

    def mount(size: str):
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up (needs root and mount rights): {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)
