"""Sharded training with 2 CPU processes (torchrun, gloo): accelerate's FSDP (version 2) and
DeepSpeed ZeRO stages 2 and 3.

accelerate selects FSDP and DeepSpeed only on accelerators: on a CPU-only machine its state stays
MULTI_CPU whatever the config says. What they need works on the CPU with gloo (fully_shard and
DTensor shards; DeepSpeed's CPU accelerator and ZeRO partitions; reduce-scatter, the gathers), so
the tests give the workers the environment that `accelerate launch --config_file` makes from our
shipped configs/accelerate/*.yaml (computed by accelerate's own launch code), and the worker below
builds accelerate's plugins from it and sets the state accelerate would set with GPUs when the
trainer builds its Accelerator. Everything after that (accelerator.prepare sharding the model and
the optimizer, the training loop, checkpoints, resume) is the code that runs on GPUs.

Run as a script (`python -m torch.distributed.run ... tests/test_sharding.py ARGS`), this file is
that worker: `--item-noise CONFIG.json` trains the tiny task with noise keyed by item (for the
2-vs-1 comparison), anything else is passed to train.py's main.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if __name__ != "__main__":
    from tests.test_distributed import (WORKER_ENV, finish, item_noise_task_class, losses, only,
                                        torchrun_command, weights, write_config)
    from tests.test_sd_training import images  # noqa: F401  (pytest fixture)
    from tests.test_trainer import tiny_config, tiny_field_data  # noqa: F401  (pytest fixture)


def accelerate_env(config_file: str) -> dict[str, str]:
    """What `accelerate launch --config_file configs/accelerate/<config_file>` puts in its workers'
    environment for FSDP or DeepSpeed, from accelerate's own launch code. Mixed precision is left
    out: bf16 autocast would only make the CPU slower."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = REPO / "configs" / "accelerate" / config_file
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config.keys())
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {key: value for key, value in env.items()
            if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_"))}


def start_two_processes(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(__file__, *args), cwd=REPO, env={**os.environ, **WORKER_ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_two_processes(*args: str, env: dict) -> str:
    return finish(start_two_processes(*args, env=env))


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and all(a[key].shape == b[key].shape for key in a)
    return max((a[key] - b[key]).abs().max().item() for key in a)


def trained_alike(sharded_run: Path, single_run: Path, tolerance: float):
    """The 20 logged losses and the weights in state.pth (whole tensors, gathered from the shards)
    of a 2-process sharded run and a 1-process run of the same global batch agree within
    `tolerance`; returns (sharded losses, sharded weights, single weights)."""
    sharded_losses, single_losses = losses(sharded_run), losses(single_run)
    assert [step for step, _ in sharded_losses] == [step for step, _ in single_losses] == list(range(1, 21))
    assert max(abs(a - b) for (_, a), (_, b) in zip(sharded_losses, single_losses)) < tolerance
    sharded_weights, single_weights = weights(sharded_run), weights(single_run)
    worst = largest_difference(sharded_weights, single_weights)
    assert worst < tolerance, f"2 processes x 2 and 1 x 4 differ by {worst}"
    return sharded_losses, sharded_weights, single_weights


def resumes_bitwise(tmp_path: Path, data: Path, checkpoint: Path, settings: dict, env: dict,
                    straight_losses: list, straight_weights: dict) -> None:
    """2 processes resumed from `checkpoint` (step 12) log the straight run's last losses and end
    with its weights, bit for bit."""
    import torch

    resumed = tiny_config(tmp_path / "resumed", data, batch_size=2, resume_ckpt=str(checkpoint), **settings)
    run_two_processes("--item-noise", write_config(tmp_path / "resumed.json", resumed), env=env)
    resumed_run = only(tmp_path / "resumed" / "runs")
    resumed_weights = weights(resumed_run)
    assert all(torch.equal(straight_weights[key], resumed_weights[key]) for key in straight_weights)
    assert losses(resumed_run) == straight_losses[12:]


def act_as_if_accelerate_chose_what_the_environment_says() -> None:
    """Every Accelerator made from now on in this process holds the state accelerate builds on GPUs
    for the FSDP or DeepSpeed settings in the environment (the plugins read them there)."""
    import accelerate
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    # Taken out, so that the CPU Accelerator does not half-apply them itself.
    use_fsdp = os.environ.pop("ACCELERATE_USE_FSDP", "") == "true"
    use_deepspeed = os.environ.pop("ACCELERATE_USE_DEEPSPEED", "") == "true"
    assert use_fsdp != use_deepspeed, "the test gives the worker FSDP or DeepSpeed settings"

    class ShardingOnCPUAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Both states: accelerate reads the type from one or the other.
            kind = DistributedType.FSDP if use_fsdp else DistributedType.DEEPSPEED
            self.state.distributed_type = PartialState().distributed_type = kind
            if use_fsdp:
                self.state.fsdp_plugin = FullyShardedDataParallelPlugin()
            else:
                plugin = DeepSpeedPlugin()
                plugin.select(_from_accelerator_state=True)
                self.state.deepspeed_plugins = {"default": plugin}
                self.deepspeed_engine_wrapped = None  # what Accelerator.__init__ sets up for DeepSpeed

        def prepare(self, *objects, **kwargs):
            from torch.distributed.fsdp import FSDPModule
            from torch.distributed.tensor import DTensor

            prepared = super().prepare(*objects, **kwargs)
            for model in (item for item in prepared if isinstance(item, torch.nn.Module)):
                kinds = {type(parameter) for parameter in model.parameters()}
                units = sum(isinstance(module, FSDPModule) for module in model.modules())
                print(f"parameters are DTensor shards: {kinds == {DTensor}}; FSDP units: {units}",
                      file=sys.stderr, flush=True)
            return prepared

    accelerate.Accelerator = ShardingOnCPUAccelerator


def test_fsdp2_shards_trains_like_one_process_and_resumes_exactly(tmp_path, tiny_field_data):
    from difftrain.checkpoint import OPTIMIZER_BY_NAME, load_trainer_tensors
    from difftrain.trainer import Trainer

    fsdp_env = accelerate_env("fsdp2.yaml")
    settings = dict(max_epochs=2, ckpt_every_n_steps=6, sample_steps=10, num_samples=1)
    sharded = tiny_config(tmp_path / "fsdp", tiny_field_data, batch_size=2, **settings)
    launched = start_two_processes("--item-noise", write_config(tmp_path / "fsdp.json", sharded), env=fsdp_env)
    one = tiny_config(tmp_path / "one", tiny_field_data, batch_size=4, **settings)
    assert Trainer(one, item_noise_task_class()).run() == 0
    stderr = finish(launched)
    # The state was FSDP (not quietly data parallel) and prepare sharded every parameter.
    assert "sharded with FSDP over 2 processes" in stderr
    # fsdp2.yaml's TRANSFORMER_BASED_WRAP: each residual block of the network is a unit, and the root.
    from difftrain.models.score import ResidualBlock
    from difftrain.tasks.kolmogorov import build_score_network

    units = 1 + sum(isinstance(module, ResidualBlock) for module in build_score_network(one).modules())
    assert units > 2
    assert stderr.count(f"parameters are DTensor shards: True; FSDP units: {units}") == 2, stderr[-3000:]

    run_folder = only(tmp_path / "fsdp" / "runs")
    fsdp_losses, fsdp_weights, one_weights = trained_alike(run_folder, only(tmp_path / "one" / "runs"), 1e-6)
    # Samples were drawn by the main process from the gathered weights.
    assert sorted(path.name for path in (run_folder / "samples").iterdir())[:2] == \
        ["samples-gs00010.png", "samples-gs00020.png"]

    # The checkpoint holds the whole model and the optimizer state keyed by parameter name.
    ckpts = only(tmp_path / "fsdp" / "logs") / "ckpts"
    middle = ckpts / "tiny-ep01-gs00012"
    optimizer_state = load_trainer_tensors(middle)[OPTIMIZER_BY_NAME]
    first = next(iter(one_weights))
    assert optimizer_state["state"][first]["exp_avg"].shape == one_weights[first].shape

    resumes_bitwise(tmp_path, tiny_field_data, middle, settings, fsdp_env, fsdp_losses, fsdp_weights)

    # Checkpoints cross between the layouts: the 1-process run's checkpoint goes on under FSDP, and
    # the FSDP checkpoint in 1 process; both end where the 1-process run ended (up to float sums).
    plain_middle = only(tmp_path / "one" / "logs") / "ckpts" / "tiny-ep01-gs00012"
    onto_fsdp = tiny_config(tmp_path / "onto_fsdp", tiny_field_data, batch_size=2, resume_ckpt=str(plain_middle),
                            **settings)
    launched = start_two_processes("--item-noise", write_config(tmp_path / "onto_fsdp.json", onto_fsdp), env=fsdp_env)
    off_fsdp = tiny_config(tmp_path / "off_fsdp", tiny_field_data, batch_size=4, resume_ckpt=str(middle), **settings)
    assert Trainer(off_fsdp, item_noise_task_class()).run() == 0
    finish(launched)
    # Gradient accumulation under FSDP: 2 processes x 1 item x 2 micro-batches, the same global batch.
    accumulated = tiny_config(tmp_path / "accumulated", tiny_field_data, batch_size=1,
                              gradient_accumulation_steps=2, **settings)
    run_two_processes("--item-noise", write_config(tmp_path / "accumulated.json", accumulated), env=fsdp_env)
    for folder in (tmp_path / "onto_fsdp", tmp_path / "off_fsdp", tmp_path / "accumulated"):
        assert largest_difference(weights(only(folder / "runs")), one_weights) < 1e-6, folder.name


def test_reflow_under_fsdp2_generates_pairs_from_the_gathered_model(tmp_path, tiny_field_data):
    fsdp_env = accelerate_env("fsdp2.yaml")
    config = tiny_config(tmp_path, tiny_field_data, batch_size=2, max_epochs=2, rectified_flow=True,
                         reflow_steps=1, reflow_gen_batches=4, reflow_sample_steps=4)
    stderr = run_two_processes("--config", write_config(tmp_path / "reflow.json", config), env=fsdp_env)
    assert "sharded with FSDP" in stderr and "after stage 1: straightness" in stderr
    log_folder = only(tmp_path / "logs")
    assert len(list((log_folder / "reflow" / "reflow_stage_01").iterdir())) > 0
    assert [step for step, _ in losses(only(tmp_path / "runs"))] == list(range(1, 23))


# Two of the four in the slow set (about 30 s each on 2 cores): the quick set keeps one of each engine.
@pytest.mark.parametrize("sharding, mode", [
    ("fsdp2", "LoRA"), pytest.param("fsdp2", "Full", marks=pytest.mark.slow),
    pytest.param("zero2", "LoRA", marks=pytest.mark.slow), ("zero3", "Full")])
def test_stable_diffusion_sharded_saves_whole_files_and_resumes_exactly(tmp_path, images, tiny_sd15, sharding, mode):
    """The SD task's own writers (diffusers folders, kohya LoRA files, save_per_steps exports,
    sample grids) see the whole model, gathered from the shards, and a resume puts it back."""
    import torch
    from safetensors.torch import load_file

    from tests.test_sd_training import sd_config

    settings = dict(mode=mode, batch_size=1, max_epochs=2, ckpt_every_n_steps=1, sample_steps=2, num_samples=1,
                    network_rank=2, network_alpha=1.0, save_per_steps=1, lora_dir=str(tmp_path / "loras"),
                    save_lora_name="tiny", save_precision="fp32")
    straight = sd_config(tmp_path / "straight", tiny_sd15, images, **settings)
    env = accelerate_env({"fsdp2": "fsdp2.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}[sharding])
    stderr = run_two_processes("--config", write_config(tmp_path / "straight.json", straight), env=env)
    assert "sharded with" in stderr, stderr[-3000:]
    if sharding == "fsdp2":  # the UNet's blocks are units of their own (SDTrainable._no_split_modules)
        assert int(stderr.split("FSDP units: ")[1].split()[0]) > 5, stderr[-3000:]
    run_folder = only(tmp_path / "straight" / "runs")
    state = weights(run_folder)
    assert (run_folder / "samples" / "samples-gs00002.png").is_file()
    (log_folder,) = (tmp_path / "straight" / "logs").glob("sdtest*")  # beside it: the latent cache
    ckpts = log_folder / "ckpts"
    # 3 training images over 2 processes x batch 1: 1 step per epoch, 2 in all.
    assert sorted(path.name for path in ckpts.iterdir()) == ["last-sdtest-ep02-gs00002", "sdtest-ep00-gs00001",
                                                             "sdtest-ep01-gs00002"]
    last = ckpts / "last-sdtest-ep02-gs00002"
    if mode == "LoRA":
        exported = load_file(str(tmp_path / "loras" / "tiny.safetensors"))
        assert exported.keys() == state.keys()
        assert all(torch.equal(exported[key], state[key]) for key in state)
        assert (tmp_path / "loras" / "tiny_1steps.safetensors").is_file()  # after_step's export
    else:
        saved = {}
        for file in (last / "unet").glob("*.safetensors"):
            saved.update(load_file(str(file)))
        assert saved.keys() == state.keys() and all(torch.equal(saved[key], state[key]) for key in state)

    resumed = sd_config(tmp_path / "resumed", tiny_sd15, images, **dict(settings, save_lora_name="again"),
                        resume_ckpt=str(ckpts / "sdtest-ep00-gs00001"))
    run_two_processes("--config", write_config(tmp_path / "resumed.json", resumed), env=env)
    again = weights(only(tmp_path / "resumed" / "runs"))
    assert again.keys() == state.keys() and all(torch.equal(again[key], state[key]) for key in state)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_one_process_and_resumes_exactly(tmp_path, tiny_field_data, stage):
    from difftrain.checkpoint import OPTIMIZER_ELSEWHERE, load_trainer_tensors, read_manifest
    from difftrain.errors import ConfigError
    from difftrain.trainer import Trainer

    env = accelerate_env(f"deepspeed_zero{stage}.yaml")
    settings = dict(max_epochs=2, ckpt_every_n_steps=6, sample_steps=10, num_samples=1, clip_grad_norm=0.5)
    sharded = tiny_config(tmp_path / "zero", tiny_field_data, batch_size=2, **settings)
    launched = start_two_processes("--item-noise", write_config(tmp_path / "zero.json", sharded), env=env)
    one = tiny_config(tmp_path / "one", tiny_field_data, batch_size=4, **settings)
    assert Trainer(one, item_noise_task_class()).run() == 0
    stderr = finish(launched)
    assert f"optimizer state sharded with DeepSpeed ZeRO stage {stage} over 2 processes" in stderr

    run_folder = only(tmp_path / "zero" / "runs")
    zero_losses, zero_weights, _ = trained_alike(run_folder, only(tmp_path / "one" / "runs"), 1e-5)
    assert (run_folder / "samples" / "samples-gs00020.png").is_file()

    # DeepSpeed's per-process files sit inside the checkpoint, under its manifest.
    middle = only(tmp_path / "zero" / "logs") / "ckpts" / "tiny-ep01-gs00012"
    listed = read_manifest(middle)
    assert sum(name.startswith("deepspeed/state/") and "optim_states" in name for name in listed) == 2
    assert load_trainer_tensors(middle)[OPTIMIZER_ELSEWHERE] == "deepspeed"
    assert not [path for path in middle.parent.iterdir() if path.name.startswith(".tmp-")]

    resumes_bitwise(tmp_path, tiny_field_data, middle, settings, env, zero_losses, zero_weights)

    # Outside DeepSpeed its optimizer files cannot be read: a clear refusal, not a crash.
    elsewhere = tiny_config(tmp_path / "elsewhere", tiny_field_data, batch_size=4, resume_ckpt=str(middle), **settings)
    with pytest.raises(ConfigError, match="saved by a DeepSpeed run"):
        Trainer(elsewhere, item_noise_task_class()).run()


def test_deepspeed_settings_follow_the_difftrain_config_and_conflicts_are_refused():
    from types import SimpleNamespace

    from difftrain.errors import ConfigError
    from difftrain.sharding import configure_deepspeed

    config = SimpleNamespace(batch_size=3, gradient_accumulation_steps=2, clip_grad_norm=0.5)
    plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto",
                                               "gradient_accumulation_steps": 2})
    configure_deepspeed(plugin, config, num_processes=4)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
                                       "gradient_clipping": 0.5, "train_batch_size": 24}
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps 4.*2"):
        configure_deepspeed(SimpleNamespace(deepspeed_config={"gradient_accumulation_steps": 4}), config, 4)
    with pytest.raises(ConfigError, match="'optimizer' section"):
        configure_deepspeed(SimpleNamespace(deepspeed_config={"optimizer": {"type": "Adam"}}), config, 4)


def test_megatron_and_fsdp1_are_refused_with_the_fix():
    from difftrain.errors import ConfigError
    from difftrain.sharding import sharding_of

    with pytest.raises(ConfigError, match="FSDP .fsdp_version 2. or DeepSpeed"):
        sharding_of("DistributedType.MEGATRON_LM", None)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding_of("DistributedType.FSDP", 1)
    assert sharding_of("DistributedType.FSDP", 2) == "fsdp"
    assert sharding_of("DistributedType.DEEPSPEED", None) == "deepspeed"
    for kind in ("DistributedType.NO", "DistributedType.MULTI_CPU", "DistributedType.MULTI_GPU"):
        assert sharding_of(kind, None) == "none"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    act_as_if_accelerate_chose_what_the_environment_says()
    if sys.argv[1] == "--item-noise":
        from tests.test_distributed import train_with_item_noise

        sys.exit(train_with_item_noise(sys.argv[2]))
    from difftrain.cli import main

    sys.exit(main(sys.argv[1:], door="train"))
