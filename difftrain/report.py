"""Redraw a run's figures from its metrics.jsonl, or overlay several runs: `python -m difftrain.report`.

    python -m difftrain.report runs/<name>_<id>              # -> runs/<name>_<id>/curves.png (+ samples.html)
    python -m difftrain.report logs/<project><timestamp>     # the run that log folder belongs to
    python -m difftrain.report --compare runs/a_x runs/b_y   # -> compare.png, one colour per run

Works on a finished run, a running one and one that stopped early: only metrics.jsonl is read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from difftrain import log
from difftrain.curves import CURVES_FILE, METRICS_FILE, draw_comparison, draw_curves, read_metrics
from difftrain.errors import ConfigError, exit_on_user_error

PROGRAM = "python -m difftrain.report"
DEFAULT_COMPARISON = "compare.png"


def parse_arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Draw a run's loss, learning-rate and reflow curves from its metrics.jsonl "
                                  "(curves.png in the run folder), or overlay several runs with --compare.")
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="a run folder (runs/<name>_<id>), its metrics.jsonl, or a log folder "
                             "(logs/<project><timestamp>)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                        help="draw these runs (and any RUN before) into one figure, labelled by run name")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write the figure (default: <run>/{CURVES_FILE}, or ./{DEFAULT_COMPARISON} "
                             "with --compare); the format follows the suffix (.png, .pdf, .svg)")
    arguments = parser.parse_args(argv)
    if not arguments.runs and not arguments.compare:
        parser.error("name a run folder, or several after --compare")
    return arguments


def run_name(run_dir: Path) -> str:
    """runs/<name>_<id> -> <name> (the name wandb shows); other folders keep their name."""
    name, _, run_id = run_dir.name.rpartition("_")
    return name if name and len(run_id) == 8 and run_id.isalnum() else run_dir.name


def _json_file(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_folder_of_log_folder(log_folder: Path, settings: dict[str, Any]) -> Optional[Path]:
    """The run folder made together with `log_folder`: under the settings' runs_dir, the run whose
    config.json holds the same settings; between equal ones (the same config run twice), the one
    whose config.json was written closest in time to settings.json."""
    runs_dir = Path(str(settings.get("runs_dir") or "runs")).expanduser()
    candidates_roots = [runs_dir]
    if not runs_dir.is_absolute():
        # The training ran where logdir led to this log folder: runs_dir is relative to that place.
        base = log_folder.resolve().parent
        for _ in Path(str(settings.get("logdir") or "logs")).parts:
            base = base.parent
        candidates_roots.insert(0, base / runs_dir)
    written = (log_folder / "settings.json").stat().st_mtime
    matches = []
    for root in dict.fromkeys(root.resolve() for root in candidates_roots):
        if not root.is_dir():
            continue
        for folder in root.iterdir():
            if (folder / METRICS_FILE).is_file() and _json_file(folder / "config.json") == settings:
                matches.append((abs((folder / "config.json").stat().st_mtime - written), folder))
    return min(matches)[1] if matches else None


def metrics_file(path: Path) -> Path:
    """The metrics.jsonl that `path` (a run folder, a metrics.jsonl, or a log folder) stands for;
    ConfigError saying what `path` is and what to pass instead."""
    if path.is_file() and path.name == METRICS_FILE:
        return path
    if not path.exists():
        raise ConfigError(f"'{path}' does not exist. Pass a run folder (runs/<name>_<id>) or a log folder "
                          "(logs/<project><timestamp>).")
    if not path.is_dir():
        raise ConfigError(f"'{path}' is a file, not a run folder. Pass a run folder (runs/<name>_<id>), its "
                          f"{METRICS_FILE}, or a log folder (logs/<project><timestamp>).")
    if (path / METRICS_FILE).is_file():
        return path / METRICS_FILE
    settings = _json_file(path / "settings.json")
    if settings is not None:
        run_dir = run_folder_of_log_folder(path, settings)
        if run_dir is None:
            raise ConfigError(
                f"'{path}' is a log folder, and log folders hold no {METRICS_FILE}: the metrics are in its run "
                f"folder, and no run under runs_dir '{settings.get('runs_dir')}' has this log folder's settings. "
                "Pass the run folder (runs/<name>_<id>) instead.")
        log.say(f"log folder '{path}' belongs to run folder '{run_dir}'")
        return run_dir / METRICS_FILE
    inside = sorted(child for child in path.iterdir() if (child / METRICS_FILE).is_file())
    if inside:
        raise ConfigError(f"'{path}' is a folder of runs ({len(inside)} found), not one run. Pass one of them "
                          f"(e.g. '{inside[0]}'), or all with --compare {path}/*.")
    raise ConfigError(f"'{path}' has no {METRICS_FILE}: it is not a run folder (runs/<name>_<id>) or a log "
                      "folder (logs/<project><timestamp>), or the run has not started training yet.")


def save(figure: Any, target: Path) -> None:
    from difftrain.figures import save_figure

    try:
        save_figure(figure, target)
    except OSError as error:
        raise ConfigError(f"cannot write '{target}': {error.strerror or error}. Pass --out a writable path.") from None


def draw_one(path: Path, out: Optional[Path]) -> Any:
    """Redraw the curves of the run at `path` into `out` (default: curves.png beside its metrics)."""
    metrics = metrics_file(path)
    records = read_metrics(metrics)
    figure = draw_curves(records, title=metrics.parent.name)
    target = out or metrics.parent / CURVES_FILE
    save(figure, target)
    steps = [record["step"] for record in records if isinstance(record.get("step"), int)]
    reached = f"up to step {max(steps)}" if steps else "no steps logged yet"
    log.say(f"{target}  ({len(records)} records, {reached})")
    if out is None and (metrics.parent / "samples").is_dir():
        # The page over the samples is the run's other view; redrawn too, for a run that stopped
        # before its last sample event rewrote it (or one started before the page existed).
        from difftrain.tracking import write_samples_page

        log.say(str(write_samples_page(metrics.parent)))
    return figure


def draw_several(paths: Sequence[Path], out: Optional[Path]) -> Any:
    """One figure of every run in `paths`, labelled by run name (by folder name where names repeat).
    A path that is no run (a sweep's run that has not started, a stray file of `runs/*`) is named
    and left out; ConfigError when none is left."""
    files, skipped = [], []
    for path in paths:
        try:
            files.append(metrics_file(path))
        except ConfigError as error:
            skipped.append(str(error))
    if not files:
        raise ConfigError("nothing to compare: " + " ".join(skipped))
    for reason in skipped:
        log.say(f"left out: {reason}")
    names = [run_name(metrics.parent) for metrics in files]
    if len(set(names)) < len(names):
        names = [metrics.parent.name for metrics in files]
    figure = draw_comparison([(name, read_metrics(metrics)) for name, metrics in zip(names, files)])
    target = out or Path(DEFAULT_COMPARISON)
    save(figure, target)
    log.say(f"{target}  ({len(files)} runs: {', '.join(names)})")
    return figure


def main(argv: Optional[Sequence[str]] = None) -> int:
    log.setup()
    arguments = parse_arguments(argv)
    with exit_on_user_error(PROGRAM):
        if arguments.compare is not None:
            draw_several([Path(run) for run in [*arguments.runs, *arguments.compare]], arguments.out)
            return 0
        if arguments.out is not None and len(arguments.runs) > 1:
            raise ConfigError(f"--out names one file, and {len(arguments.runs)} runs were given. Draw them one "
                              "at a time, or into one figure with --compare.")
        for run in arguments.runs:
            draw_one(Path(run), arguments.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
