"""Shared pieces of the benchmarks: devices, clocks, memory readings, the configs they train.

Every benchmark measures two things side by side in alternation and prints their ratio as its
last line (``ratio: 1.021``), because the machines they run on are shared: a neighbour's load
slows both sides alike and cancels out of a ratio, not out of an absolute time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    # The benchmarks run as scripts (python bench/x.py); the package lives beside bench/.
    sys.path.insert(0, str(REPO))

# Nothing a benchmark does may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

COMPONENT_CONFIGS = REPO / "difftrain" / "models" / "component_configs"
CACHE_ROOT = Path(tempfile.gettempdir()) / "difftrain-bench"

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), for MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "4090": 165.2e12}

QUICKSTART = REPO / "configs" / "quickstart.json"  # what a CPU user trains: the engine's CPU size
# The test suite's tiny size, for --smoke.
SMOKE_SETTINGS = {"simulation": {"size": 16, "coarsen": 1, "trajectories": 10, "steps": 8, "keep": 6},
                  "window": 2, "embedding": 8, "hidden_channels": [4, 8], "hidden_blocks": [1, 1],
                  "batch_size": 4}


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: --device, --smoke."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to train (auto: cuda when available)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps at a tiny size, to check the benchmark runs (CI); "
                             "its numbers mean nothing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; 1 under --smoke). On "
                             "cores shared with other work, 1 avoids threads spinning against the "
                             "neighbours' (measured: a tiny UNet step 0.15 s with 1 thread, 3-10 s "
                             "with 2 on 2 busy cores)")
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options of the benchmarks that train: which network, how many steps, which tracker."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--sd15-size", action="store_true",
                      help="train an SD1.5-architecture UNet (random weights, SD1.5 config) on "
                           "random latents instead of the Kolmogorov score network")
    size.add_argument("--sdxl-size", action="store_true",
                      help="the same with the SDXL base UNet")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels for --sd15-size/--sdxl-size (default 512 / 1024; "
                             "latents are 1/8 of it)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 16 (Kolmogorov quickstart) or 4 (SD-size UNets)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                        help="the engine's mixed_precision; the bare loop mirrors what it resolves to")
    parser.add_argument("--tracker", default=None, choices=["wandb", "none"],
                        help="the engine's tracker (default: wandb, as a user's run; none under --smoke)")
    parser.add_argument("--data-root", default=None,
                        help="Kolmogorov data folder (generated once when missing; default in "
                             f"{CACHE_ROOT})")


def apply_threads(args) -> None:
    import torch

    threads = getattr(args, "threads", None) or (1 if getattr(args, "smoke", False) else None)
    if threads:
        torch.set_num_threads(threads)


def pick_device(name: str):
    """'auto' | 'cpu' | 'cuda' -> torch.device; asking for cuda without one is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def hide_gpu_unless(device_name: str) -> None:
    """accelerate places the engine on cuda whenever it sees a GPU; --device cpu must hide it."""
    if device_name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def synchronize(device) -> None:
    """Wait for queued GPU work, so a clock reading covers it (a no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_ratio(value: float) -> None:
    """The one line every benchmark ends with; tests and RESULTS.md read it."""
    print(f"ratio: {value:.3f}", flush=True)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_description(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def peak_bf16_flops(device) -> Optional[float]:
    """The device's dense bf16 peak (FLOP/s) when it is a GPU we know; None otherwise."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


# ---- memory ---------------------------------------------------------------------------------------
def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device) -> bool:
    """Start a fresh peak: VRAM allocator stats on GPU, the kernel's RSS high-water mark on CPU.

    Returns False when the peak could not be reset (then the reading covers the whole process).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device) -> int:
    """Peak allocated VRAM on GPU, or the peak resident set size (VmHWM) on CPU, in bytes."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = _status_kib("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak * 1024


def current_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return (_status_kib("VmRSS") or 0) * 1024


# ---- what the trainer trains ------------------------------------------------------------------------
def kolmogorov_data_root(args) -> Path:
    if args.data_root:
        return Path(args.data_root)
    simulation = SMOKE_SETTINGS["simulation"] if args.smoke else \
        json.loads(QUICKSTART.read_text(encoding="utf-8")).get("simulation", {})
    # Keyed by the simulation settings: data made for an older quickstart is never reused.
    import hashlib

    key = hashlib.sha256(json.dumps(simulation, sort_keys=True).encode()).hexdigest()[:10]
    return CACHE_ROOT / f"kolmogorov-{'smoke' if args.smoke else 'quickstart'}-{key}"


