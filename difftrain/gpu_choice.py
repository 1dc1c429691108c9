"""EveryDream2's gpuid: which CUDA device a single-process run trains on.

EveryDream2 trains on `cuda:<gpuid>`, an index among the GPUs CUDA shows (so among those that
CUDA_VISIBLE_DEVICES lists, when it is set). Here the front door narrows CUDA_VISIBLE_DEVICES to
that one GPU before CUDA starts, so accelerate, every tensor and every child process of the run use
it as cuda:0. Under a multi-process launch each process already has its own GPU; a gpuid there is a
ConfigError that says how to choose GPUs for such a launch.
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

from difftrain.errors import ConfigError

VISIBLE = "CUDA_VISIBLE_DEVICES"


def gpu_environment(gpu_id: int, environ: Mapping[str, str], gpu_count: int) -> tuple[dict[str, str], str]:
    """(environment variables to set, a note to print or "") for training on CUDA device `gpu_id`.

    `gpu_count`: the GPUs this machine shows before the choice (0 without CUDA). Pure: the caller
    applies the result (`choose_gpu`).
    """
    if gpu_id == 0:
        return {}, ""  # the first visible GPU: what a single process uses anyway
    processes = max(int(environ.get("WORLD_SIZE") or 1), int(environ.get("LOCAL_WORLD_SIZE") or 1))
    if processes > 1:
        raise ConfigError(f"gpuid {gpu_id} picks the GPU of a single-process run, but this is a launch of "
                          f"{processes} processes, each on its own GPU. Choose those GPUs with accelerate "
                          "launch --gpu_ids 1,2 (or CUDA_VISIBLE_DEVICES=1,2) and leave gpuid at 0.")
    if gpu_count == 0:
        return {}, f"note: gpuid {gpu_id}: this machine shows no CUDA GPU, so training runs on the CPU."
    visible = [entry.strip() for entry in environ[VISIBLE].split(",")] if environ.get(VISIBLE, "").strip() \
        else [str(index) for index in range(gpu_count)]
    if gpu_id >= len(visible):
        shown = f"{VISIBLE}={environ[VISIBLE]!r} shows" if VISIBLE in environ else "this machine has"
        raise ConfigError(f"gpuid {gpu_id}: {shown} {len(visible)} GPU(s), numbered 0 to {len(visible) - 1}; "
                          "choose one of those.")
    where = f" (entry {gpu_id} of {VISIBLE}={environ[VISIBLE]!r})" if VISIBLE in environ else ""
    return {VISIBLE: visible[gpu_id]}, f"note: gpuid {gpu_id}: training on GPU {visible[gpu_id]}{where}."


def visible_gpu_count() -> int:
    """How many CUDA GPUs are visible, without starting CUDA (torch counts them through NVML, so
    CUDA_VISIBLE_DEVICES may still change afterwards)."""
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    return max(torch.cuda.device_count(), 0)


def choose_gpu(gpu_id: int, environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Apply gpuid to this process's environment, before anything starts CUDA; returns the note."""
    environ = os.environ if environ is None else environ
    if gpu_id == 0:
        return ""
    changes, note = gpu_environment(gpu_id, environ, visible_gpu_count())
    environ.update(changes)
    return note
