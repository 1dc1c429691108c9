"""The safetensors metadata with which a single-file Stable Diffusion checkpoint describes itself.

Written by `difftrain.models.sd.export_single_file` (and the tiny stand-ins of `difftrain.tiny`),
read back by `difftrain.models.sd` so that such a file loads with no network and no guessing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

# Key in the safetensors metadata holding the JSON description written by
# ``checkpoint_metadata``; ``difftrain.models.sd`` reads it back.
EMBEDDED_CONFIG_KEY = "difftrain.sd_components"


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The text files ``tokenizer.save_pretrained`` writes, as {file name: contents}."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(Path(folder).iterdir()) if path.is_file()}


def checkpoint_metadata(
    family: str,
    prediction_type: str,
    configs: dict[str, dict[str, Any]],
    tokenizers: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Safetensors metadata that lets a single file describe itself.

    Args:
        family: 'sd1' | 'sd2' | 'sdxl'.
        prediction_type: 'epsilon' | 'v_prediction'.
        configs: diffusers configs by component name ('unet', 'vae', 'text_encoder',
            ['text_encoder_2'], 'scheduler'), JSON-serialisable.
        tokenizers: tokenizer objects by component name ('tokenizer'[, 'tokenizer_2']);
            their files are embedded so that loading needs no download.
    """
    description = {
        "format": 1,
        "family": family,
        "prediction_type": prediction_type,
        "configs": configs,
        "tokenizers": {name: tokenizer_files(tok) for name, tok in (tokenizers or {}).items()},
    }
    return {
        EMBEDDED_CONFIG_KEY: json.dumps(description, sort_keys=True),
        # Plain keys that other tools (A1111's metadata viewer, ComfyUI) show as-is.
        "modelspec.architecture": {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}[family],
        "modelspec.prediction_type": prediction_type,
    }
