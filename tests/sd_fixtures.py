"""Session-scoped tiny Stable Diffusion stand-ins for tests (import these fixtures in conftest.py).

Each fixture returns the diffusers folder of a stand-in made once per test session; the
A1111-layout single file lies beside it (``difftrain.tiny.single_file_path(folder)``).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _make(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    from difftrain.tiny import make_tiny

    return make_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}") / family, seed=0)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny SD1.5-like model (epsilon); ``<folder>.safetensors`` beside it."""
    return _make(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny SD2.x-768-like model (v-prediction); ``<folder>.safetensors`` beside it."""
    return _make(tmp_path_factory, "sd2-v")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny SDXL-like model (two text encoders, text_time); ``<folder>.safetensors`` beside it."""
    return _make(tmp_path_factory, "sdxl")
