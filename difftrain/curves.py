"""A run's curves from its metrics.jsonl: losses, learning rates, and reflow's per-stage numbers.

`draw_curves` makes one figure of one run (curves.png, redrawn at each checkpoint and at the end
of a run; `python -m difftrain.report` redraws it any time), `draw_comparison` overlays several
runs (a sweep's summary). Both read only metrics.jsonl, so they work on a finished run, a running
one (its last line may be half-written) and one that stopped on a NaN.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from difftrain.atomic_files import write_file_atomically

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# Losses drawn beside loss_train: EveryDream2's extra validation sets are loss_valid_<name>.
LOSS_PREFIXES = ("loss_valid", "loss_train_stabilized")
LEARNING_RATES = ("lr", "lr_text_encoder")
REFLOW_METRICS = ("straightness", "one_vs_n_step_distance")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order. A line that is not a JSON object (the last
    line of a file being written, a line cut by a full disk) is skipped, not fatal."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


@dataclass(frozen=True)
class Curve:
    """One metric against the step: the finite points, and the steps where it was NaN or infinite."""

    steps: list[float]
    values: list[float]
    nonfinite_steps: list[float]


def number(value: Any) -> Optional[float]:
    """`value` as a float if it is a number (json reads NaN/Infinity as floats); bools and text are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def curve(records: Iterable[dict[str, Any]], key: str, x_key: str = "step") -> Curve:
    """`key` against `x_key` over the records that have both as numbers, sorted by `x_key`."""
    points, nonfinite = [], []
    for record in records:
        x, y = number(record.get(x_key)), number(record.get(key))
        if x is None or y is None or not math.isfinite(x):
            continue
        if math.isfinite(y):
            points.append((x, y))
        else:
            nonfinite.append(x)
    points.sort(key=lambda point: point[0])
    return Curve([x for x, _ in points], [y for _, y in points], sorted(nonfinite))


def smoothing_span(count: int) -> int:
    """How many points the smoothed loss averages over: the square root of their number (5 of 30,
    30 of 1,000, at most 200), so the trend shows at any run length without hiding its turns."""
    return max(1, min(200, round(math.sqrt(count))))


def exponential_average(values: Sequence[float], span: int) -> list[float]:
    """Debiased exponential moving average with weight 2/(span+1) on each new value (TensorBoard's
    smoothing): the first points are not pulled toward zero."""
    weight = 2.0 / (span + 1.0)
    average, total_weight, smoothed = 0.0, 0.0, []
    for value in values:
        average = (1.0 - weight) * average + weight * value
        total_weight = (1.0 - weight) * total_weight + weight
        smoothed.append(average / total_weight)
    return smoothed


def metric_keys(records: Iterable[dict[str, Any]]) -> set[str]:
    return {key for record in records for key in record}


def loss_keys(keys: set[str]) -> list[str]:
    """loss_valid first, then loss_valid_<name> and loss_train_stabilized, in name order."""
    return sorted((key for key in keys if key.startswith(LOSS_PREFIXES)), key=lambda key: (key != "loss_valid", key))


def use_log_scale_if_it_helps(axes: Any, values: Iterable[float]) -> None:
    """Log scale when every value is positive and they span more than a factor of 20 (losses
    that fall by orders of magnitude); linear otherwise."""
    values = [value for value in values if math.isfinite(value)]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        axes.set_yscale("log")


def smooth_by_stage(steps: Sequence[float], values: Sequence[float], span: int,
                    stage_ends: Iterable[float]) -> list[float]:
    """exponential_average restarted after each of `stage_ends`: a reflow stage trains on new pairs,
    and its loss can be orders of magnitude below the last stage's, which one average would smear."""
    smoothed: list[float] = []
    segment: list[float] = []
    ends = iter(sorted(stage_ends))
    end = next(ends, math.inf)
    for step, value in zip(steps, values):
        while step > end:
            smoothed += exponential_average(segment, span)
            segment, end = [], next(ends, math.inf)
        segment.append(value)
    return smoothed + exponential_average(segment, span)


