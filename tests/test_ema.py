"""difftrain/ema.py: EveryDream2's EMA (constant decay, strength target, interval) through
diffusers' EMAModel, its checkpoint file, and swapping the average in and out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from difftrain.ema import EMA_FILE, EmaSettings, WeightAverage, decay_for_strength, ema_settings
from difftrain.errors import ConfigError

CPU = torch.device("cpu")


def make_module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    module[2].bias.requires_grad_(False)  # frozen: not averaged
    return module


def settings(decay: float = 0.9, interval: int = 1) -> EmaSettings:
    return EmaSettings(decay=decay, update_interval=interval, device=CPU, sample_ema=False, sample_trained=True)


def nudge(module: nn.Module, step: int) -> None:
    with torch.no_grad():
        for index, parameter in enumerate(module.parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.sin(torch.arange(parameter.numel(), dtype=torch.float32) + step + index)
                               .reshape(parameter.shape))


def config(**values) -> SimpleNamespace:
    base = dict(ema_decay_rate=None, ema_strength_target=None, ema_update_interval=500, ema_device="cpu",
                ema_sample_nonema_model=False, ema_sample_ema_model=False)
    base.update(values)
    return SimpleNamespace(**base)


def test_strength_target_is_what_is_left_of_the_start_after_the_run():
    decay = decay_for_strength(0.2, total_steps=1000, update_interval=10)
    assert decay ** 100 == pytest.approx(0.2)
    assert 0.98 < decay < 0.99


def test_the_first_update_blends_with_the_full_decay_as_everydream2_does():
    module = make_module()
    average = WeightAverage(module, settings(decay=0.9))
    before = {name: value.clone() for name, value in module.named_parameters()}
    nudge(module, 1)
    assert average.after_optimizer_step(1)
    for name, tensor in average.state_tensors().items():
        expected = before[name] * 0.9 + dict(module.named_parameters())[name].detach() * 0.1
        torch.testing.assert_close(tensor, expected)
    assert "2.bias" not in average.state_tensors()  # frozen weights are not averaged


def test_updates_only_every_interval_optimizer_steps():
    module = make_module()
    average = WeightAverage(module, settings(interval=3))
    done = [average.after_optimizer_step(step) for step in range(1, 10)]
    assert done == [False, False, True, False, False, True, False, False, True]
    assert average.updates == 3


def test_a_resumed_average_continues_bit_for_bit(tmp_path):
    def train(module, average, steps):
        for step in steps:
            nudge(module, step)
            average.after_optimizer_step(step)

    module = make_module()
    straight = WeightAverage(module, settings(decay=0.77, interval=2))
    train(module, straight, range(1, 11))

    module = make_module()
    first = WeightAverage(module, settings(decay=0.77, interval=2))
    train(module, first, range(1, 6))
    path = first.save(tmp_path)
    assert path.name == EMA_FILE
    resumed_module = make_module(seed=5)  # different start: everything must come from the files
    resumed_module.load_state_dict(module.state_dict())
    resumed = WeightAverage(resumed_module, settings(decay=0.77, interval=2))
    resumed.load(tmp_path)
    assert resumed.updates == first.updates == 2
    train(resumed_module, resumed, range(6, 11))
    for name, tensor in straight.state_tensors().items():
        assert torch.equal(tensor, resumed.state_tensors()[name]), name
    assert resumed.updates == straight.updates == 5


def test_in_use_puts_the_average_in_and_the_trained_weights_back_exactly():
    module = make_module()
    average = WeightAverage(module, settings(decay=0.5))
    nudge(module, 1)
    average.after_optimizer_step(1)
    nudge(module, 2)
    trained = {name: value.clone() for name, value in module.state_dict().items()}
    with average.in_use() as averaged:
        for name, tensor in average.state_tensors().items():
            assert torch.equal(averaged.state_dict()[name], tensor)
        assert not torch.equal(module[0].weight, trained["0.weight"])
    for name, value in module.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_loading_refuses_a_checkpoint_without_ema_or_of_another_network(tmp_path):
    average = WeightAverage(make_module(), settings())
    with pytest.raises(ConfigError, match="without EMA"):
        average.load(tmp_path)
    other = WeightAverage(nn.Sequential(nn.Linear(4, 3)), settings())
    other.save(tmp_path)
    with pytest.raises(ConfigError, match="does not fit"):
        average.load(tmp_path)


def test_settings_from_the_config():
    assert ema_settings(config(), 100, CPU) is None
    plain = ema_settings(config(ema_decay_rate=0.99, ema_update_interval=5), 100, CPU)
    assert (plain.decay, plain.update_interval, plain.device) == (0.99, 5, CPU)
    assert (plain.sample_trained, plain.sample_ema) == (True, False)
    # The strength target wins over a decay rate given with it, as in EveryDream2.
    target = ema_settings(config(ema_decay_rate=0.99, ema_strength_target=0.5, ema_update_interval=10), 100, CPU)
    assert target.decay == pytest.approx(0.5 ** 0.1)
    both = ema_settings(config(ema_decay_rate=0.9, ema_sample_ema_model=True, ema_sample_nonema_model=True), 10, CPU)
    assert (both.sample_trained, both.sample_ema) == (True, True)
    only_ema = ema_settings(config(ema_decay_rate=0.9, ema_sample_ema_model=True), 10, CPU)
    assert (only_ema.sample_trained, only_ema.sample_ema) == (False, True)
    on_cuda_request = ema_settings(config(ema_decay_rate=0.9, ema_device="cuda"), 10, CPU)
    assert on_cuda_request.device == CPU


def test_no_trained_weights_is_a_config_error():
    module = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trained weights"):
        WeightAverage(module, settings())
