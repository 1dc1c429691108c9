"""Reflow stages on the tiny Kolmogorov task: the pairs are generated (and each stage measured) by
the weights that are the run's result, a schedule-free optimizer's average; and mid-epoch
validation points follow each epoch's own length, reflow epochs included."""

from __future__ import annotations

import json

import pytest

from difftrain.engine import run
from tests.test_trainer import only_run_folder, tiny_config, tiny_field_data  # noqa: F401  (a fixture)


@pytest.mark.usefixtures("one_thread")
def test_reflow_generates_and_measures_with_the_averaged_weights_and_validates_mid_reflow_epoch(
        tmp_path, tiny_field_data, monkeypatch):  # noqa: F811
    import pytorch_optimizer

    import difftrain.reflow as reflow

    events: list[str] = []
    for mode in ("eval", "train"):
        original = getattr(pytorch_optimizer.ScheduleFreeAdamW, mode)

        def switch(self, *args, _original=original, _mode=mode, **kwargs):
            events.append(_mode)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(pytorch_optimizer.ScheduleFreeAdamW, mode, switch)
    for name in ("generate_reflow_pairs", "probe_flow"):
        original = getattr(reflow, name)

        def record(*args, _original=original, _name=name, **kwargs):
            events.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(reflow, name, record)
    config = tiny_config(tmp_path, tiny_field_data, max_epochs=1, rectified_flow=True, reflow_steps=1,
                         reflow_gen_batches=4, reflow_sample_steps=2, optimizer="AdamWScheduleFree",
                         lr_scheduler="constant", validations_per_epoch=2)
    assert run(config) == 0
    for name in ("generate_reflow_pairs", "probe_flow"):
        assert name in events
        for at in (index for index, event in enumerate(events) if event == name):
            last_switch = next(event for event in reversed(events[:at]) if event in ("eval", "train"))
            assert last_switch == "eval", f"{name} ran on the training weights"
    records = [json.loads(line) for line in (only_run_folder(tmp_path) / "metrics.jsonl").open()]
    steps = [record["step"] for record in records if "loss_valid" in record]
    # stage 0: 10 steps, validated after 5 and 10; the reflow epoch: 4 steps, after 2 and 4
    assert steps == [5, 10, 12, 14]
