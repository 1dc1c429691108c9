#!/usr/bin/env bash
# Override batch size and step count, and tell train_j.py where models and checkpoints live.
set -euo pipefail
cd "$(dirname "$0")/.."

python train_json_edit.py configs/base_settings.json \
    --override train_batch_size:4 \
    --override train_iterations:100 \
    --models-dir /data/trained_models \
    --ckpt-dir /data/trained_models/checkpoints
