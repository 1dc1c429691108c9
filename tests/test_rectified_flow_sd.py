"""Seed 001's rectified-flow examples, verbatim, on a tiny SD2-v stand-in (and the refusal)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from difftrain.tiny import single_file_path

REPO = Path(__file__).resolve().parents[1]
SEED_EXAMPLES = {
    "basic": "--config cfgs/train.json --rectified_flow "
             "--resume_ckpt path/to/your_v_prediction_model.safetensors",
    "reflow": "--config cfgs/train.json --rectified_flow --reflow_steps 2 --reflow_gen_batches 10 "
              "--reflow_train_epochs 1 --resume_ckpt path/to/your_v_prediction_model.safetensors",
}


def make_workspace(tmp_path: Path, model_folder: Path) -> Path:
    """cfgs/train.json = our SD2-v rectified-flow preset sized for a tiny model; a 4-image set.

    The preset states prediction_type (SD2 single files cannot tell 512-base from 768-v); here
    the stand-ins describe themselves, so the model's own prediction type is used.
    """
    preset = json.loads((REPO / "configs" / "sd2v_rectified_flow.json").read_text())
    del preset["prediction_type"]
    preset.update({"resolution": 64, "max_epochs": 1, "batch_size": 2, "reflow_sample_steps": 3,
                   "sample_steps": 0, "sample_inference_steps": 2, "num_samples": 1, "tracker": "none",
                   "cache_dir": "", "gradient_checkpointing": False})
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "train.json").write_text(json.dumps(preset))
    (tmp_path / "path" / "to").mkdir(parents=True)
    shutil.copy(single_file_path(model_folder), tmp_path / "path/to/your_v_prediction_model.safetensors")
    (tmp_path / "input").mkdir()
    for index, caption in enumerate(["a red square", "a blue square", "a green square", "a dot"]):
        pixels = np.full((64, 64, 3), 40 * index + 30, np.uint8)
        pixels[:, :32, index % 3] = 250
        Image.fromarray(pixels).save(tmp_path / "input" / f"img{index}.png")
        (tmp_path / "input" / f"img{index}.txt").write_text(caption)
    return tmp_path


def train(workspace: Path, flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *flags.split()], cwd=workspace,
                          capture_output=True, text=True, timeout=600)


def test_seed_reflow_example_runs_verbatim_and_measures_each_stage(tmp_path, tiny_sd2v):
    workspace = make_workspace(tmp_path, tiny_sd2v)
    result = train(workspace, SEED_EXAMPLES["reflow"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (run_folder,) = (workspace / "runs").iterdir()
    events = [json.loads(line) for line in (run_folder / "metrics.jsonl").open()]
    assert [e["reflow_stage"] for e in events if "straightness" in e] == [0, 1, 2]
    (log_folder,) = (workspace / "logs").iterdir()
    stage = log_folder / "reflow" / "reflow_stage_01"
    # reflow_gen_batches x batch_size pairs: 10 x 2.
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest.get("num_pairs", 20) == 20 and len(list(stage.glob("pairs-*.safetensors"))) == 10


def test_seed_basic_example_refuses_an_epsilon_base_before_training(tmp_path, tiny_sd15):
    workspace = make_workspace(tmp_path, tiny_sd15)
    result = train(workspace, SEED_EXAMPLES["basic"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "v-prediction" in result.stderr and "epsilon" in result.stderr
    assert not (workspace / "runs").exists()
