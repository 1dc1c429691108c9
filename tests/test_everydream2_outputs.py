"""Where EveryDream2 users look for their outputs, and EveryDream2's own log folders found again."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from difftrain.checkpoint import STATE_JSON, find_last_everydream2
from tests.test_trainer import tiny_field_data  # noqa: F401 (fixture)


def model_folder(path: Path, mtime: float) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    os.utime(path / "model_index.json", (mtime, mtime))
    return path


def test_findlast_finds_everydream2s_newest_model_folder_but_not_its_ema_or_errored_saves(tmp_path):
    ckpts = tmp_path / "proj-20240101-120000" / "ckpts"
    model_folder(ckpts / "proj-ep01-gs00010", 1000)
    newest = model_folder(ckpts / "last-proj-ep02-gs00020", 2000)
    model_folder(ckpts / "last-proj-ep02-gs00020_ema", 3000)
    model_folder(ckpts / "errored-proj-ep02-gs00025", 4000)
    model_folder(tmp_path / "other-20240101-120000" / "ckpts" / "other-ep09-gs09999", 5000)
    ours = model_folder(tmp_path / "proj20240102-120000" / "ckpts" / "proj-ep00-gs00001", 6000)
    (ours / STATE_JSON).write_text("{}")  # difftrain's own checkpoints are find_last's business
    assert find_last_everydream2(tmp_path, "proj") == newest
    assert find_last_everydream2(tmp_path, "nothing") is None


def everydream2_save(logdir: Path, base: Path, name: str = "last-sdtest-ep01-gs00010") -> Path:
    """A model folder as EveryDream2 leaves it: a diffusers pipeline under logs/<project>-<stamp>/ckpts/."""
    import shutil

    folder = logdir / "sdtest-20240101-120000" / "ckpts" / name
    shutil.copytree(base, folder)
    return folder


def test_findlast_continues_from_everydream2s_save_as_weights_unless_ours_is_newer(tmp_path, tiny_sd15):
    from difftrain.checkpoint import Progress, resolve_start, save_checkpoint
    logdir = tmp_path / "logs"
    theirs = everydream2_save(logdir, tiny_sd15)
    config = SimpleNamespace(resume_ckpt="findlast", logdir=str(logdir), project_name="sdtest")
    lines: list[str] = []
    start = resolve_start(config, from_scratch=False, log=lines.append)
    assert start.checkpoint is None and start.base == str(theirs)
    assert "EveryDream2" in lines[0] and "weights" in lines[0]

    ours = save_checkpoint(logdir / "sdtest20240102-000000" / "ckpts", "sdtest-ep00-gs00001",
                           Progress(project_name="sdtest"),
                           {"optimizer": {}, "scheduler": {}, "generator": 0, "cpu_rng": 0},
                           lambda folder: None, {})
    os.utime(theirs / "model_index.json", (1000, 1000))  # ours is newer
    assert resolve_start(config, from_scratch=False, log=lines.append).checkpoint == ours


def test_a_full_fine_tune_from_everydream2s_save_exports_its_ema_as_a_pipeline(tmp_path, tiny_sd15):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from difftrain.ema import EMA_FILE
    from difftrain.engine import run
    from tests.test_sd_training import sd_config

    images = tmp_path / "images"
    images.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        Image.fromarray(np.full((64, 64, 3), colour, np.uint8)).save(images / f"img{index}.png")
        (images / f"img{index}.txt").write_text(f"colour {index}", encoding="utf-8")
    logdir = tmp_path / "logs"
    everydream2_save(logdir, tiny_sd15)
    config = sd_config(tmp_path, "findlast", images, max_epochs=1, validation_fraction=0.0,
                       ema_decay_rate=0.5, ema_update_interval=1, save_ckpt_dir=str(tmp_path / "single"),
                       no_prepend_last=True)
    assert run(config) == 0
    ours = [folder for folder in logdir.glob("sdtest2*/ckpts/*") if not folder.name.endswith("_ema")]
    (checkpoint,) = ours
    assert checkpoint.name == "sdtest-ep01-gs00002"  # no 'last-' with no_prepend_last
    exported = checkpoint.with_name(checkpoint.name + "_ema")
    pipeline = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    average = load_file(str(checkpoint / EMA_FILE))
    unet = {name[len("unet."):]: tensor for name, tensor in average.items() if name.startswith("unet.")}
    assert unet and all(torch.equal(pipeline.unet.state_dict()[name], tensor) for name, tensor in unet.items())
    trained = StableDiffusionPipeline.from_pretrained(checkpoint, local_files_only=True).unet.state_dict()
    assert any(not torch.equal(trained[name], tensor) for name, tensor in unet.items())

    # save_ckpt_dir: the checkpoint and its EMA as A1111 single files, float16 (save_full_precision off),
    # holding the same weights as the folders they were converted from.
    from difftrain.models.sd import load_sd

    single = tmp_path / "single"
    assert sorted(path.name for path in single.iterdir()) == [f"{checkpoint.name}.safetensors",
                                                              f"{checkpoint.name}_ema.safetensors"]
    flat = load_file(str(single / f"{checkpoint.name}_ema.safetensors"))
    assert {tensor.dtype for tensor in flat.values() if tensor.is_floating_point()} == {torch.float16}
    reloaded = load_sd(single / f"{checkpoint.name}_ema.safetensors").unet.state_dict()
    for name, tensor in unet.items():
        torch.testing.assert_close(reloaded[name], tensor.half().float(), rtol=0, atol=0)


def test_epoch_saves_start_at_save_ckpts_from_n_epochs_and_no_save_ckpt_writes_no_single_file(
        tmp_path, tiny_field_data):
    from difftrain.engine import run
    from tests.test_trainer import tiny_config

    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=4, save_every_n_epochs=1,
                           save_ckpts_from_n_epochs=3, save_ckpt_dir=str(tmp_path / "single"),
                           no_save_ckpt=True)) == 0
    (log_folder,) = (tmp_path / "logs").iterdir()
    names = sorted(path.name for path in (log_folder / "ckpts").iterdir())
    assert [name.split("-gs")[0] for name in names] == ["last-tiny-ep04", "tiny-ep03", "tiny-ep04"]
    assert not (tmp_path / "single").exists()
