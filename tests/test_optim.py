"""TrainTrain's optimizer and scheduler names, built through the libraries made for them.

The name lists below are TrainTrain's own (hako-mikan/sd-webui-traintrain at commit
7b5892937d088625b84875d1782d49b6e1f55002: `OPTIMIZERS` in trainer/trainer.py, `SCHEDULERS` in
scripts/traintrain.py); every expected learning-rate curve is computed here from the schedule's
definition.
"""

import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from difftrain.config import Config, validate_config_dict
from difftrain.engine import run
from difftrain.errors import ConfigError
from difftrain.optim import (SCHEDULERS, evaluation_weights, find_optimizer, is_schedule_free, make_optimizer,
                             make_scheduler, parse_key_values, parse_step_rules)
from difftrain.vocab.traintrain import load, translate
from tests.test_bad_inputs import field_data  # noqa: F401  (a fixture)
from tests.test_bad_inputs import assert_user_error, tiny_settings, write
from tests.test_trainer import only_run_folder, tiny_config, tiny_field_data  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)

TRAINTRAIN_OPTIMIZERS = [
    "AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy",
    "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD",
    "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit",
    "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree",
    "CAME", "Tiger", "AdamMini", "PagedAdamW", "PagedAdamW32bit", "SGDNesterov", "Adam",
]
TRAINTRAIN_SCHEDULERS = [
    "cosine_annealing", "cosine_annealing_with_restarts", "linear", "cosine", "cosine_with_restarts",
    "polynomial", "constant", "constant_with_warmup", "piecewise_constant", "exponential", "step",
    "multi_step", "reduce_on_plateau", "cyclic", "one_cycle",
]
# Where each optimizer must come from: a well-kept library, never code of ours.
LIBRARY = {"adamw": "torch.optim", "adam": "torch.optim", "sgdnesterov": "torch.optim",
           "adafactor": "transformers"}


def library_of(name: str) -> str:
    if "8bit" in name or name.startswith("Paged"):
        return "bitsandbytes"
    return LIBRARY.get(name.lower(), "pytorch_optimizer")


