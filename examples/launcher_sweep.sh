#!/usr/bin/env bash
# A 3 x 2 grid of learning rate and batch size, two runs at a time, then a summary table.
# Quote a key with spaces, and any value the shell could split or expand.
set -euo pipefail
cd "$(dirname "$0")/.."

python train_json_edit.py configs/base_settings.json \
    --sweep train_learning_rate:[0.0001,0.00005,0.00001] \
    --sweep train_batch_size:[1,2] \
    --jobs 2 \
    --models-dir /data/trained_models

# The same config three times (independent runs), one after another. A key with a space needs
# quotes; base_settings.json must have a "2nd pass" object, else the launcher stops and says so.
python train_json_edit.py configs/base_settings.json \
    --override "2nd pass.train_learning_rate:0.0001" \
    --runs 3 \
    --models-dir /data/trained_models
