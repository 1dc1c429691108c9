#!/usr/bin/env bash
# One base config, three learning rates: no extra JSON files to keep in step.
# (--sweep train_learning_rate:[0.0001,0.00005,0.00001] does the same in one command.)
set -euo pipefail
cd "$(dirname "$0")/.."

python train_json_edit.py configs/base_settings.json --override train_learning_rate:0.0001
python train_json_edit.py configs/base_settings.json --override train_learning_rate:0.00005
python train_json_edit.py configs/base_settings.json --override train_learning_rate:0.00001
