#!/usr/bin/env bash
# The launcher's basic forms: edit one setting of a preset, or pass model folders to train_j.py.
set -euo pipefail
cd "$(dirname "$0")/.."

python train_json_edit.py configs/ADDifT_Style_SDXL.json --override train_learning_rate:0.0001

python train_json_edit.py configs/ADDifT_Style_SDXL.json \
    --models-dir /path/to/models \
    --ckpt-dir /path/to/checkpoints

# TrainTrain's own keys, spelled as its presets write them: spaces and parentheses are part of
# the key, so quote the whole pair. The key ends at the first ':' (values keep theirs).
python train_json_edit.py configs/LoRA_SD15.json \
    --override "image_size(height, width):640,768" \
    "network_blocks(BASE = TextEncoder):[BASE,IN01,OUT11]" \
    --models-dir /path/to/models
