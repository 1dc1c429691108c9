#!/usr/bin/env bash
# The launcher's basic forms: edit one setting of a preset, or pass model folders to train_j.py.
set -euo pipefail
cd "$(dirname "$0")/.."

python train_json_edit.py configs/ADDifT_Style_SDXL.json --override train_learning_rate:0.0001

python train_json_edit.py configs/ADDifT_Style_SDXL.json \
    --models-dir /path/to/models \
    --ckpt-dir /path/to/checkpoints
