"""Reflow: pair shards (write, resume, read), straightness metrics, stage arithmetic, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difftrain.errors import ConfigError
from difftrain.objectives import RectifiedFlowObjective, randn
from difftrain.reflow import (
    ReflowPairDataset,
    ReflowSchedule,
    generate_reflow_pairs,
    probe_flow,
)
from difftrain.sampling import sample_flow_euler


def straight_flow_to(target):
    """Exact velocity when the data is always ``target`` (B, ...) or broadcastable: straight lines."""
    return lambda z, s, **cond: (z - target) / s.reshape(-1, *([1] * (z.ndim - 1)))


def curved_flow(z, s, **cond):
    """A velocity that turns with time, so paths bend."""
    turn = torch.stack([torch.cos(3 * s), torch.sin(3 * s)], dim=1)
    return 2.0 * turn + 0.0 * z


class CountingVelocity:
    """Straight flow into ``cond['target']``, counting calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, z, s, target, meta):
        self.calls += 1
        return (z - target) / s.reshape(-1, 1, 1)


def batches(count: int, batch_size: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    noise = [randn((batch_size, 2, 4), generator) for _ in range(count)]
    conds = [
        {"target": torch.full((batch_size, 2, 4), float(index)), "meta": {"label": torch.arange(batch_size) + 10 * index}}
        for index in range(count)
    ]
    return noise, conds


def test_straightness_is_zero_for_a_straight_flow_and_positive_for_a_curved_one():
    z = randn((16, 2), torch.Generator().manual_seed(0))
    assert probe_flow(straight_flow_to(torch.tensor([1.0, -2.0])), z, 10).straightness < 1e-10
    curved = probe_flow(curved_flow, z, 10).straightness
    assert curved > 0.5
    # The velocities visit cos/sin(3s) for s in {1, 0.9, ..., 0.1}: S is their variance times 4.
    times = torch.linspace(1.0, 0.1, 10)
    turn = 2.0 * torch.stack([torch.cos(3 * times), torch.sin(3 * times)], dim=1)
    expected = ((turn - turn.mean(dim=0)) ** 2).mean().item()
    assert curved == pytest.approx(expected, rel=1e-4)


def test_one_step_distance_is_zero_only_for_straight_flows():
    z = randn((16, 2), torch.Generator().manual_seed(0))
    assert probe_flow(straight_flow_to(torch.tensor([1.0, -2.0])), z, 8).distance < 1e-10
    assert probe_flow(curved_flow, z, 8).distance > 0.1


def test_one_probe_evaluates_the_model_once_per_step_and_once_more_for_the_one_step_sample():
    noise, conds = batches(1)
    velocity = CountingVelocity()
    probe = probe_flow(velocity, noise[0], 6, cond=conds[0])
    assert velocity.calls == 6 + 1
    # Straight flow into the target: both samples land on it.
    assert torch.allclose(probe.many_steps, conds[0]["target"], atol=1e-5)
    assert torch.allclose(probe.one_step, conds[0]["target"], atol=1e-5)


def test_pairs_are_written_read_back_and_resumed_without_regeneration(tmp_path):
    noise, conds = batches(3)
    velocity = CountingVelocity()
    report = generate_reflow_pairs(velocity, noise, 4, conds, tmp_path)
    assert velocity.calls == 12
    assert (report.generated_shards, report.skipped_shards, report.num_pairs) == (3, 0, 9)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["sample_steps"] == 4 and len(manifest["shards"]) == 3
    assert not [path for path in tmp_path.iterdir() if ".tmp" in path.name]

    dataset = ReflowPairDataset(tmp_path)
    assert len(dataset) == 9 and dataset.sample_steps == 4
    item = dataset[4]  # shard 1, row 1
    assert torch.equal(item["noise"], noise[1][1])
    expected_endpoint = sample_flow_euler(lambda z, s: velocity(z, s, **conds[1]), noise[1], 4)[1]
    assert torch.allclose(item["x0"], expected_endpoint)
    assert torch.allclose(item["x0"], torch.full((2, 4), 1.0), atol=1e-5)  # the flow's target
    assert item["cond"]["meta"]["label"].item() == 11
    assert torch.equal(dataset[-1]["noise"], noise[2][2])
    with pytest.raises(IndexError):
        dataset[9]

    calls_before = velocity.calls
    again = generate_reflow_pairs(velocity, noise, 4, conds, tmp_path)
    assert velocity.calls == calls_before and (again.generated_shards, again.skipped_shards) == (0, 3)

    (tmp_path / "pairs-00001.safetensors").unlink()
    (tmp_path / "pairs-00002.safetensors").write_bytes(b"half a file")
    third = generate_reflow_pairs(velocity, noise, 4, conds, tmp_path)
    assert velocity.calls == calls_before + 8 and (third.generated_shards, third.skipped_shards) == (2, 1)
    assert torch.equal(ReflowPairDataset(tmp_path)[4]["x0"], item["x0"])


def test_interrupted_generation_is_refused_then_finished(tmp_path):
    noise, conds = batches(3)
    velocity = CountingVelocity()

    def crashing_noise():
        yield noise[0]
        yield noise[1]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_reflow_pairs(velocity, crashing_noise(), 2, conds, tmp_path)
    assert velocity.calls == 4
    with pytest.raises(ConfigError, match="interrupted"):
        ReflowPairDataset(tmp_path)
    assert len(ReflowPairDataset(tmp_path, require_complete=False)) == 6
    report = generate_reflow_pairs(velocity, noise, 2, conds, tmp_path)
    assert velocity.calls == 6 and report.skipped_shards == 2 and len(ReflowPairDataset(tmp_path)) == 9


def test_changed_noise_regenerates_its_shard(tmp_path):
    noise, conds = batches(2)
    velocity = CountingVelocity()
    generate_reflow_pairs(velocity, noise, 2, conds, tmp_path)
    other_noise, _ = batches(2, seed=1)
    report = generate_reflow_pairs(velocity, [noise[0], other_noise[1]], 2, conds, tmp_path)
    assert (report.generated_shards, report.skipped_shards) == (1, 1)
    assert torch.equal(ReflowPairDataset(tmp_path)[3]["noise"], other_noise[1][0])


def test_pairs_from_other_settings_are_refused(tmp_path):
    noise, conds = batches(1)
    generate_reflow_pairs(CountingVelocity(), noise, 2, conds, tmp_path)
    with pytest.raises(ConfigError, match="delete that folder"):
        generate_reflow_pairs(CountingVelocity(), noise, 3, conds, tmp_path)


def test_short_cond_batches_are_reported(tmp_path):
    noise, conds = batches(2)
    with pytest.raises(ValueError, match="cond_batches ran out at batch 1"):
        generate_reflow_pairs(CountingVelocity(), noise, 2, conds[:1], tmp_path)


def test_missing_pairs_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="manifest.json"):
        ReflowPairDataset(tmp_path)