def draw_losses(axes: Any, records: list[dict[str, Any]], label_prefix: str = "", color: Any = None,
                single_run: bool = True) -> list[float]:
    """loss_train smoothed (and, for a single run, raw and faint, with the ends of reflow stages
    marked), the validation losses as lines with markers, and a dotted line where loss_train was
    not finite. Returns the values drawn."""
    drawn: list[float] = []
    train = curve(records, "loss_train")
    stage_ends = curve(reflow_records(records), "reflow_stage").steps
    if train.values:
        span = smoothing_span(len(train.values))
        if single_run:
            axes.plot(train.steps, train.values, color=color or "C0", alpha=0.25, linewidth=0.8,
                      label=f"{label_prefix}loss_train (raw)")
        restarted = ", restarted each reflow stage" if stage_ends else ""
        axes.plot(train.steps, smooth_by_stage(train.steps, train.values, span, stage_ends), color=color or "C0",
                  linewidth=1.6, label=f"{label_prefix}loss_train (EMA, span {span} steps{restarted})")
        drawn += train.values
    for index, key in enumerate(loss_keys(metric_keys(records))):
        validation = curve(records, key)
        if validation.values:
            axes.plot(validation.steps, validation.values, marker="o", markersize=3, linestyle="--",
                      color=color or f"C{index + 1}", label=f"{label_prefix}{key}")
            drawn += validation.values
    for step in train.nonfinite_steps[:1]:  # a run stops at its first NaN: one line says where
        axes.axvline(step, color="red", linestyle=":", label=f"{label_prefix}loss_train not finite (step {step:g})")
    for index, step in enumerate(stage_ends if single_run else []):
        axes.axvline(step, color="gray", alpha=0.4, linewidth=0.8, label=None if index else "end of a reflow stage")
    return drawn


def draw_learning_rates(axes: Any, records: list[dict[str, Any]], label_prefix: str = "", color: Any = None) -> bool:
    drew = False
    for index, key in enumerate(LEARNING_RATES):
        rate = curve(records, key)
        if rate.values:
            axes.plot(rate.steps, rate.values, color=color or f"C{index}", linestyle="-" if index == 0 else "--",
                      label=f"{label_prefix}{key}")
            drew = True
    return drew


