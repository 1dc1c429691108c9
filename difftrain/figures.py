"""Figures through matplotlib, drawn off-screen and never allowed to fail a run.

Each figure is a `matplotlib.figure.Figure` on its own Agg canvas instead of pyplot's global state:
no display is needed, nothing is shared between figures, and nothing leaks when a run draws
hundreds of them. Drawing happens on the main process only, at sample events, checkpoints and the
end of a run (never on the step path). A figure that cannot be drawn costs one warning line.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from difftrain.atomic_files import write_file_atomically

logger = logging.getLogger(__name__)


def new_figure(width_inches: float = 6.0, height_inches: float = 4.0, dpi: int = 100) -> Any:
    """A matplotlib Figure with its own Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_inches, height_inches), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_to_image(figure: Any) -> Any:
    """The figure rendered as a PIL RGB image (for wandb, TensorBoard and samples/ files)."""
    from PIL import Image

    canvas = figure.canvas
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")


def save_figure(figure: Any, path: Path) -> None:
    """Write `path` (format from its suffix) whole or not at all: a reader never sees half a PNG,
    and a figure redrawn at every checkpoint replaces the old one in a single rename (the temporary
    name is per process: `python -m difftrain.report` may redraw a running run's curves.png at the
    moment the run does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_format = path.suffix.lstrip(".") or "png"
    write_file_atomically(path, lambda temporary: figure.savefig(temporary, format=file_format))


@contextmanager
def drawing(what: str) -> Iterator[None]:
    """Run a drawing block; if it fails, log one warning naming `what` and carry on.

    A figure is a view of the run, not part of it: a missing font, a full disk or a NaN curve must
    never stop training or lose a checkpoint.
    """
    try:
        yield
    except Exception as error:  # noqa: BLE001 -- any drawing failure is only worth a warning
        logger.warning("could not draw %s: %s: %s", what, type(error).__name__, error)