def test_unconditional_pairs_and_dataloader_collation(tmp_path):
    generator = torch.Generator().manual_seed(0)
    noise = [randn((2, 3), generator) for _ in range(2)]
    generate_reflow_pairs(straight_flow_to(torch.ones(3)), noise, 3, None, tmp_path, storage_dtype=torch.float16)
    dataset = ReflowPairDataset(tmp_path)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["x0"].shape == (4, 3) and batch["x0"].dtype == torch.float16 and batch["cond"] == {}
    assert torch.allclose(batch["x0"].float(), torch.ones(4, 3), atol=1e-2)


# ---------------------------------------------------------------- schedule


def test_schedule_stage_arithmetic():
    schedule = ReflowSchedule(max_epochs=3, reflow_steps=2, reflow_train_epochs=2, reflow_gen_batches=10, batch_size=2)
    assert schedule.total_epochs == 7 and schedule.num_stages == 3 and schedule.samples_per_iteration == 20
    positions = [schedule.position(epoch) for epoch in range(7)]
    assert [(p.stage, p.epoch_in_stage) for p in positions] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [p.needs_new_pairs for p in positions] == [False, False, False, True, False, True, False]
    assert positions[4].stage_start_epoch == 3 and positions[6].stage_start_epoch == 5
    with pytest.raises(ValueError):
        schedule.position(7)
    assert schedule.pairs_dir("/runs/x", 2).name == "reflow_stage_02"


def test_schedule_without_reflow_or_without_initial_epochs():
    assert ReflowSchedule(max_epochs=5).total_epochs == 5
    skip_initial = ReflowSchedule(max_epochs=0, reflow_steps=1, reflow_train_epochs=3)
    assert skip_initial.position(0).stage == 1 and skip_initial.position(0).needs_new_pairs


@pytest.mark.parametrize(("reflow_sample_steps", "sample_steps", "expected"), [(0, 0, 50), (0, 30, 30), (20, 30, 20)])
def test_simulation_steps_fall_back_as_documented(reflow_sample_steps, sample_steps, expected):
    schedule = ReflowSchedule(max_epochs=1, reflow_sample_steps=reflow_sample_steps, sample_steps=sample_steps)
    assert schedule.simulation_steps == expected


@pytest.mark.parametrize(
    "kwargs", [{"reflow_steps": 2, "reflow_train_epochs": 0}, {"reflow_steps": -1}, {"reflow_gen_batches": 0}]
)
def test_schedule_rejects_bad_flags(kwargs):
    with pytest.raises(ConfigError, match="--reflow"):
        ReflowSchedule(max_epochs=1, **kwargs)


# ---------------------------------------------------------------- end to end


class ToyVelocity(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2)
        )

    def forward(self, z, timestep):
        return self.net(torch.cat([z, timestep[:, None] / 1000.0], dim=1))


