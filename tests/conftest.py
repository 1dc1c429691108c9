"""Test-wide settings: offline, CPU, quiet; and the tiny Stable Diffusion fixtures."""

import os

# Before anything imports huggingface_hub or wandb: nothing in a test may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from tests.sd_fixtures import tiny_sd15, tiny_sd2v, tiny_sdxl  # noqa: E402,F401  (pytest fixtures)
