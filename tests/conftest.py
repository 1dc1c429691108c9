"""Test-wide settings: offline, CPU, quiet; and the tiny Stable Diffusion fixtures."""

import os

# Before anything imports huggingface_hub or wandb: nothing in a test may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

from tests.sd_fixtures import tiny_sd15, tiny_sd2v, tiny_sdxl  # noqa: E402,F401  (pytest fixtures)


@pytest.fixture
def one_thread():
    """Torch single-threaded for the test: the tiny models run several times faster on one thread
    than with intra-op threads fighting other processes on shared cores (and like the child
    processes the tests start)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