def quadratic(seed: int = 0):
    """Two parameter tensors pulled towards fixed targets: every optimizer must lower this loss.
    The matrix has 4096 elements: bitsandbytes keeps 8-bit state from that size on."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(64, 64, generator=generator))
    bias = torch.nn.Parameter(torch.randn(3, generator=generator))
    targets = (torch.randn(64, 64, generator=generator), torch.randn(3, generator=generator))

    def loss() -> torch.Tensor:
        return ((weight - targets[0]) ** 2).mean() + ((bias - targets[1]) ** 2).mean()

    return [weight, bias], loss


def run_steps(optimizer, scheduler, loss, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # before the schedule steps, as in our loop
        scheduler.step()
        values.append(value.item())
    return values


# ---- the settings strings ----------------------------------------------------------------------
def test_settings_strings_read_as_traintrain_writes_them():
    text = "betas=(0.9,0.99); eps=1e-8\nweight_decay=0.01;;milestones=[10, 20];mode=triangular2;flag=True"
    assert parse_key_values(text, "x") == {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01,
                                           "milestones": [10, 20], "mode": "triangular2", "flag": True}
    assert parse_key_values("betas=0.9,0.99", "x") == {"betas": (0.9, 0.99)}
    assert parse_key_values("  ", "x") == {}


@pytest.mark.parametrize("text, fragment", [("betas", "key=value"), ("=3", "key=value"),
                                            ("weight_decay=0.01 betas=0.9,0.99", "separate pairs with ';'")])
def test_malformed_settings_strings(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_key_values(text, "optimizer_settings")


# ---- optimizers ------------------------------------------------------------------------------------
def test_every_traintrain_optimizer_name_is_known():
    for name in TRAINTRAIN_OPTIMIZERS:
        assert find_optimizer(name).name.lower() == name.lower()  # TrainTrain matches names in any case


@pytest.mark.parametrize("name", TRAINTRAIN_OPTIMIZERS)
def test_each_traintrain_optimizer_trains_or_says_what_it_needs(name):
    params, loss = quadratic()
    adaptive = name.lower().startswith("dadapt") or name == "Prodigy"
    config = Config(optimizer=name, lr=1.0 if adaptive else 0.02)
    if library_of(name) == "bitsandbytes" and not bitsandbytes_runs_here():
        with pytest.raises(ConfigError, match="bitsandbytes"):
            make_optimizer(config, [{"params": params}])
        return
    optimizer = make_optimizer(config, [{"params": params}])
    assert type(optimizer).__module__.startswith(library_of(name))
    before = [p.detach().clone() for p in params]
    losses = run_steps(optimizer, make_scheduler(config, optimizer, 20), loss, 20)
    assert all(math.isfinite(value) for value in losses)
    assert all(not torch.equal(old, new) for old, new in zip(before, params))
    assert min(losses[1:]) < losses[0], losses


def bitsandbytes_runs_here() -> bool:
    try:
        import bitsandbytes
    except ImportError:
        return False
    return torch.cuda.is_available() or tuple(map(int, bitsandbytes.__version__.split(".")[:2])) >= (0, 50)


def test_bitsandbytes_before_0_50_without_cuda_is_refused_with_the_way_out(monkeypatch):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bitsandbytes, "__version__", "0.49.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params, _ = quadratic()
    with pytest.raises(ConfigError, match=r"bitsandbytes 0.49.2 runs its 8-bit and paged optimizers on CUDA only.*"
                                          r"pip install -U bitsandbytes.*or use 'Lion'"):
        make_optimizer(Config(optimizer="PagedLion8bit"), [{"params": params}])


def test_paged_optimizers_on_the_cpu_say_that_paging_does_nothing(caplog):
    if not bitsandbytes_runs_here() or torch.cuda.is_available():
        pytest.skip("needs bitsandbytes 0.50+ on a machine without CUDA")
    params, _ = quadratic()
    with caplog.at_level(logging.INFO, logger="difftrain"):
        make_optimizer(Config(optimizer="PagedAdamW8bit"), [{"params": params}])
    assert "PagedAdamW8bit: paging" in caplog.text and "no effect" in caplog.text


def test_a_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import fails, as when not installed
    params, _ = quadratic()
    with pytest.raises(ConfigError, match=r"'CAME' needs the pytorch-optimizer package.*pip install pytorch-optimizer"):
        make_optimizer(Config(optimizer="CAME"), [{"params": params}])


def test_unknown_optimizer_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="optimizer 'Prodgy' is unknown. Did you mean 'Prodigy'"):
        find_optimizer("Prodgy")
    assert find_optimizer("rmsprop").source == "torch.optim:RMSprop"  # any torch.optim class still works


def test_sgd_nesterov_means_nesterov_momentum():
    params, _ = quadratic()
    group = make_optimizer(Config(optimizer="SGDNesterov"), [{"params": params}]).param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9
    group = make_optimizer(Config(optimizer="SGDNesterov", optimizer_settings="momentum=0.5"),
                           [{"params": params}]).param_groups[0]
    assert group["momentum"] == 0.5
    with pytest.raises(ConfigError, match="SGDNesterov means nesterov=True"):
        make_optimizer(Config(optimizer="SGDNesterov", optimizer_settings="nesterov=False"), [{"params": params}])


def test_settings_in_the_spellings_of_the_packages_traintrain_used(caplog):
    params, _ = quadratic()
    config = Config(optimizer="Prodigy", lr=1.0,
                    optimizer_settings="decouple=False;use_bias_correction=True;d_coef=2;safeguard_warmup=True;"
                                       "log_every=10")
    with caplog.at_level(logging.INFO, logger="difftrain"):
        group = make_optimizer(config, [{"params": params}]).param_groups[0]
    assert (group["weight_decouple"], group["bias_correction"], group["d_coef"]) == (False, True, 2)
    assert "'log_every' has no effect" in caplog.text


@pytest.mark.parametrize("settings, fragment", [
    ("beta=(0.9,0.99)", "AdamW has no setting 'beta'. Did you mean 'betas'"),
    ("lr=0.1", "Set the learning rate with lr"),
    ("betas=0.9", "do not fit AdamW"),
])
def test_optimizer_settings_that_do_not_fit(settings, fragment):
    params, _ = quadratic()
    with pytest.raises(ConfigError, match=fragment):
        make_optimizer(Config(optimizer="AdamW", optimizer_settings=settings), [{"params": params}])


def test_weight_decay_is_the_optimizers_own_unless_set():
    params, _ = quadratic()
    assert make_optimizer(Config(optimizer="Adam"), [{"params": params}]).param_groups[0]["weight_decay"] == 0
    assert make_optimizer(Config(optimizer="AdamW"), [{"params": params}]).param_groups[0]["weight_decay"] == 0.01
    assert make_optimizer(Config(optimizer="Lion", weight_decay=0.3),
                          [{"params": params}]).param_groups[0]["weight_decay"] == 0.3


def test_adafactor_chooses_its_own_step_size_and_the_schedule_reports_it(caplog):
    params, loss = quadratic()
    config = Config(optimizer="AdaFactor", lr=1e-3, lr_scheduler="cosine", text_encoder_lr=1e-4)
    with caplog.at_level(logging.INFO, logger="difftrain"):
        optimizer = make_optimizer(config, [{"params": params[:1]}, {"params": params[1:], "lr": 1e-4}])
        scheduler = make_scheduler(config, optimizer, 10)
    assert "lr_scheduler has no effect" in caplog.text and all(g["lr"] is None or g["lr"] == 0 for g in
                                                                 optimizer.param_groups)
    for step in range(1, 4):
        rms = [p.detach().norm().item() / math.sqrt(p.numel()) for p in params]
        run_steps(optimizer, scheduler, loss, 1)
        # Adafactor's relative step (Shazeer & Stern 2018): min(1e-2, 1/sqrt(t)) x max(eps2, RMS(param))
        expected = [min(1e-2, 1 / math.sqrt(step)) * max(1e-3, value) for value in rms]
        assert scheduler.get_last_lr() == pytest.approx(expected, rel=1e-5)


def test_adafactor_without_relative_step_follows_lr_and_the_schedule():
    params, loss = quadratic()
    config = Config(optimizer="AdaFactor", lr=0.1, lr_scheduler="linear", lr_warmup_steps=0,
                    optimizer_settings="relative_step=False;scale_parameter=False")
    optimizer = make_optimizer(config, [{"params": params}])
    scheduler = make_scheduler(config, optimizer, 4)
    run_steps(optimizer, scheduler, loss, 2)
    assert scheduler.get_last_lr() == pytest.approx([0.1 * 2 / 4])


def test_adam_mini_keeps_the_tensors_and_the_learning_rate_of_each_group():
    params, loss = quadratic()
    optimizer = make_optimizer(Config(optimizer="AdamMini", lr=0.02), [{"params": params[:1]},
                                                                         {"params": params[1:], "lr": 0.005}])
    lr_of = {id(group["params"][0]): group["lr"] for group in optimizer.param_groups}
    assert lr_of == {id(params[0]): 0.02, id(params[1]): 0.005}
    losses = run_steps(optimizer, make_scheduler(Config(optimizer="AdamMini"), optimizer, 5), loss, 5)
    assert losses[-1] < losses[0]


def test_schedule_free_optimizers_evaluate_their_averaged_weights(caplog):
    params, loss = quadratic()
    config = Config(optimizer="AdamWScheduleFree", lr=0.05, lr_scheduler="cosine")
    optimizer = make_optimizer(config, [{"params": params}])
    with caplog.at_level(logging.INFO, logger="difftrain"):
        scheduler = make_scheduler(config, optimizer, 10)
    assert is_schedule_free(optimizer) and "lr_scheduler has no effect" in caplog.text
    run_steps(optimizer, scheduler, loss, 5)
    assert scheduler.get_last_lr() == [0.05]  # the optimizer warms up and averages by itself
    training = [p.detach().clone() for p in params]
    with evaluation_weights(optimizer):
        averaged = [p.detach().clone() for p in params]
        assert not optimizer.param_groups[0]["train_mode"]
    assert all(not torch.equal(a, b) for a, b in zip(training, averaged))
    assert all(torch.allclose(a, p) for a, p in zip(training, params))  # back to the training weights
    assert optimizer.param_groups[0]["train_mode"]


def test_evaluation_weights_changes_nothing_for_other_optimizers():
    params, _ = quadratic()
    optimizer = make_optimizer(Config(optimizer="AdamW"), [{"params": params}])
    before = [p.detach().clone() for p in params]
    with evaluation_weights(optimizer):
        assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert not is_schedule_free(optimizer)


def test_a_missing_optimizer_package_exits_2_through_the_front_door(tmp_path, field_data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as when it is not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    path = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, field_data), optimizer="PagedAdamW8bit"))
    assert_user_error([path], ["optimizer 'PagedAdamW8bit' needs the bitsandbytes package",
                               "pip install bitsandbytes"], capsys, [tmp_path, field_data])


@pytest.mark.parametrize("optimizer, schedule", [
    ("CAME", "cosine_annealing"), ("AdamWScheduleFree", "cosine"), ("AdaFactor", "constant"),
    ("AdamMini", "one_cycle"), ("AdamW8bit", "step"), ("Prodigy", "multi_step"),
    ("ScalarDoWG", "cosine"), ("CoordinateDoWG", "constant"), ("AdaCoor", "linear"),
])
def test_the_loop_resumes_each_kind_of_optimizer_exactly(tmp_path, tiny_field_data, optimizer, schedule):
    """One optimizer of each library and kind through the whole loop: checkpoint at step 3, resume,
    and the end weights equal the uninterrupted run's bit for bit (optimizer and schedule state kept)."""
    if optimizer == "AdamW8bit" and not bitsandbytes_runs_here():
        pytest.skip("bitsandbytes cannot run here")
    settings = dict(optimizer=optimizer, lr_scheduler=schedule, max_epochs=1)
    assert run(tiny_config(tmp_path / "full", tiny_field_data, ckpt_every_n_steps=3, **settings)) == 0
    middle = next((tmp_path / "full" / "logs").iterdir()) / "ckpts" / "tiny-ep00-gs00003"
    assert run(tiny_config(tmp_path / "resumed", tiny_field_data, resume_ckpt=str(middle), **settings)) == 0
    a = torch.load(only_run_folder(tmp_path / "full") / "state.pth", weights_only=True)
    b = torch.load(only_run_folder(tmp_path / "resumed") / "state.pth", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


# ---- schedules -------------------------------------------------------------------------------------
LR, TOTAL, WARMUP, LR_END = 0.1, 10, 2, 1e-7


def warm(step: int, after) -> float:
    return step / WARMUP if step < WARMUP else after((step - WARMUP) / (TOTAL - WARMUP))


def cyclic(step: int, low: float = 0.01, high: float = 0.1, up: int = 2) -> float:
    cycle = math.floor(1 + step / (2 * up))
    return low + (high - low) * max(0.0, 1 - abs(step / up - 2 * cycle + 1))


def one_cycle(step: int, peak: float = 0.1) -> float:  # pct_start 0.5, linear annealing, torch's div factors
    start, end, top = peak / 25, peak / 25 / 1e4, 0.5 * TOTAL - 1
    if step <= top:
        return start + step / top * (peak - start)
    return peak + (step - top) / (TOTAL - 1 - top) * (end - peak)


# name: (lr_scheduler_settings, lr_step_rules, lr at step s -- from each schedule's definition)
CURVES = {
    "constant": ("", "", lambda s: LR),
    "constant_with_warmup": ("", "", lambda s: LR * min(1.0, s / WARMUP)),
    "linear": ("", "", lambda s: LR * warm(s, lambda p: max(0.0, 1 - p))),
    "cosine": ("", "", lambda s: LR * warm(s, lambda p: 0.5 * (1 + math.cos(math.pi * p)))),
    "cosine_with_restarts": ("num_cycles=2", "", lambda s: LR * warm(
        s, lambda p: 0.5 * (1 + math.cos(math.pi * ((2 * p) % 1.0))))),
    "polynomial": ("power=2", "", lambda s: warm(s, lambda p: (LR - LR_END) * (1 - p) ** 2 + LR_END) *
                   (LR if s < WARMUP else 1)),
    "piecewise_constant": ("", "1:3,0.5:6,0.1", lambda s: LR * (1 if s < 3 else 0.5 if s < 6 else 0.1)),
    "cosine_annealing": ("eta_min=0.01", "", lambda s: 0.01 + (LR - 0.01) * (1 + math.cos(math.pi * s / TOTAL)) / 2),
    "cosine_annealing_with_restarts": ("T_0=4;eta_min=0.01", "",
                                       lambda s: 0.01 + (LR - 0.01) * (1 + math.cos(math.pi * (s % 4) / 4)) / 2),
    "exponential": ("gamma=0.5", "", lambda s: LR * 0.5 ** s),
    "step": ("step_size=3;gamma=0.5", "", lambda s: LR * 0.5 ** (s // 3)),
    "multi_step": ("milestones=[2,5];gamma=0.1", "", lambda s: LR * 0.1 ** sum(m <= s for m in (2, 5))),
    "cyclic": ("base_lr=0.01;max_lr=0.1;step_size_up=2", "", cyclic),
    "one_cycle": ("max_lr=0.1;pct_start=0.5;anneal_strategy=linear", "", one_cycle),
}


def test_the_fifteen_traintrain_schedulers_are_ours():
    assert sorted(SCHEDULERS) == sorted(TRAINTRAIN_SCHEDULERS)
    assert sorted(Config.model_fields["lr_scheduler"].annotation.__args__) == sorted(TRAINTRAIN_SCHEDULERS)
    assert sorted([*CURVES, "reduce_on_plateau"]) == sorted(TRAINTRAIN_SCHEDULERS)


def scheduled(name):
    """(config, optimizer, scheduler, loss) of schedule `name` as CURVES sets it up, on the quadratic."""
    settings, rules, _ = CURVES[name]
    config = Config(lr=LR, lr_scheduler=name, lr_scheduler_settings=settings, lr_step_rules=rules,
                    lr_warmup_steps=WARMUP)
    params, loss = quadratic()
    optimizer = make_optimizer(config, [{"params": params}])
    return config, optimizer, make_scheduler(config, optimizer, TOTAL), loss


@pytest.mark.parametrize("name", sorted(CURVES))
def test_schedule_follows_its_definition(name):
    expected = CURVES[name][2]
    config, optimizer, scheduler, loss = scheduled(name)
    seen = [scheduler.get_last_lr()[0]]
    for _ in range(TOTAL - 1):
        run_steps(optimizer, scheduler, loss, 1)
        seen.append(scheduler.get_last_lr()[0])
    assert seen == pytest.approx([expected(s) for s in range(TOTAL)], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("name", sorted(CURVES))
def test_a_resumed_schedule_continues_where_it_stopped(name):
    config, optimizer, scheduler, loss = scheduled(name)
    run_steps(optimizer, scheduler, loss, 4)
    saved = (optimizer.state_dict(), scheduler.state_dict())  # what a checkpoint keeps
    resumed_optimizer = make_optimizer(config, [{"params": optimizer.param_groups[0]["params"]}])
    resumed = make_scheduler(config, resumed_optimizer, TOTAL)
    resumed_optimizer.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    for _ in range(4):
        scheduler.step()
        resumed.step()
        assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr(), rel=1e-12)


def test_reduce_on_plateau_lowers_lr_when_the_training_loss_stalls(caplog):
    config = Config(lr=LR, lr_scheduler="reduce_on_plateau", lr_scheduler_settings="patience=1;factor=0.5")
    params, _ = quadratic()
    scheduler = make_scheduler(config, make_optimizer(config, [{"params": params}]), TOTAL)
    assert scheduler.wants_loss
    seen = []
    for loss in (3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5):
        scheduler.step(loss)
        seen.append(scheduler.get_last_lr()[0])
    # no better than the best for more than `patience` steps in a row -> x factor, and count again
    assert seen == pytest.approx([LR, LR, LR, LR, LR / 2, LR / 2, LR / 4, LR / 4])
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        scheduler.step()
    assert "passed no loss value" in caplog.text and scheduler.get_last_lr()[0] == pytest.approx(LR / 4)


def test_step_rules_are_read_as_diffusers_reads_them():
    assert parse_step_rules("1:10, 0.1:20,0.01") == [(1.0, 10), (0.1, 20), (0.01, math.inf)]
    assert parse_step_rules("0.5") == [(0.5, math.inf)]


@pytest.mark.parametrize("changes, fragment", [
    ({"lr_scheduler": "cosine_annealing", "lr_scheduler_settings": "eta_mn=0.1"},
     "'eta_mn' is not a setting of cosine_annealing. Did you mean 'eta_min'"),
    ({"lr_scheduler": "constant", "lr_scheduler_settings": "cycles=2"}, "Did you mean 'num_cycles'"),
    ({"lr_scheduler": "one_cycle", "lr_scheduler_settings": "pct_start=2"}, "do not fit one_cycle"),
    ({"lr_scheduler": "piecewise_constant"}, "needs lr_step_rules"),
    ({"lr_scheduler": "piecewise_constant", "lr_step_rules": "1:a,0.1"}, "train_lr_step_rules.*is not valid"),
    ({"lr_scheduler": "piecewise_constant", "lr_step_rules": "1:20,0.5:10,0.1"}, "the steps must increase"),
])
def test_bad_schedule_settings(changes, fragment):
    config = Config(lr=LR, **changes)
    params, _ = quadratic()
    with pytest.raises(ConfigError, match=fragment):
        make_scheduler(config, make_optimizer(config, [{"params": params}]), TOTAL)


def test_settings_that_change_nothing_say_so(caplog):
    config = Config(lr=LR, lr_scheduler="exponential", lr_warmup_steps=3, lr_step_rules="1:2,0.5")
    params, _ = quadratic()
    with caplog.at_level(logging.INFO, logger="difftrain"):
        make_scheduler(config, make_optimizer(config, [{"params": params}]), TOTAL)
    assert "lr_step_rules has no effect" in caplog.text and "lr_warmup_steps has no effect" in caplog.text


REAL = Path(__file__).resolve().parent / "real_files" / "traintrain"


@pytest.mark.parametrize("preset, optimizer_class, scheduler_class", [
    ("ADDifT_Style_SD1.5.json", "pytorch_optimizer.optimizer.came.CAME", "CosineAnnealingLR"),
    ("LoRA.json", "torch.optim.adamw.AdamW", "LambdaLR"),
])
def test_traintrain_presets_get_their_optimizer_and_schedule(preset, optimizer_class, scheduler_class):
    config = load(REAL / preset, flags={"resume_ckpt": "m.safetensors", "data_root": "d"})
    params, loss = quadratic()
    optimizer = make_optimizer(config, [{"params": params}])
    scheduler = make_scheduler(config, optimizer, TOTAL)
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == optimizer_class
    assert type(scheduler).__name__ == scheduler_class
    run_steps(optimizer, scheduler, loss, TOTAL)  # a whole run: the end of the cosine
    eta_min = 1e-5 if preset.startswith("ADDifT") else 0.0  # ADDifT's "eta_min=0.00001"
    assert scheduler.get_last_lr()[0] == pytest.approx(eta_min, abs=1e-12)


def test_traintrain_step_rules_reach_the_schedule():
    settings = translate({"train_lr_scheduler": "piecewise_constant", "train_lr_step_rules": "1:5,0.1"},
                         "t.json").settings
    config = Config(lr=LR, **settings)
    params, loss = quadratic()
    optimizer = make_optimizer(config, [{"params": params}])
    scheduler = make_scheduler(config, optimizer, TOTAL)
    run_steps(optimizer, scheduler, loss, 5)
    assert scheduler.get_last_lr()[0] == pytest.approx(LR * 0.1)
    with pytest.raises(ConfigError, match="cosine_annealing"):
        validate_config_dict({"lr_scheduler": "cosine_anealing"})


# ---- the text encoder's own optimizer (EveryDream2's text_encoder_overrides) ------------------------
PAIRED = dict(optimizer="AdamW", lr=0.01, text_encoder_lr=0.002, text_encoder_optimizer="Lion",
              text_encoder_optimizer_settings="betas=(0.8, 0.9)", text_encoder_weight_decay=0.3,
              lr_scheduler="cosine", lr_warmup_steps=1, text_encoder_lr_scheduler="linear",
              text_encoder_lr_warmup_steps=3, text_encoder_lr_decay_steps=8)


def unet_cosine(step: int) -> float:
    """PAIRED's UNet rate: diffusers' cosine, 1 warm-up step, over 10 steps."""
    return 0.0 if step == 0 else 0.01 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 9))


def paired_run(steps: int, saved=None):
    """UNet-like and text-encoder-like tensors under PAIRED; `saved`: (optimizer, schedule) states to
    continue from. Returns the tensors, the pair, its schedule and each step's learning rates."""
    config = Config(**PAIRED)
    (unet, text), loss = quadratic(5)
    if saved is not None:
        with torch.no_grad():
            unet.copy_(saved[2]), text.copy_(saved[3])
    optimizer = make_optimizer(config, [{"params": [unet]}, {"params": [text], "lr": config.text_encoder_lr}])
    scheduler = make_scheduler(config, optimizer, 10)
    if saved is not None:
        optimizer.load_state_dict(saved[0])
        scheduler.load_state_dict(saved[1])
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in optimizer.param_groups])
        run_steps(optimizer, scheduler, loss, 1)
    return (unet, text), optimizer, scheduler, rates


