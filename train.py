#!/usr/bin/env python
"""EveryDream2-style front door: `python train.py [--config CONFIG.json] [--flag value ...]`.

Every flag is a key of the config schema (difftrain/config.py); see `python train.py --help`.
"""

from difftrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main(door="train"))
