#!/usr/bin/env bash
# Write the edited config somewhere else and delete it when the run is over.
set -euo pipefail
cd "$(dirname "$0")/.."

python train_json_edit.py configs/base_settings.json \
    --temp-config-dir /tmp/cv_configs \
    --delete-temp-config
