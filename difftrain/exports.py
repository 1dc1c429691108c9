"""Files written beside each checkpoint for the programs users come from.

EveryDream2 users look for `<checkpoint>_ema` (a model folder holding the EMA weights) next to
each checkpoint, and for `<checkpoint>.safetensors` (and `<checkpoint>_ema.safetensors`), the
single file A1111 and ComfyUI load, in `save_ckpt_dir`: float16 unless save_full_precision. The
single file is converted from the diffusers folder just saved, as EveryDream2 converts its own, so
the trainer needs to know nothing about model families. Main process only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from difftrain.log import say


def export_beside_checkpoint(config: Any, checkpoint_folder: Optional[Path], ema: Any,
                             write_model: Callable[[Any, Path], None]) -> list[Path]:
    """The EMA folder (when `ema` is not None) and the single files of a saved checkpoint; returns
    what was written."""
    if checkpoint_folder is None:
        return []
    folders = [checkpoint_folder]
    if ema is not None:
        folders.append(ema.export_beside(checkpoint_folder, write_model))
    written = folders[1:]
    if config.save_ckpt_dir and not config.no_save_ckpt:
        for folder in folders:
            target = Path(config.save_ckpt_dir).expanduser() / f"{folder.name}.safetensors"
            if write_single_file(folder, target, config.save_full_precision):
                written.append(target)
    return written


def write_single_file(folder: Path, target: Path, full_precision: bool) -> bool:
    """`folder` (a diffusers Stable Diffusion folder) as one A1111-layout file; False (and a note)
    when the folder holds no such model (a LoRA checkpoint, a Kolmogorov network)."""
    if not (folder / "model_index.json").is_file():
        say(f"note: save_ckpt_dir: '{folder.name}' is not a Stable Diffusion model folder, so no single "
            "file is written for it (LoRA runs write their own .safetensors file).")
        return False
    import torch

    from difftrain.models.sd import export_single_file, load_sd

    if target.exists():
        return False  # a file of that name is the user's: never overwritten
    target.parent.mkdir(parents=True, exist_ok=True)
    export_single_file(load_sd(folder), target, dtype=None if full_precision else torch.float16)
    say(f"single file: {target}")
    return True
