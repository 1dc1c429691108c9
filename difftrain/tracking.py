"""Run folders, run names and metrics: runs/<name>_<id>/ with metrics.jsonl, mirrored to wandb.

wandb runs offline by default, so nobody needs an account or a network. Offline wandb gives a
run no name, so we make one in wandb's style (adjective-noun-N) and an 8-character id.
With wandb off (EveryDream2's default), the metrics also go to TensorBoard event files in the
log folder, under the tags EveryDream2 writes, so `tensorboard --logdir logs` shows them as before.
`RunOutputs` gathers what one training run writes to: its run folder, tracker and log folder.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from difftrain.atomic_files import write_file_atomically
from difftrain.errors import ConfigError
from difftrain.figures import drawing

ADJECTIVES = (
    "amber", "ancient", "autumn", "bold", "brisk", "calm", "clever", "cosmic", "crimson", "curious",
    "dainty", "dashing", "dazzling", "distinctive", "eager", "elegant", "fearless", "fiery", "fluent",
    "gallant", "gentle", "glorious", "golden", "graceful", "hardy", "honest", "icy", "jolly", "keen",
    "lively", "lucky", "misty", "noble", "olive", "polished", "proud", "quiet", "rosy", "royal",
    "sage", "scarlet", "serene", "silver", "smooth", "solar", "spring", "stellar", "sunny", "swift",
    "treasured", "vibrant", "vivid", "wandering", "warm", "wise", "youthful", "zesty",
)
NOUNS = (
    "aurora", "bird", "blaze", "breeze", "brook", "butterfly", "cloud", "comet", "dawn", "dew",
    "dream", "durian", "eclipse", "elm", "feather", "fern", "field", "firefly", "flower", "fog",
    "forest", "frost", "galaxy", "glade", "grass", "haze", "hill", "lake", "leaf", "meadow", "moon",
    "morning", "mountain", "night", "ocean", "paper", "pine", "planet", "pond", "rain", "river",
    "sea", "shadow", "sky", "smoke", "snow", "sound", "spaceship", "star", "sun", "sunset", "thunder",
    "tree", "violet", "voice", "water", "wave", "wind", "wood",
)
RUN_ID_ALPHABET = string.ascii_lowercase + string.digits


def make_run_id() -> str:
    return "".join(secrets.choice(RUN_ID_ALPHABET) for _ in range(8))


def make_run_name(runs_dir: Path) -> str:
    """adjective-noun-N where N counts the runs already in runs_dir, like wandb's run number."""
    existing = sum(1 for entry in runs_dir.iterdir() if entry.is_dir()) if runs_dir.is_dir() else 0
    return f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}-{existing + 1}"


def write_json_exclusive(path: Path, data: Any) -> None:
    """Create `path` with JSON content, complete or not at all; never overwrite (FileExistsError)."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    write_file_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"), exclusive=True)


def check_output_folder(path: Union[str, Path], setting: str) -> None:
    """Raise ConfigError unless folder `path` exists or can be created, and can be written to.

    Creates nothing: it runs before training starts, so a mistake leaves no half-made run behind.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{setting} '{folder}' is a file, not a folder; set {setting} to a folder.")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{setting} '{folder}' cannot be created: '{existing}' is a file, not a folder. "
                          f"Set {setting} to a folder path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting} '{folder}' is not writable ('{existing}' is not writable by this user). "
                          f"Set {setting} to a writable folder.")


def check_output_folders(config: Any) -> None:
    """check_output_folder for every folder a run of `config` writes to."""
    for setting in ("logdir", "runs_dir", "cache_dir", "lora_dir", "save_ckpt_dir"):
        value = getattr(config, setting, "")
        if value:
            check_output_folder(value, setting)


