"""Launch a train script on a base JSON config edited from the command line.

    python train_json_edit.py configs/base_settings.json --override train_learning_rate:0.0001

The logic lives in difftrain/launch.py; docs/launcher.md explains every option, and
docs/scaling.md the Slurm ones (--slurm: every run one task of one job array).
"""

import sys

from difftrain.launch import main

if __name__ == "__main__":
    sys.exit(main())