def test_the_text_encoder_gets_its_own_optimizer_settings_and_schedule():
    (unet, text), optimizer, _, rates = paired_run(6)
    assert [type(inner).__name__ for inner in optimizer.optimizers] == ["AdamW", "Lion"]
    text_group = optimizer.optimizers[1].param_groups[0]
    assert (text_group["betas"], text_group["weight_decay"]) == ((0.8, 0.9), 0.3)
    assert optimizer.optimizers[0].param_groups[0]["weight_decay"] == 0.01  # AdamW's own default
    # UNet: cosine, 1 warm-up step over the run's 10; text encoder: linear, 3 warm-up steps, decay over 8.
    unet_expected = [unet_cosine(step) for step in range(6)]
    text_expected = [0.002 * (step / 3 if step < 3 else (8 - step) / 5) for step in range(6)]
    assert [r[0] for r in rates] == pytest.approx(unet_expected) and [r[1] for r in rates] == pytest.approx(text_expected)
    # The pair's groups are the optimizers' own: what the schedule set is what they used.
    assert optimizer.param_groups[1] is text_group


def test_the_pair_steps_as_two_separate_optimizers_would():
    (unet, text), _, _, _ = paired_run(4)
    (unet2, text2), loss = quadratic(5)
    first = torch.optim.AdamW([unet2], lr=0.01)
    from pytorch_optimizer import Lion
    second = Lion([text2], lr=0.002, betas=(0.8, 0.9), weight_decay=0.3)
    for step in range(4):
        first.param_groups[0]["lr"], second.param_groups[0]["lr"] = unet_cosine(step), 0.002 * step / 3
        loss().backward()
        first.step(), second.step()
        first.zero_grad(), second.zero_grad()
    assert torch.allclose(unet, unet2, rtol=0, atol=1e-7) and torch.allclose(text, text2, rtol=0, atol=1e-7)


