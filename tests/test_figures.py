"""difftrain.figures: off-screen matplotlib figures that never fail a run."""

from __future__ import annotations

import logging

from PIL import Image

from difftrain.figures import drawing, figure_to_image, new_figure, save_figure


def test_a_figure_is_saved_whole_and_renders_to_an_image(tmp_path):
    figure = new_figure(4, 3, dpi=50)
    figure.add_subplot().loglog([1, 2, 4], [4, 2, 1])
    target = tmp_path / "nested" / "curves.png"
    save_figure(figure, target)
    save_figure(figure, target)  # redrawn at the next checkpoint: replaced, not appended to
    assert [path.name for path in target.parent.iterdir()] == ["curves.png"]
    with Image.open(target) as written:
        assert written.size == (200, 150)
    assert figure_to_image(figure).size == (200, 150)


def test_a_failed_drawing_is_one_warning_and_the_run_goes_on(caplog):
    caplog.set_level(logging.WARNING, logger="difftrain")
    with drawing("the spectrum"):
        raise ValueError("no finite values")
    assert [record.getMessage() for record in caplog.records] == [
        "could not draw the spectrum: ValueError: no finite values"]