def reflow_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records reflow writes after each stage (difftrain.reflow.ReflowStages.after_epoch), with
    their stage; a record without `reflow_stage` (an older run) is numbered by its order."""
    measured = [record for record in records if any(key in record for key in REFLOW_METRICS)]
    return [{**record, "reflow_stage": record.get("reflow_stage", index)} for index, record in enumerate(measured)]


def draw_reflow(axes: Any, records: list[dict[str, Any]], label_prefix: str = "", color: Any = None) -> bool:
    drew, drawn = False, []
    stages = reflow_records(records)
    for index, (key, marker) in enumerate(zip(REFLOW_METRICS, ("o", "s"))):
        measured = curve(stages, key, x_key="reflow_stage")
        if measured.values:
            axes.plot(measured.steps, measured.values, marker=marker, color=color or f"C{index}",
                      linestyle="-" if index == 0 else "--", label=f"{label_prefix}{key}")
            drew, drawn = True, drawn + measured.values
    if drew:
        use_log_scale_if_it_helps(axes, drawn)
        axes.xaxis.get_major_locator().set_params(integer=True)
    return drew


def _panels(figure: Any, reflow: bool) -> tuple[Any, Any, Optional[Any]]:
    rows = 3 if reflow else 2
    grid = figure.add_gridspec(rows, 1, height_ratios=[2, 1, 1.2][:rows])
    losses = figure.add_subplot(grid[0])
    rates = figure.add_subplot(grid[1], sharex=losses)
    stages = figure.add_subplot(grid[2]) if reflow else None
    losses.set_ylabel("loss")
    rates.set_ylabel("learning rate")
    rates.set_xlabel("step")
    if stages is not None:
        stages.set_xlabel("reflow stage (0: before the first reflow)")
        stages.set_ylabel("after the stage")
    return losses, rates, stages


def _finish_panel(axes: Any, drew: bool, empty_text: str) -> None:
    if drew:
        entries = len(axes.get_legend_handles_labels()[0])
        crowded = entries > 8  # a sweep of many runs: smaller, in two columns
        axes.legend(fontsize="x-small" if crowded else "small", ncols=2 if crowded else 1)
    else:
        axes.text(0.5, 0.5, empty_text, ha="center", va="center", transform=axes.transAxes, color="gray")
    axes.grid(True, alpha=0.3)


def draw_curves(records: list[dict[str, Any]], title: str = "") -> Any:
    """One run's figure: losses, learning rates and (when the run has reflow stages) straightness and
    1-step vs N-step distance per stage. A run with no steps yet gives a figure that says so."""
    from difftrain.figures import new_figure

    reflow = bool(reflow_records(records))
    figure = new_figure(8.0, 8.5 if reflow else 6.0)
    losses, rates, stages = _panels(figure, reflow)
    drawn = draw_losses(losses, records)
    use_log_scale_if_it_helps(losses, drawn)
    _finish_panel(losses, bool(drawn), "no loss logged yet")
    _finish_panel(rates, draw_learning_rates(rates, records), "no learning rate logged yet")
    if stages is not None:
        _finish_panel(stages, draw_reflow(stages, records), "")
    if title:
        figure.suptitle(title)
    return figure


def draw_comparison(runs: Sequence[tuple[str, list[dict[str, Any]]]], title: str = "") -> Any:
    """Several runs in one figure, one colour per run, labelled by `runs`' names: smoothed
    loss_train with its validation losses, learning rates and reflow stages."""
    from difftrain.figures import new_figure

    reflow = any(reflow_records(records) for _, records in runs)
    figure = new_figure(9.0, 9.5 if reflow else 7.0)
    losses, rates, stages = _panels(figure, reflow)
    colors = [f"C{index % 10}" for index in range(len(runs))]
    drawn, drew_rates, drew_stages = [], False, False
    for (name, records), color in zip(runs, colors):
        # With several runs the raw loss is noise on noise: each run's smoothed curve only.
        drawn += draw_losses(losses, records, label_prefix=f"{name}: ", color=color, single_run=False)
        drew_rates |= draw_learning_rates(rates, records, label_prefix=f"{name}: ", color=color)
        if stages is not None:
            drew_stages |= draw_reflow(stages, records, label_prefix=f"{name}: ", color=color)
    use_log_scale_if_it_helps(losses, drawn)
    _finish_panel(losses, bool(drawn), "no loss logged yet")
    _finish_panel(rates, drew_rates, "no learning rate logged yet")
    if stages is not None:
        _finish_panel(stages, drew_stages, "")
    figure.suptitle(title or f"{len(runs)} runs")
    return figure


def draw_run_folder(run_dir: Path, also_into: Iterable[Optional[Path]] = ()) -> Optional[Any]:
    """Redraw <run_dir>/curves.png (and the same file in each folder of `also_into`) from
    <run_dir>/metrics.jsonl; returns the figure, or None when the run has no metrics.jsonl yet."""
    from difftrain.figures import save_figure

    metrics = Path(run_dir) / METRICS_FILE
    if not metrics.is_file():
        return None
    figure = draw_curves(read_metrics(metrics), title=Path(run_dir).name)
    drawn = Path(run_dir) / CURVES_FILE
    save_figure(figure, drawn)
    for folder in filter(None, also_into):  # rendered once (most of the cost), copied whole
        write_file_atomically(Path(folder) / CURVES_FILE, lambda temporary: shutil.copyfile(drawn, temporary))
    return figure


__all__ = ["CURVES_FILE", "METRICS_FILE", "draw_comparison", "draw_curves", "draw_run_folder", "read_metrics"]