def test_the_pair_resumes_bit_for_bit_from_its_saved_state(tmp_path):
    (unet, text), _, _, _ = paired_run(7)
    (middle_unet, middle_text), optimizer, scheduler, _ = paired_run(3)
    torch.save({"optimizer": optimizer.state_dict(), "schedule": scheduler.state_dict()}, tmp_path / "state.pt")
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    (resumed_unet, resumed_text), _, _, _ = paired_run(4, (saved["optimizer"], saved["schedule"],
                                                           middle_unet.detach(), middle_text.detach()))
    assert torch.equal(unet, resumed_unet) and torch.equal(text, resumed_text)


def test_text_encoder_settings_equal_to_the_unets_keep_one_optimizer():
    config = Config(optimizer="AdamW", optimizer_settings="betas=(0.9,0.99)", weight_decay=0.1,
                    text_encoder_optimizer="adamw", text_encoder_optimizer_settings="betas=(0.9, 0.99)",
                    text_encoder_weight_decay=0.1)
    (unet, text), _ = quadratic()
    assert isinstance(make_optimizer(config, [{"params": [unet]}, {"params": [text]}]), torch.optim.AdamW)


def test_a_pair_refuses_what_it_cannot_do():
    (unet, text), _ = quadratic()
    groups = [{"params": [unet]}, {"params": [text]}]
    with pytest.raises(ConfigError, match="sets its own learning rate"):
        make_optimizer(Config(text_encoder_optimizer="AdamWScheduleFree"), groups)
    (unet, text), _ = quadratic()
    pair = make_optimizer(Config(text_encoder_optimizer="Lion"), [{"params": [unet]}, {"params": [text]}])
    single = torch.optim.AdamW([unet, text]).state_dict()
    with pytest.raises(ValueError, match="one optimizer's"):
        pair.load_state_dict(single)
    with pytest.raises(ConfigError, match="cannot be used with model and optimizer state sharded"):
        type(pair).check_unsharded(pair, "model and optimizer state sharded with FSDP over 2 processes")