def engine_config(args, workdir: Path, *, max_steps: int):
    """The Config the engine runs: configs/quickstart.json's Kolmogorov settings (or the test
    suite's tiny ones under --smoke), with outputs in `workdir` and nothing periodic inside the timed steps
    (no samples, no time-based checkpoints)."""
    from difftrain.config import validate_config_dict

    settings = json.loads(QUICKSTART.read_text(encoding="utf-8"))
    if args.smoke:
        settings.update(SMOKE_SETTINGS)
    tracker = args.tracker or ("none" if args.smoke else "wandb")
    settings.update({
        "project_name": "bench", "data_root": str(kolmogorov_data_root(args)),
        "max_steps": max_steps, "sample_steps": 0,
        "sample_inference_steps": 1, "num_samples": 1, "tracker": tracker,
        "logdir": str(workdir / "logs"), "runs_dir": str(workdir / "runs"),
        # A save interval that never falls inside the measurement; without one the loop would
        # save every 20 minutes.
        "save_every_n_epochs": 10_000, "ckpt_every_n_minutes": 0,
        "validate_every_n_epochs": 10_000, "mixed_precision": args.mixed_precision, "seed": 1,
    })
    if args.batch_size:
        settings["batch_size"] = args.batch_size
    return validate_config_dict(settings, source="bench")


