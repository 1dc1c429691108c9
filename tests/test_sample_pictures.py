"""Pictures a user looks at: sample grids with each prompt under its column, samples.html over every
sample event, and the before/after picture of each reflow stage."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from difftrain import sheets
from difftrain.engine import run
from difftrain.tracking import SAMPLES_PAGE, RunOutputs, sample_events
from tests.test_trainer import TINY_SIMULATION, only_run_folder, tiny_config, tiny_field_data  # noqa: F401  (fixture)

SIDE = 64
LONG_PROMPT = ("a very long prompt about a lighthouse on a cliff at dusk, waves crashing below, gulls in the "
               "sky, oil painting in the style of an old master, warm light, high detail")


def solid(shade: int) -> Image.Image:
    return Image.new("RGB", (SIDE, SIDE), (shade, 255 - shade, 128))


def ink(pixels: np.ndarray) -> int:
    """How many pixels are darker than the white background: text drawn there."""
    return int((pixels.min(axis=-1) < 128).sum())


# ---- grids with the prompt under each column ----------------------------------------------------------

def test_one_column_per_prompt_with_each_prompt_written_under_its_column():
    from difftrain.tasks.sd_parts.samples import prompt_columns

    images = [solid(40 * i) for i in range(5)]  # prompt i % 2: columns 0 1 0 1 0
    grid = np.asarray(prompt_columns(images, ["a red cube", "a lighthouse at dusk"]))
    assert grid.shape[1] == 2 * SIDE  # one column per prompt
    assert grid.shape[0] > 3 * SIDE  # three rows, then the captions
    for index in range(5):  # image i sits at row i // 2, column i % 2
        row, column = divmod(index, 2)
        assert (grid[row * SIDE:(row + 1) * SIDE, column * SIDE:(column + 1) * SIDE] == np.asarray(images[index])).all()
    assert (grid[2 * SIDE:3 * SIDE, SIDE:] == 255).all()  # the short last row leaves its second cell blank
    captions = grid[3 * SIDE:]
    assert ink(captions[:, :SIDE]) > 0 and ink(captions[:, SIDE:]) > 0


def test_long_prompts_wrap_into_a_taller_strip_and_fewer_prompts_than_samples_make_fewer_columns():
    from difftrain.tasks.sd_parts.samples import prompt_columns

    short = prompt_columns([solid(0), solid(90)], ["cat", "dog"])
    long = prompt_columns([solid(0), solid(90)], ["cat", LONG_PROMPT])
    three = prompt_columns([solid(0), solid(90), solid(180)], ["cat", "dog", "owl", "unused"])
    assert short.width == long.width == 2 * SIDE and three.width == 3 * SIDE
    assert long.height > short.height  # wrapped over several lines, not cut off at the column's edge
    font = sheets.load_font(sheets.font_size_for(SIDE))
    lines = sheets.wrap_text(LONG_PROMPT, font, SIDE - 2 * sheets.PADDING)
    assert 1 < len(lines) <= sheets.MAX_CAPTION_LINES and lines[-1].endswith("...")
    assert all(font.getlength(line) <= SIDE - 2 * sheets.PADDING for line in lines)


def test_a_word_wider_than_the_column_is_broken_inside_it():
    font = sheets.load_font(12)
    lines = sheets.wrap_text("x" * 60, font, 50, max_lines=50)
    assert len(lines) > 1 and "".join(lines) == "x" * 60
    assert all(font.getlength(line) <= 50 for line in lines)


@pytest.mark.parametrize("bitmap_font", [False, True])
def test_prompts_in_any_script_are_drawn_without_failing(monkeypatch, bitmap_font):
    from difftrain.tasks.sd_parts.samples import prompt_columns

    if bitmap_font:  # Pillow without FreeType: its bitmap font only knows Latin-1
        monkeypatch.setattr(sheets, "load_font", lambda size: ImageFont.load_default_imagefont())
    grid = np.asarray(prompt_columns([solid(0), solid(90), solid(180)], ["猫の写真 🐱", "café naïve, Ωμέγα", ""]))
    captions = grid[SIDE:]
    assert all(ink(captions[:, c * SIDE:(c + 1) * SIDE]) > 0 for c in range(3))  # "" reads "(empty prompt)"


def test_captions_that_cannot_be_drawn_leave_the_samples_and_one_warning(monkeypatch, caplog):
    from difftrain.tasks.sd_parts.samples import prompt_columns

    def broken(size):
        raise OSError("font file vanished")

    monkeypatch.setattr(sheets, "load_font", broken)
    grid = prompt_columns([solid(0), solid(90), solid(180)], ["cat", "dog"])
    assert grid.size == (2 * SIDE, 2 * SIDE)
    assert (np.asarray(grid)[SIDE:, :SIDE] == np.asarray(solid(180))).all()
    assert len([r for r in caplog.records if "font file vanished" in r.getMessage()]) == 1


def test_the_font_has_accented_latin_greek_and_cyrillic_letters():
    font = sheets.load_font(16)
    missing = bytes(font.getmask("\ue000"))  # a private-use character: no font has it, it draws the empty box
    for letter in "éïçßΩжø":
        assert bytes(font.getmask(letter)) != missing, letter


def test_labelled_sheet_puts_labels_above_columns_and_left_of_rows():
    cells = [[solid(0), solid(60)], [solid(120), solid(180)]]
    sheet = np.asarray(sheets.labelled_sheet(cells, ["before stage 1", "after stage 1"], ["1 step", "8 steps"]))
    height, width = sheet.shape[:2]
    gutter = sheets.GUTTER
    label_width, head_height = width - 2 * SIDE - gutter, height - 2 * SIDE - gutter
    assert label_width > 0 and head_height > 0
    assert (sheet[head_height:head_height + SIDE, label_width:label_width + SIDE] == np.asarray(cells[0][0])).all()
    assert (sheet[-SIDE:, -SIDE:] == np.asarray(cells[1][1])).all()
    assert (sheet[head_height:, label_width + SIDE:label_width + SIDE + gutter] == 255).all()  # white between cells
    assert ink(sheet[:head_height, label_width:label_width + SIDE]) > 0  # "1 step"
    assert ink(sheet[:head_height, -SIDE:]) > 0  # "8 steps"
    assert ink(sheet[head_height:head_height + SIDE, :label_width]) > 0  # "before stage 1"
    assert ink(sheet[-SIDE:, :label_width]) > 0  # "after stage 1"


# ---- samples.html --------------------------------------------------------------------------------------

class RecordingTracker:
    def __init__(self):
        self.calls = []

    def log(self, metrics, *, step, images=None):
        self.calls.append((step, dict(metrics), sorted(images or {})))


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_samples_html_shows_every_event_in_step_order_and_is_rewritten_at_each_event(tmp_path):
    run_dir, log_folder = tmp_path / "run", tmp_path / "log"
    run_dir.mkdir()
    log_folder.mkdir()
    tracker = RecordingTracker()
    outputs = RunOutputs(run_dir, tracker, log_folder, log_folder)
    outputs.save_samples({"samples": solid(0), "samples_ema": solid(50), "band_score": 0.5}, 20)
    first = (log_folder / SAMPLES_PAGE).read_text(encoding="utf-8")
    assert image_sources(first) == ["samples/samples-gs00020.png", "samples/samples_ema-gs00020.png"]
    # An earlier step arriving later (a resumed run's folder) still comes first; EMA right after its twin.
    outputs.save_samples({"spectrum": solid(90), "samples": solid(10), "samples_ema": solid(60)}, 100)
    outputs.save_samples({"samples": solid(20), "a&b": solid(30)}, 5)
    for folder in (run_dir, log_folder):
        page = (folder / SAMPLES_PAGE).read_text(encoding="utf-8")
        assert image_sources(page) == [
            "samples/a%26b-gs00005.png", "samples/samples-gs00005.png",
            "samples/samples-gs00020.png", "samples/samples_ema-gs00020.png",
            "samples/samples-gs00100.png", "samples/samples_ema-gs00100.png", "samples/spectrum-gs00100.png"]
        assert [int(step) for step in re.findall(r"<h2>step (\d+)</h2>", page)] == [5, 20, 100]
        assert "a&amp;b-gs00005.png" in page and "a&b-gs" not in page.replace('src="samples/a%26b', "")
        for source in image_sources(page):  # relative paths that resolve from the page's folder
            assert (folder / source.replace("%26", "&")).is_file()
        assert not [path for path in folder.iterdir() if path.name.startswith(".")]  # no temp files left
    # Both folders hold the same picture under each name, and it is the one passed for that key.
    for name in ("samples-gs00020.png", "samples_ema-gs00100.png", "a&b-gs00005.png"):
        assert (run_dir / "samples" / name).read_bytes() == (log_folder / "samples" / name).read_bytes()
    with Image.open(log_folder / "samples" / "samples_ema-gs00100.png") as picture:
        assert picture.convert("RGB").getpixel((0, 0)) == solid(60).convert("RGB").getpixel((0, 0))
    assert [call[0] for call in tracker.calls] == [20, 100, 5]
    assert tracker.calls[0][1] == {"band_score": 0.5} and tracker.calls[0][2] == ["samples", "samples_ema"]


def test_sample_events_ignores_files_it_did_not_name(tmp_path):
    (tmp_path / "samples-gs00003.png").write_bytes(b"")
    (tmp_path / "notes.png").write_bytes(b"")
    (tmp_path / "x-gs12.jpg").write_bytes(b"")
    assert sample_events(tmp_path) == [(3, ["samples-gs00003.png"])]


# ---- Stable Diffusion samples through the task -----------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_sd_samples_write_each_prompt_under_its_column(tiny_sd15, tmp_path):
    from difftrain.config import validate_config_dict
    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    data = tmp_path / "data"
    data.mkdir()
    for index in range(2):
        Image.fromarray(np.full((SIDE, SIDE, 3), 60 * index + 40, np.uint8)).save(data / f"img{index}.png")
        (data / f"img{index}.txt").write_text(f"thing {index}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n猫の写真\n", encoding="utf-8")
    config = validate_config_dict({
        "task": "sd", "mode": "Full", "resume_ckpt": str(tiny_sd15), "data_root": str(data), "resolution": SIDE,
        "batch_size": 1, "sample_inference_steps": 1, "num_samples": 3, "sample_prompts": str(prompts),
        "tracker": "none", "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"), "cache_dir": ""})
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)
    task = SDTask(config, cpu, StartPoint(base=str(tiny_sd15)))
    grid = np.asarray(task.parts.samples.samples(task.model)["samples"])
    assert grid.shape[1] == 2 * SIDE and grid.shape[0] > 2 * SIDE  # 3 samples of 2 prompts: 2 columns, 2 rows
    assert grid[:SIDE, :SIDE].std() > 0 and grid[:SIDE, SIDE:].std() > 0  # generated pictures on top
    assert ink(grid[2 * SIDE:, :SIDE]) > 0 and ink(grid[2 * SIDE:, SIDE:]) > 0
    # The reflow picture's cells: latent flow states decoded by the VAE, a batch to a row.
    noise, _ = task.reflow.flow_probe()
    rows = task.reflow.render_flow_states([noise, torch.zeros_like(noise)])
    assert [row.size for row in rows] == [(len(noise) * SIDE, SIDE)] * 2
    assert np.asarray(rows[0]).std() > np.asarray(rows[1]).std()


# ---- reflow: 1 step beside N steps, before and after each stage ----------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_each_reflow_stage_leaves_a_picture_of_before_and_after(tmp_path, tiny_field_data):  # noqa: F811
    from difftrain.tasks.kolmogorov import KolmogorovTask

    # configs/quickstart_reflow.json's shape (stage 0, then reflow stages) at the tests' tiny size.
    settings = dict(rectified_flow=True, reflow_steps=2, reflow_gen_batches=1, reflow_train_epochs=1,
                    max_steps=2, reflow_sample_steps=2)
    assert run(tiny_config(tmp_path, tiny_field_data, **settings)) == 0
    (log_folder,) = (tmp_path / "logs").iterdir()
    run_folder = only_run_folder(tmp_path)
    events = [json.loads(line) for line in (run_folder / "metrics.jsonl").open()]
    stage_ends = {event["reflow_stage"]: event["step"] for event in events if "straightness" in event}
    # One cell: the first states of the first 4 probe trajectories, as the task draws them.
    config = tiny_config(tmp_path, tiny_field_data, **settings)
    probe = torch.zeros(4, 2 * config.window, TINY_SIMULATION["size"], TINY_SIMULATION["size"])
    cell = KolmogorovTask.render_flow_states(SimpleNamespace(config=config), [probe])[0]
    for stage in (1, 2):
        assert (log_folder / "reflow" / f"reflow_stage_{stage:02d}" / "probe_before_stage.safetensors").is_file()
        for folder in (run_folder, log_folder):
            picture = Image.open(folder / "samples" / f"reflow_stage{stage}-gs{stage_ends[stage]:05d}.png")
            assert picture.width > 2 * cell.width and 2 * cell.height < picture.height < 3 * cell.height
            pixels = np.asarray(picture)
            label_width = picture.width - 2 * cell.width - sheets.GUTTER
            head_height = picture.height - 2 * cell.height - sheets.GUTTER
            assert ink(pixels[head_height:head_height + cell.height, :label_width]) > 0  # "before stage k"
            assert ink(pixels[-cell.height:, :label_width]) > 0  # "after stage k"
            before = pixels[head_height:head_height + cell.height, label_width:]
            after = pixels[-cell.height:, label_width:]
            assert before.std() > 0 and after.std() > 0 and not np.array_equal(before, after)
        page = (log_folder / SAMPLES_PAGE).read_text(encoding="utf-8")
        assert f'src="samples/reflow_stage{stage}-gs{stage_ends[stage]:05d}.png"' in page
    assert not list((log_folder / "samples").glob("reflow_stage0-*"))  # stage 0 has no "before"


@pytest.mark.usefixtures("one_thread")
def test_a_failing_stage_picture_is_one_warning_not_a_failed_run(tmp_path, tiny_field_data, monkeypatch,  # noqa: F811
                                                                 caplog):
    from difftrain.tasks.kolmogorov import KolmogorovTask

    def broken(self, batches):
        raise RuntimeError("no colours today")

    monkeypatch.setattr(KolmogorovTask, "render_flow_states", broken)
    settings = {"rectified_flow": True, "reflow_steps": 1, "reflow_gen_batches": 1, "max_steps": 2,
                "reflow_sample_steps": 2}
    assert run(tiny_config(tmp_path, tiny_field_data, **settings)) == 0
    warnings = [record.getMessage() for record in caplog.records if "no colours today" in record.getMessage()]
    assert len(warnings) == 1 and "reflow stage 1" in warnings[0]
    assert (only_run_folder(tmp_path) / "state.pth").is_file()

