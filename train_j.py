#!/usr/bin/env python
"""TrainTrain-style front door: `python train_j.py CONFIG.json [--models-dir R] [--ckpt-dir D] ...`.

The JSON is TrainTrain's (its presets work unchanged): its keys are translated through one table,
difftrain/vocab/traintrain.py, to the schema's (difftrain/config.py), which may be used too; the
flags are the schema's names.
"""

from difftrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main(door="train_j"))