# ---- EveryDream2's DoWG and AdaCoor (difftrain/parameter_free.py), each step worked out by hand -----
def stepped(optimizer_class, start, gradients, **settings):
    weights = torch.nn.Parameter(torch.tensor(start))
    optimizer = optimizer_class([weights], **settings)
    for gradient in gradients:
        weights.grad = torch.tensor(gradient)
        optimizer.step()
    return weights.detach().tolist()


def test_scalar_dowg_follows_the_papers_recursion():
    from difftrain.parameter_free import ScalarDoWG

    # x0 = (3, 4): |x0| = 5, r_eps = 0.1 x 6 = 0.6. Step 0, g = (1, 0): r^2 = 0.36, v = 0.36 x 1,
    # eta = 0.36 / 0.6 = 0.6, x1 = (2.4, 4). Step 1, g = (0, 2): |x1 - x0|^2 = 0.36 keeps r^2 = 0.36,
    # v = 0.36 + 0.36 x 4 = 1.8, eta = 0.36 / sqrt(1.8), x2 = (2.4, 4 - 2 eta).
    assert stepped(ScalarDoWG, [3.0, 4.0], [[1.0, 0.0]], eps=0.1) == pytest.approx([2.4, 4.0])
    eta = 0.36 / math.sqrt(1.8)
    assert stepped(ScalarDoWG, [3.0, 4.0], [[1.0, 0.0], [0.0, 2.0]], eps=0.1) == pytest.approx([2.4, 4 - 2 * eta])
    # Third step, g = (1, 1): the weights moved further than r_eps, so r^2 grows to |x2 - x0|^2.
    r2 = 0.6 ** 2 + (2 * eta) ** 2
    v = 1.8 + r2 * 2
    expected = [2.4 - r2 / math.sqrt(v), 4 - 2 * eta - r2 / math.sqrt(v)]
    assert stepped(ScalarDoWG, [3.0, 4.0], [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], eps=0.1) == pytest.approx(expected)


