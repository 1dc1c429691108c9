"""TrajectoryDataset: windows of consecutive states from an h5 file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from difftrain.data.fields import TrajectoryDataset
from difftrain.errors import ConfigError


@pytest.fixture
def trajectory_file(tmp_path):
    """3 trajectories x 5 states x 2 channels x 4 x 6, every value encoding its position."""
    n, t, c, h, w = np.indices((3, 5, 2, 4, 6))
    x = (1000 * n + 100 * t + 10 * c + h + 0.01 * w).astype(np.float32)
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as handle:
        handle["x"] = x
    return path, x


def test_every_window_of_every_trajectory(trajectory_file):
    path, x = trajectory_file
    dataset = TrajectoryDataset(path, window=3)
    assert len(dataset) == 3 * (5 - 3 + 1)
    assert dataset[0].shape == (3 * 2, 4, 6)  # a window's states stacked on the channels
    windows = {tuple(dataset[i][::2, 0, 0].tolist()) for i in range(len(dataset))}
    expected = {tuple(x[n, s : s + 3, 0, 0, 0].tolist()) for n in range(3) for s in range(3)}
    assert windows == expected


def test_item_layout_flattened_and_not(trajectory_file):
    path, x = trajectory_file
    flat = TrajectoryDataset(path, window=2)[4]  # trajectory 1, start 0 (4 windows each)
    stacked = TrajectoryDataset(path, window=2, flatten=False)[4]
    assert flat.shape == (4, 4, 6) and flat.dtype == torch.float32
    assert stacked.shape == (2, 2, 4, 6)
    np.testing.assert_array_equal(stacked.numpy(), x[1, 0:2])
    # Flattening stacks states along channels: (state 0: u, v, state 1: u, v).
    np.testing.assert_array_equal(flat.numpy(), x[1, 0:2].reshape(4, 4, 6))


def test_samples_are_copies(trajectory_file):
    path, x = trajectory_file
    dataset = TrajectoryDataset(path, window=2)
    dataset[0].zero_()
    np.testing.assert_array_equal(dataset[0].numpy(), x[0, 0:2].reshape(4, 4, 6))


@pytest.mark.parametrize("flatten", [True, False])
def test_batch_is_the_stack_of_items_and_a_copy(trajectory_file, flatten):
    path, x = trajectory_file
    dataset = TrajectoryDataset(path, window=3, flatten=flatten)
    indices = [8, 0, 4, 4, -1, 5]
    batch = dataset.batch(indices)
    assert torch.equal(batch, torch.stack([dataset[i] for i in indices]))
    # Against the file itself: 3 windows per trajectory, index 8 is trajectory 2 from state 2.
    stacked = batch if not flatten else batch.reshape(len(indices), 3, 2, 4, 6)
    np.testing.assert_array_equal(stacked[0].numpy(), x[2, 2:5])
    np.testing.assert_array_equal(stacked[4].numpy(), x[2, 2:5])  # -1 is the last window too
    np.testing.assert_array_equal(stacked[2].numpy(), x[1, 1:4])
    batch.zero_()
    assert torch.equal(dataset.batch([0])[0], dataset[0]) and dataset[0].abs().sum() > 0
    with pytest.raises(IndexError):
        dataset.batch([0, len(dataset)])


def test_window_equal_to_length_and_index_bounds(trajectory_file):
    path, _ = trajectory_file
    dataset = TrajectoryDataset(path, window=5)
    assert len(dataset) == 3
    torch.testing.assert_close(dataset[-1], dataset[2])
    with pytest.raises(IndexError):
        dataset[3]


def test_batches_through_a_dataloader(trajectory_file):
    path, _ = trajectory_file
    batch = next(iter(DataLoader(TrajectoryDataset(path, window=3), batch_size=4, shuffle=True)))
    assert batch.shape == (4, 6, 4, 6)


@pytest.mark.parametrize("window", [0, 6, 2.5])
def test_window_that_does_not_fit_is_a_config_error(trajectory_file, window):
    path, _ = trajectory_file
    with pytest.raises(ConfigError, match="window"):
        TrajectoryDataset(path, window=window)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*kolmogorov"):
        TrajectoryDataset(tmp_path / "nope.h5", window=2)


def test_missing_x_dataset_is_a_config_error(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle["y"] = np.zeros((1, 2, 2, 4, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match="no dataset 'x'.*'y'"):
        TrajectoryDataset(path, window=2)


def test_not_hdf5_and_wrong_rank_are_config_errors(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(ConfigError, match="not a readable HDF5"):
        TrajectoryDataset(text, window=1)
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as handle:
        handle["x"] = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match="5 dims"):
        TrajectoryDataset(flat, window=1)