def two_clusters(count: int, generator: torch.Generator) -> torch.Tensor:
    """Two well-separated clusters: independent noise/data couplings cross, so paths curve."""
    sign = torch.randint(0, 2, (count, 1), generator=generator) * 2.0 - 1.0
    return torch.cat([3.0 * sign, torch.zeros(count, 1)], dim=1) + 0.3 * torch.randn(count, 2, generator=generator)


def train(model, batch_loss, iterations, generator):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(iterations):
        loss, _ = batch_loss(generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_one_reflow_iteration_straightens_a_toy_flow(tmp_path, one_thread):
    torch.manual_seed(0)  # only for the module's parameter initialisation
    generator = torch.Generator().manual_seed(0)
    objective = RectifiedFlowObjective()
    model = ToyVelocity()
    schedule = ReflowSchedule(max_epochs=1, reflow_steps=1, reflow_sample_steps=16, reflow_gen_batches=4, batch_size=128)

    train(model, lambda g: objective.loss(model, two_clusters(128, g), g), 150, generator)
    probe = randn((256, 2), torch.Generator().manual_seed(99))
    velocity_fn = objective.velocity_fn(model)
    measured = probe_flow(velocity_fn, probe, 16)
    before = (measured.straightness, measured.distance)

    noise = [randn((schedule.batch_size, 2), generator) for _ in range(schedule.reflow_gen_batches)]
    pairs_dir = schedule.pairs_dir(tmp_path, 1)
    generate_reflow_pairs(velocity_fn, noise, schedule.simulation_steps, None, pairs_dir)
    pairs = ReflowPairDataset(pairs_dir)
    assert len(pairs) == schedule.samples_per_iteration
    stacked = next(iter(torch.utils.data.DataLoader(pairs, batch_size=len(pairs))))

    def pair_loss(g):
        index = torch.randint(0, len(pairs), (128,), generator=g)
        flow_time = objective.sample_flow_time(128, g)
        return objective.flow_loss(model, stacked["x0"][index], stacked["noise"][index], flow_time)

    train(model, pair_loss, 150, generator)
    measured = probe_flow(velocity_fn, probe, 16)
    after = (measured.straightness, measured.distance)
    assert all(math.isfinite(value) for value in before + after)
    # Measured on three seeds: both drop to about a tenth; half leaves room for platform noise.
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] < 0.5 * before[1], (before, after)


def _length_settings(**changes):
    from types import SimpleNamespace

    settings = dict(batch_size=4, gradient_accumulation_steps=2, max_steps=0, max_epochs=3, rectified_flow=True,
                    reflow_steps=0, reflow_train_epochs=1, reflow_sample_steps=0, sample_steps=0, reflow_gen_batches=1)
    return SimpleNamespace(**{**settings, **changes})


@pytest.mark.parametrize("changes, processes, expected", [
    # 10 micro-batches of one process, 2 per optimizer step: 5 steps an epoch.
    ({}, 1, (5, 15, 15, 3)),
    # max_steps ends stage 0 inside its second epoch.
    ({"max_steps": 7}, 1, (5, 7, 7, 2)),
    # Each reflow epoch: 8 generated batches over 2 processes, 2 micro-batches a step = 2 steps.
    ({"reflow_steps": 2, "reflow_train_epochs": 3, "reflow_gen_batches": 8}, 2, (5, 15, 15 + 2 * 3 * 2, 3 + 2 * 3)),
    # Fewer generated batches than processes x accumulation still make one step an epoch.
    ({"reflow_steps": 1, "reflow_gen_batches": 1}, 2, (5, 15, 16, 4)),
])
def test_run_length_counts_stage_zero_then_the_reflow_stages(changes, processes, expected):
    from difftrain.reflow import run_length

    length = run_length(_length_settings(**changes), 10, processes)
    assert (length.steps_per_epoch, length.stage0_steps, length.total_steps, length.max_epochs) == expected


def test_run_length_ends_stage_zero_mid_epoch_only_when_reflow_follows():
    from difftrain.reflow import run_length

    with_reflow = run_length(_length_settings(max_steps=7, reflow_steps=1), 10, 1)
    assert with_reflow.ends_stage0_mid_epoch(7, 1) and not with_reflow.ends_stage0_mid_epoch(6, 1)
    assert with_reflow.epoch_complete(batch_in_epoch=4, batches=10, global_step=7)
    assert not run_length(_length_settings(max_steps=7), 10, 1).ends_stage0_mid_epoch(7, 1)


def test_run_length_refuses_an_empty_epoch_and_reflow_without_a_flow():
    from difftrain.reflow import run_length

    with pytest.raises(ConfigError, match="larger than the training set"):
        run_length(_length_settings(), 0, 2)
    with pytest.raises(ConfigError, match="reflow_steps needs rectified_flow"):
        run_length(_length_settings(rectified_flow=False, reflow_steps=1), 10, 1)