def test_coordinate_dowg_runs_the_recursion_per_coordinate():
    from difftrain.parameter_free import CoordinateDoWG

    # r_eps = 0.5 x (1 + |x0|) = (1, 1.5): r^2 = (1, 2.25). g = (2, 1): v = (4, 2.25), steps
    # r^2 g / sqrt(v) = (1, 1.5). Then g = (1, 0): r^2 unchanged (moved exactly r_eps), v = (5, 2.25).
    assert stepped(CoordinateDoWG, [1.0, -2.0], [[2.0, 1.0]], eps=0.5) == pytest.approx([0.0, -3.5])
    assert stepped(CoordinateDoWG, [1.0, -2.0], [[2.0, 1.0], [1.0, 0.0]], eps=0.5) == \
        pytest.approx([-1 / math.sqrt(5), -3.5])
    # a coordinate whose gradient was always 0 does not move (and is no 0/0)
    assert stepped(CoordinateDoWG, [1.0, 7.0], [[2.0, 0.0]], eps=0.5)[1] == 7.0


def test_adacoor_steps_as_everydream2s():
    from difftrain.parameter_free import AdaCoor

    # eps = 2^-6 (exact in bfloat16). g = (0.5, 0.25): v = eps g^2 = (2^-8, 2^-10), sqrt(v) + eps =
    # (5/64, 3/64), step eps g / that = (0.1, 1/12).
    assert stepped(AdaCoor, [1.0, -2.0], [[0.5, 0.25]], eps=2 ** -6) == pytest.approx([0.9, -2 - 1 / 12])
    # Second step, g = (0.5, 0): v = (2^-7, 2^-10); the first coordinate steps eps 0.5 / (sqrt(2^-7) + eps).
    second = 2 ** -7 / (math.sqrt(2 ** -7) + 2 ** -6)
    assert stepped(AdaCoor, [1.0, -2.0], [[0.5, 0.25], [0.5, 0.0]], eps=2 ** -6) == \
        pytest.approx([0.9 - second, -2 - 1 / 12], rel=1e-2)  # sqrt(2^-7) is rounded to bfloat16, as there


