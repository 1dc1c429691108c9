"""Windows of consecutive states from field trajectories stored in HDF5 (e.g. Kolmogorov flow).

A file holds dataset ``x`` of shape (N, T, C, H, W): N trajectories of T states with C channels
(C = 2 velocity components for the Kolmogorov data). The score network of the sda experiment
sees ``window`` consecutive states at a time, so every run of ``window`` states of every
trajectory is one sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from difftrain.errors import ConfigError


class TrajectoryDataset(Dataset):
    """Every run of ``window`` consecutive states of every trajectory in an HDF5 file.

    The whole ``x`` dataset is read into memory once: these files are small (the paper's
    train split is ~1.7 GB at most, the quickstart's a few MB) and random windows from disk
    would cost a read per sample.

    Item ``i`` is trajectory ``i // (T - window + 1)`` starting at state ``i % (T - window + 1)``:
    a float32 tensor (window * C, H, W) if ``flatten`` (states stacked along channels, the score
    network's input layout) else (window, C, H, W).

    Raises:
        ConfigError: the file is missing or unreadable, has no ``x`` of 5 dims, or ``window``
            is not between 1 and T.
    """

    def __init__(self, path: str | Path, window: int, *, flatten: bool = True) -> None:
        import h5py

        self.path = Path(path)
        self.window = window
        self.flatten = flatten
        if not self.path.is_file():
            raise ConfigError(
                f"trajectory file {self.path} does not exist; generate it with "
                "`python -m difftrain.data.kolmogorov --out <folder>` or fix the data path."
            )
        try:
            with h5py.File(self.path, "r") as handle:
                if "x" not in handle:
                    raise ConfigError(
                        f"trajectory file {self.path} has no dataset 'x' (found: {sorted(handle.keys())}); "
                        "it must hold x of shape (N, T, C, H, W)."
                    )
                array = np.asarray(handle["x"][...], dtype=np.float32)
        except OSError as error:
            raise ConfigError(f"trajectory file {self.path} is not a readable HDF5 file: {error}") from None
        if array.ndim != 5:
            raise ConfigError(
                f"dataset 'x' in {self.path} has shape {array.shape}; expected 5 dims (N, T, C, H, W)."
            )
        num_trajectories, num_states = array.shape[:2]
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= num_states:
            raise ConfigError(
                f"window={window!r} does not fit trajectories of {num_states} states in {self.path}; "
                f"use a window between 1 and {num_states}."
            )
        if num_trajectories == 0:
            raise ConfigError(f"dataset 'x' in {self.path} holds no trajectories; regenerate it with more.")
        self.trajectories = torch.from_numpy(array)
        self.windows_per_trajectory = num_states - window + 1

    def __len__(self) -> int:
        return self.trajectories.shape[0] * self.windows_per_trajectory

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.batch([index])[0]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """The windows ``indices`` (negative ones count from the end), stacked in one gather:
        (B, window*C, H, W), or (B, window, C, H, W) unflattened. One copy instead of B clones and
        a stack (bench/RESULTS.md); a copy, so a caller editing it cannot corrupt the shared array."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if index.numel() and not bool(((index >= -len(self)) & (index < len(self))).all()):
            raise IndexError(f"an index in {list(indices)} is out of range for {len(self)} windows")
        wrapped = index % len(self)
        trajectory, start = wrapped // self.windows_per_trajectory, wrapped % self.windows_per_trajectory
        steps = start[:, None] + torch.arange(self.window)
        states = self.trajectories[trajectory[:, None], steps]  # advanced indexing copies
        return states.flatten(1, 2) if self.flatten else states
