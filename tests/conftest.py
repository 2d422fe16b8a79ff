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