@pytest.mark.parametrize("name", ["ScalarDoWG", "CoordinateDoWG", "AdaCoor"])
def test_own_step_size_optimizers_ignore_lr_and_the_schedule_steps_aside(name, caplog):
    parameters, loss = quadratic()
    config = Config(optimizer=name, optimizer_settings="eps=0.01", lr=1e-6, lr_scheduler="cosine")
    with caplog.at_level(logging.INFO):
        optimizer = make_optimizer(config, [{"params": parameters}])
        scheduler = make_scheduler(config, optimizer, 30)
    assert "lr and the learning-rate schedule have no effect" in caplog.text
    values = run_steps(optimizer, scheduler, loss, 30)
    assert values[-1] < 0.8 * values[0]  # lr 1e-6 would not have moved it


def test_text_encoder_own_optimizer_matters_for_optimizers_with_one_step_size():
    from difftrain.optim import OptimizerPair

    def built(**settings):
        (unet, text), loss = quadratic(2)
        with torch.no_grad():
            text.mul_(100)  # a text encoder whose gradients are far larger than the UNet's
        optimizer = make_optimizer(Config(**settings), [{"params": [unet]}, {"params": [text]}])
        return optimizer, loss

    assert isinstance(built(optimizer="AdamW", text_encoder_own_optimizer=True)[0], torch.optim.AdamW)  # same steps
    assert not isinstance(built(optimizer="DAdaptAdam")[0], OptimizerPair)
    optimizer, loss = built(optimizer="DAdaptAdam", lr=1.0, text_encoder_own_optimizer=True)
    assert isinstance(optimizer, OptimizerPair)
    run_steps(optimizer, make_scheduler(Config(), optimizer, 10), loss, 5)
    unet_d, text_d = (inner.param_groups[0]["d"] for inner in optimizer.optimizers)
    assert unet_d != text_d  # each model's own D-Adaptation estimate, as in EveryDream2


