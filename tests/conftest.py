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
    from mllmfl_dist.standins.build import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


# -- real launches: a local Slurm and torchrun references (tests/launchers.py) ----------------------------
_SLURM_REPORT: list[str] = []


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A Slurm cluster on this host (launch/local_slurm.sh) for the session; the test is skipped, with the
    reason, where it cannot start (not root, packages missing)."""
    from launchers import LocalSlurm, SlurmUnavailable

    try:
        slurm = LocalSlurm.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as err:
        _SLURM_REPORT.append(f"local Slurm unavailable: {err}")
        pytest.skip(f"no local Slurm: {err}")
    _SLURM_REPORT.append(
        f"local Slurm: nodes {' '.join(slurm.nodes)} idle {slurm.startup_seconds:.1f} s "
        f"after launch/local_slurm.sh start"
    )
    yield slurm
    slurm.stop()


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory):
    """``reference(nproc, *overrides)``: the final model of ``torchrun --standalone --nproc_per_node N -m
    mllmfl_dist federate configs/smoke.toml --set ...``, run once per session and argument list."""
    from launchers import final_model, torchrun

    cache: dict = {}

    def reference(nproc: int, *overrides: str):
        key = (nproc, overrides)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"reference{nproc}")
            result = torchrun(nproc, root, *overrides)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[key] = final_model(root)
        return cache[key]

    return reference


def pytest_terminal_summary(terminalreporter):
    for line in _SLURM_REPORT:
        terminalreporter.write_line(line)


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
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up (needs root and mount rights): {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="session")
def miniatures(tmp_path_factory) -> dict:
    """The shape-faithful miniatures (mllmfl_dist/standins/miniature.py): llava-1.5-7b-hf's geometry and
    open_clip ViT-B-32's at toy width and depth, built once per test session."""
    from mllmfl_dist.standins.miniature import build_llava15_miniature, build_vitb32_miniature

    root = tmp_path_factory.mktemp("miniatures")
    return {"llava": build_llava15_miniature(root / "llava"), "clip": build_vitb32_miniature(root / "clip")}