def sd_unet_config(family: str) -> dict[str, Any]:
    """The published UNet config of 'sd1' or 'sdxl' (component_configs/), for random weights."""
    config = json.loads((COMPONENT_CONFIGS / family / "unet.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def wants_sd_unet(args) -> Optional[str]:
    if getattr(args, "sd15_size", False):
        return "sd1"
    if getattr(args, "sdxl_size", False):
        return "sdxl"
    return None


class LatentUNetTask:
    """An SD-architecture UNet with random weights, trained with the epsilon objective on random
    latents and text embeddings made once: the engine's loop at the size of a real fine-tune,
    with no VAE or text encoder in the way (the UNet is where a fine-tune's time goes).

    Satisfies `difftrain.tasks.base.Task`. The batch is (latents (B, 4, h, w), conditioning dict).
    """

    def __init__(self, family: str, resolution: int, batch_size: int, accelerator: Any, *, smoke: bool):
        from difftrain.tasks.base import TaskDefaults, TaskParts

        self.defaults = TaskDefaults(from_scratch=True)
        self.parts = TaskParts(samples=self, validation=self)
        import torch
        from diffusers import UNet2DConditionModel

        from difftrain.objectives import DiffusionObjective

        self.family = family
        self.device = accelerator.device
        unet_config = sd_unet_config(family)
        if smoke:
            # Same block types and conditioning, a sliver of the width: the path, not the speed.
            unet_config.update(block_out_channels=[32, 64], layers_per_block=1,
                               down_block_types=unet_config["down_block_types"][-2:],
                               up_block_types=unet_config["up_block_types"][:2],
                               attention_head_dim=[2, 4] if family == "sdxl" else 4,
                               transformer_layers_per_block=1, sample_size=8)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = UNet2DConditionModel(**unet_config)
        self.model.train()
        self.batch_size = batch_size
        side = resolution // 8
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(batch_size, 4, side, side, generator=generator).to(self.device)
        self.condition = random_unet_condition(unet_config, batch_size, self.device, generator)
        self.objective = DiffusionObjective(sd_alphas_cumprod(), "epsilon")

    def parameter_groups(self):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def epoch_batches(self, epoch, rank, world_size):
        # One long epoch: an epoch boundary (validation) never falls inside the measurement.
        return [[0] * self.batch_size for _ in range(1_000_000)]

    def collate(self, indices, epoch):
        return self.latents, self.condition

    def loss(self, model, batch, generator):
        latents, condition = batch
        loss, _ = self.objective.loss(lambda x, t, **c: model(x, t, **c, return_dict=False)[0],
                                      latents, generator, **condition)
        return loss

    def validation_loss(self, model):
        return None

    def samples(self, model):
        return {}

    def write_model(self, model, folder):
        pass  # gigabytes of random weights are not worth a disk write in a benchmark

    def load_model(self, model, folder):
        pass

    def run_state_dict(self, model):
        return {}


def random_unet_condition(unet_config: dict, batch_size: int, device, generator) -> dict[str, Any]:
    """The UNet's conditioning keywords filled with noise: encoder_hidden_states (B, 77, D), and
    for SDXL added_cond_kwargs {'text_embeds': (B, P), 'time_ids': (B, 6)}."""
    import torch

    hidden = torch.randn(batch_size, 77, unet_config["cross_attention_dim"], generator=generator)
    condition: dict[str, Any] = {"encoder_hidden_states": hidden.to(device)}
    if unet_config.get("addition_embed_type") == "text_time":
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        side = unet_config["sample_size"] * 8
        condition["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch_size, pooled, generator=generator).to(device),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch_size, dtype=torch.float32).to(device),
        }
    return condition


def sd_alphas_cumprod():
    """SD's training schedule: scaled_linear betas 0.00085 .. 0.012 over 1000 steps, (1000,)."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def make_engine_task(args, config, accelerator, start):
    """The task the engine trains in these benchmarks: the real Kolmogorov task, or the latent
    UNet task for --sd15-size / --sdxl-size."""
    family = wants_sd_unet(args)
    if family is None:
        from difftrain.tasks.kolmogorov import KolmogorovTask

        return KolmogorovTask(config, accelerator, start)
    resolution = args.resolution or (1024 if family == "sdxl" else 512)
    if args.smoke:
        resolution = 64
    return LatentUNetTask(family, resolution, config.batch_size, accelerator, smoke=args.smoke)


class StepProbe:
    """Wraps a task so that a callback runs at the start of every engine step.

    The loop calls `collate` exactly once per micro-batch, first thing in the step, so the time
    between two calls is one whole engine step: collation, forward, backward, optimizer step,
    scheduler, logging, progress bar. Everything else is passed through to the real task.
    """

    def __init__(self, task: Any, on_step_start: Callable[[int], None]):
        self._task = task
        self._on_step_start = on_step_start
        self.model = task.model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def collate(self, indices, epoch):
        self._on_step_start(epoch)
        return self._task.collate(indices, epoch)


def run_engine(args, max_steps: int, on_step_start: Callable[[int, Any, Any], None]) -> Any:
    """Run the real `Trainer` for `max_steps` with `on_step_start(epoch, task, accelerator)` called
    at the start of each step. Returns the Trainer (its accelerator and task stay usable)."""
    from difftrain.tasks.base import FactoryFunction, TaskDefaults
    from difftrain.trainer import Trainer

    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-", dir=CACHE_ROOT))
    config = engine_config(args, workdir, max_steps=max_steps)
    holder: dict[str, Any] = {}

    def build(config, accelerator, start):
        task = make_engine_task(args, config, accelerator, start)
        holder["task"], holder["accelerator"] = task, accelerator
        return StepProbe(task, lambda epoch: on_step_start(epoch, holder["task"], holder["accelerator"]))

    if wants_sd_unet(args) and args.batch_size is None:
        config = config.model_copy(update={"batch_size": 4})
    # Both tasks build their networks from nothing (random weights).
    factory = FactoryFunction(build, TaskDefaults(from_scratch=True))
    trainer = Trainer(config, factory, program="bench")
    exit_code = trainer.run()
    if exit_code != 0:
        raise SystemExit(f"the engine stopped with exit code {exit_code}")
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return trainer


# ---- alternating measurement ----------------------------------------------------------------------
class Alternation:
    """Engine steps and another loop's steps, alternating in blocks inside one engine run.

    Use `on_step_start` as `run_engine`'s callback. At the first engine step it builds the other
    loop with `make_other(task, accelerator)` (a zero-argument step function) and warms it up;
    after `warmup` engine steps, every `block_steps` engine steps are timed as one block and
    followed by `block_steps` steps of the other loop, timed alike. The clock is read (and a GPU
    synchronized) only at block edges, so work the engine leaves queued, or syncs it forces in
    the middle of a step, count where they belong. A block that crosses an epoch boundary is
    dropped: that step also runs the epoch's bookkeeping.
    """

    def __init__(self, make_other: Callable[[Any, Any], Callable[[], None]], *, warmup: int, block_steps: int,
                 count_flops: bool = False):
        self.make_other = make_other
        self.warmup = warmup
        self.block_steps = block_steps
        self.count_flops = count_flops
        self.engine_times: list[float] = []  # seconds per step, one entry per block
        self.other_times: list[float] = []
        self.flops: Optional[float] = None
        self.precision: Optional[str] = None
        self._other: Optional[Callable[[], None]] = None
        self._started = 0
        self._block_start = 0.0
        self._block_epoch: Optional[int] = None

    def steps_for(self, blocks: int) -> int:
        """max_steps for the engine so that `blocks` blocks complete."""
        return self.warmup + blocks * self.block_steps + 1

    def on_step_start(self, epoch: int, task: Any, accelerator: Any) -> None:
        device = accelerator.device
        if self._other is None:
            self.precision = accelerator.mixed_precision
            other = self.make_other(task, accelerator)
            for _ in range(self.warmup):
                other()
            if self.count_flops:
                self.flops = flops_per_step(other)
            self._other = other
        completed = self._started
        self._started += 1
        block_ends = completed > self.warmup and (completed - self.warmup) % self.block_steps == 0
        if completed < self.warmup or not (block_ends or completed == self.warmup):
            return  # no clock reading (and no sync) inside a block
        synchronize(device)
        if block_ends and epoch == self._block_epoch:
            self.engine_times.append((now() - self._block_start) / self.block_steps)
            start = now()
            for _ in range(self.block_steps):
                self._other()
            synchronize(device)
            self.other_times.append((now() - start) / self.block_steps)
        self._block_start, self._block_epoch = now(), epoch

    def summary(self) -> tuple[float, float]:
        """(median engine step, median other step) in seconds."""
        if not self.engine_times:
            raise SystemExit("no block was measured; raise --blocks")
        return median(self.engine_times), median(self.other_times)


def engine_torch_optimizer(accelerator) -> Any:
    """The torch optimizer the engine prepared (inside accelerate's wrapper), or None.

    `_optimizers` is accelerate's private list of what `prepare` returned; if a future version
    drops it, the bare loop falls back to an optimizer of its own with the same settings.
    """
    prepared = getattr(accelerator, "_optimizers", None) or []
    return getattr(prepared[0], "optimizer", None) if prepared else None


def add_alternation_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--blocks", type=int, default=None,
                        help=f"alternations of engine and {what} measured (default 300 on CPU, 100 on GPU)")
    parser.add_argument("--block-steps", type=int, default=None,
                        help="steps per block (default 1 on CPU; 10 on GPU, so that a host-device "
                             "sync inside a step shows up as the pipeline stall it causes)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps of each side (default 10)")


def alternation_settings(args, device) -> tuple[int, int, int]:
    """(blocks, block_steps, warmup) from the options and the device."""
    on_gpu = device.type == "cuda"
    blocks = args.blocks or (3 if args.smoke else 100 if on_gpu else 300)
    block_steps = args.block_steps or (2 if args.smoke else 10 if on_gpu else 1)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    return blocks, block_steps, warmup


# ---- the bare loop ------------------------------------------------------------------------------------
class BareLoop:
    """The limit our step is held to: forward and loss, backward, optimizer step, nothing else.

    Same network, the same optimizer (the engine's own torch optimizer when given, so an SD-size
    UNet does not carry two AdamW states; else one built by the trainer's `make_optimizer`), the same
    precision the engine resolved to, the task's own loss (so the objective's math is the same
    on both sides and the ratio is the loop's cost), and one batch made once, already on the
    device. The network's class `forward` is called directly, skipping any wrapper accelerate
    put on the instance.
    """

    def __init__(self, model, config, task, device, mixed_precision: str, engine_optimizer=None):
        import torch

        from difftrain.optim import make_optimizer

        self.model = model
        self.device = device
        self.optimizer = engine_optimizer or make_optimizer(
            config, [{"params": [p for p in model.parameters() if p.requires_grad]}])
        self.autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
        self.generator = torch.Generator(device=device).manual_seed(2)
        forward = type(model).forward
        # The task's own loss (the same math as the engine's), over the network's class forward.
        self.network = lambda *inputs, **keywords: forward(model, *inputs, **keywords)
        self.task = task
        self.batch = task.collate(task.epoch_batches(0, 0, 1)[0], 0)

    def _loss(self):
        return self.task.loss(self.network, self.batch, self.generator)

    def step(self) -> None:
        """One training step."""
        import torch

        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                loss = self._loss()
        else:
            loss = self._loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def flops_per_step(step: Callable[[], None]) -> Optional[float]:
    """FLOPs of one call of `step` (forward + backward) counted by torch's FlopCounterMode."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def say(message: str) -> None:
    print(message, flush=True)


def now() -> float:
    return time.perf_counter()