def test_the_text_encoders_learning_rate_is_logged_beside_the_unets():
    from difftrain.optim import logged_learning_rates

    unet, text = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": text.parameters(), "module": "text_encoder", "lr": 1e-5},
                                   {"params": unet.parameters(), "module": "unet"}], lr=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert logged_learning_rates(schedule, optimizer) == {"lr": 5e-5, "lr_text_encoder": 5e-6}
    alone = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    assert logged_learning_rates(torch.optim.lr_scheduler.LambdaLR(alone, lambda step: 1.0), alone) == {"lr": 1e-4}


def test_per_model_clipping_clips_the_unet_and_the_text_encoder_each_on_their_own():
    from accelerate import Accelerator

    from difftrain.optim import clip_gradients

    def clipped(per_model: bool) -> tuple[float, float]:
        unet, text = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        unet.weight.grad, text.weight.grad = torch.tensor([[3.0]]), torch.tensor([[4.0]])
        optimizer = torch.optim.SGD([{"params": unet.parameters(), "module": "unet"},
                                     {"params": text.parameters(), "module": "text_encoder"}], lr=0.1)
        clip_gradients(Accelerator(cpu=True), torch.nn.ModuleList([unet, text]), optimizer, 1.0, per_model)
        return unet.weight.grad.item(), text.weight.grad.item()

    assert clipped(per_model=True) == pytest.approx((1.0, 1.0))  # each to norm 1
    assert clipped(per_model=False) == pytest.approx((0.6, 0.8))  # the joint norm 5 scaled to 1
