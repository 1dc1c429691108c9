"""Where EveryDream2 users look for their outputs, and EveryDream2's own log folders found again."""

from __future__ import annotations

import os
from pathlib import Path

from difftrain.checkpoint import STATE_JSON, find_last_everydream2


def model_folder(path: Path, mtime: float) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    os.utime(path / "model_index.json", (mtime, mtime))
    return path


def test_findlast_finds_everydream2s_newest_model_folder_but_not_its_ema_or_errored_saves(tmp_path):
    ckpts = tmp_path / "proj-20240101-120000" / "ckpts"
    model_folder(ckpts / "proj-ep01-gs00010", 1000)
    newest = model_folder(ckpts / "last-proj-ep02-gs00020", 2000)
    model_folder(ckpts / "last-proj-ep02-gs00020_ema", 3000)
    model_folder(ckpts / "errored-proj-ep02-gs00025", 4000)
    model_folder(tmp_path / "other-20240101-120000" / "ckpts" / "other-ep09-gs09999", 5000)
    ours = model_folder(tmp_path / "proj20240102-120000" / "ckpts" / "proj-ep00-gs00001", 6000)
    (ours / STATE_JSON).write_text("{}")  # difftrain's own checkpoints are find_last's business
    assert find_last_everydream2(tmp_path, "proj") == newest
    assert find_last_everydream2(tmp_path, "nothing") is None