def create_run_folder(runs_dir: Path, name: str, config: dict[str, Any]) -> tuple[Path, str]:
    """Make runs/<name>_<id>/ with config.json; retries on the (rare) id collision, never overwrites."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the runs folder '{runs_dir}': {error.strerror}. "
                          "Set runs_dir to a writable folder.") from None
    for _ in range(100):
        run_id = make_run_id()
        folder = runs_dir / f"{name}_{run_id}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise ConfigError(f"cannot create '{folder}': {error.strerror}. "
                              "Set runs_dir to a writable folder.") from None
        write_json_exclusive(folder / "config.json", config)
        return folder, run_id
    raise ConfigError(f"could not find a free run folder name under '{runs_dir}'.")


# Our metric -> EveryDream2's TensorBoard tag (train.py, every_dream_validation.py); other numbers
# go under "difftrain/<name>".
TENSORBOARD_TAGS = {"loss_train": "loss/log_step", "lr": "hyperparameter/lr unet",
                    "lr_text_encoder": "hyperparameter/lr text encoder", "loss_valid": "loss/val",
                    "loss_epoch": "loss/epoch"}


class TensorBoardLog:
    """Event files in `folder` through tensorboardX's FileWriter (the format torch's SummaryWriter
    writes, without the tensorboard package). Tags are written as given: tensorboardX's
    SummaryWriter would turn EveryDream2's "hyperparameter/lr unet" into "lr_unet"."""

    def __init__(self, folder: Path, config: dict[str, Any]):
        from tensorboardX import FileWriter
        from tensorboardX.summary import text

        self.writer = FileWriter(str(folder), flush_secs=20)
        self.writer.add_summary(text("config", json.dumps(config, indent=2)), 0)

    def log(self, metrics: dict[str, Any], step: int, images: Optional[dict[str, Any]]) -> None:
        import numpy
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import image

        values = [Summary.Value(tag=TENSORBOARD_TAGS.get(key, f"difftrain/{key}"), simple_value=float(value))
                  for key, value in metrics.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step")]
        if values:
            self.writer.add_summary(Summary(value=values), step)
        pictures = [picture for value in (images or {}).values()
                    for picture in (value if isinstance(value, list) else [value])]
        for index, picture in enumerate(pictures):
            pixels = numpy.asarray(picture.convert("RGB"))
            self.writer.add_summary(image(f"sample_{index:03}", pixels, dataformats="HWC"), step)

    def close(self) -> None:
        self.writer.close()


class Tracker:
    """metrics.jsonl in the run folder, plus wandb unless tracker is 'none', else TensorBoard
    event files in `log_folder` (when given).

    Only the main process makes a Tracker; other processes get a `NullTracker`.
    """

    def __init__(self, run_dir: Path, *, run_name: str, run_id: str, project: str,
                 config: dict[str, Any], use_wandb: bool, wandb_mode: str, log_folder: Optional[Path] = None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self._wandb = None
        self._tensorboard = TensorBoardLog(log_folder, config) if log_folder and not use_wandb else None
        if use_wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            # WANDB_MODE, when the user set it, wins over the config (the usual wandb convention).
            mode = os.environ.get("WANDB_MODE", wandb_mode)
            self._wandb = wandb.init(project=project, name=run_name, id=run_id, config=config,
                                     dir=str(run_dir), mode=mode, resume="allow")

    def log(self, metrics: dict[str, Any], *, step: int, images: Optional[dict[str, Any]] = None) -> None:
        """Append one event to metrics.jsonl and wandb. `images`: key -> PIL image or list of them."""
        record = {"step": step, **metrics}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            import wandb

            payload = dict(metrics)
            for key, value in (images or {}).items():
                items = value if isinstance(value, list) else [value]
                payload[key] = [wandb.Image(image) for image in items]
            self._wandb.log(payload, step=step)
        if self._tensorboard is not None:
            self._tensorboard.log(metrics, step, images)

    def close(self) -> None:
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullTracker:
    """What non-main processes log to: nothing."""

    def log(self, metrics: dict[str, Any], *, step: int, images: Optional[dict[str, Any]] = None) -> None:
        pass

    def close(self) -> None:
        pass


SAMPLES_PAGE = "samples.html"
SAMPLE_FILE = re.compile(r"(?P<key>.+)-gs(?P<step>\d+)\.png")


def sample_events(samples_folder: Path) -> list[tuple[int, list[str]]]:
    """(step, file names) of every picture in `samples_folder` named <key>-gs<step>.png, steps in
    order; within a step the keys sorted, each EMA picture (<key>_ema) right after its twin."""
    events: dict[int, list[tuple[str, bool, str]]] = {}
    for path in samples_folder.glob("*-gs*.png"):
        match = SAMPLE_FILE.fullmatch(path.name)
        if match:
            key = match["key"]
            order = (key.removesuffix("_ema"), key.endswith("_ema"), path.name)
            events.setdefault(int(match["step"]), []).append(order)
    return [(step, [name for *_, name in sorted(events[step])]) for step in sorted(events)]


def samples_page(events: list[tuple[int, list[str]]], title: str) -> str:
    """HTML showing each event's pictures under a heading with its step, oldest first."""
    from html import escape
    from urllib.parse import quote

    sections = []
    for step, names in events:
        figures = "\n".join(
            f'<figure><a href="samples/{quote(name)}"><img src="samples/{quote(name)}" alt="{escape(name)}"></a>'
            f"<figcaption>{escape(name)}</figcaption></figure>" for name in names)
        sections.append(f'<section id="step-{step}"><h2>step {step}</h2>\n<div class="event">\n{figures}\n</div></section>')
    body = "\n".join(sections) or "<p>no samples yet</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.event {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }}
figure {{ margin: 0; }} img {{ max-width: 100%; height: auto; }}
figcaption {{ font-size: small; color: #555; }}
</style></head>
<body><h1>{escape(title)}</h1>
{body}
</body></html>
"""


def write_samples_page(folder: Path) -> Path:
    """Rewrite folder/samples.html (atomically: a browser never sees half a page) over every picture
    in folder/samples, so the user can open it mid-run and scroll through training."""
    page = samples_page(sample_events(folder / "samples"), f"samples of {folder.name}")
    return write_file_atomically(folder / SAMPLES_PAGE, lambda temp: temp.write_text(page, encoding="utf-8"))


@dataclass(frozen=True)
class RunOutputs:
    """What a run writes to. The main process has them all; the others have (None, NullTracker(),
    None) and only the main process's log folder path, `main_log_folder` (e.g. where DeepSpeed's
    per-process checkpoint parts go)."""

    run_dir: Optional[Path]
    tracker: Any
    log_folder: Optional[Path]
    main_log_folder: Path

    def save_samples(self, samples: dict[str, Any], step: int) -> None:
        """A task's samples at `step`: each picture as samples/<key>-gs<step>.png in both folders and
        under its key in the tracker, with the numbers; samples.html in both folders shows them all."""
        from PIL import Image

        pictures = {key: value for key, value in samples.items() if isinstance(value, Image.Image)}
        numbers = {key: value for key, value in samples.items() if key not in pictures}
        encoded: dict[str, Path] = {}
        for folder in filter(None, (self.run_dir, self.log_folder)):
            (folder / "samples").mkdir(exist_ok=True)
            for key, image in pictures.items():
                target = folder / "samples" / f"{key}-gs{step:05d}.png"
                if key in encoded:  # PNG-encoded once, copied into the other folder
                    shutil.copyfile(encoded[key], target)
                else:
                    image.save(target)
                    encoded[key] = target
            if pictures:
                with drawing(f"{folder / SAMPLES_PAGE}"):
                    write_samples_page(folder)
        if pictures or numbers:
            # Each picture under its own key (samples, spectrum, samples_ema...): wandb shows one panel per kind.
            self.tracker.log(numbers, step=step, images=pictures or None)

    def draw_curves(self) -> None:
        """curves.png in the run folder and the log folder, redrawn from metrics.jsonl (main process;
        at checkpoints and at the end of a run, never on the step path). A failure is one warning."""
        from difftrain.curves import draw_run_folder

        if self.run_dir is not None:
            with drawing(f"the curves of {self.run_dir.name}"):
                draw_run_folder(self.run_dir, also_into=[self.log_folder])

    def close(self) -> None:
        """At the end of a run, finished, stopped or failed: the last curves, then the tracker."""
        try:
            self.draw_curves()
        finally:
            self.tracker.close()

    def summary(self, checkpoint_folder: Optional[Path]) -> str:
        """The lines printed when a run ends: where everything went."""
        lines = ["", "done."]
        if self.run_dir is not None:
            lines.append(f"run folder: {self.run_dir}")
            samples = ", samples/, samples.html (every sample event)" if (self.run_dir / SAMPLES_PAGE).is_file() else ""
            curves = ", curves.png" if (self.run_dir / "curves.png").is_file() else ""  # none if drawing failed
            lines.append(f"  config.json, state.pth, metrics.jsonl{curves}{samples}")
        if self.log_folder is not None:
            lines.append(f"log folder: {self.log_folder}")
        if checkpoint_folder is not None:
            lines.append(f"checkpoint: {checkpoint_folder}")
        return "\n".join(lines)


def open_run_outputs(config: Any, is_main: bool, decide_on_main: Callable[[Callable[[], str]], str]) -> RunOutputs:
    """Make the run folder (config.json), tracker and log folder (settings.json) on the main process
    alone -- one run name, one folder -- and tell every process the log folder's path."""
    from difftrain.checkpoint import new_log_folder
    from difftrain.log import say

    opened: dict[str, Any] = {}

    def open_on_main() -> str:
        runs_dir = Path(config.runs_dir)
        name = config.run_name or make_run_name(runs_dir)
        run_dir, run_id = create_run_folder(runs_dir, name, config.model_dump(mode="json"))
        log_folder = new_log_folder(Path(config.logdir), config.project_name)
        settings = config.model_dump_json(indent=2)
        write_file_atomically(log_folder / "settings.json", lambda temp: temp.write_text(settings, encoding="utf-8"))
        tracker = Tracker(run_dir, run_name=name, run_id=run_id, project=config.wandb_project or config.project_name,
                          config=config.model_dump(mode="json"), use_wandb=config.tracker == "wandb",
                          wandb_mode=config.wandb_mode, log_folder=log_folder)
        say(f"run folder: {run_dir}")
        opened.update(run_dir=run_dir, tracker=tracker, log_folder=log_folder)
        return str(log_folder)

    main_log_folder = Path(decide_on_main(open_on_main))
    if not is_main:
        return RunOutputs(None, NullTracker(), None, main_log_folder)
    return RunOutputs(opened["run_dir"], opened["tracker"], opened["log_folder"], main_log_folder)
