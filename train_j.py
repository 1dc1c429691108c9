#!/usr/bin/env python
"""TrainTrain-style front door: `python train_j.py CONFIG.json [--models-dir R] [--ckpt-dir D] ...`.

The JSON's keys are the config schema's (difftrain/config.py), TrainTrain names included.
"""

from difftrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main(door="train_j"))
