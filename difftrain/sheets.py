"""Pictures laid out on one sheet, with words: sample grids with each prompt under its column, and
sheets with a label on each row and column.

Text is drawn in DejaVu Sans, the font matplotlib ships inside its package (Latin with accents,
Greek, Cyrillic and many symbols), so no font has to be installed on the machine; without it, in
the font Pillow carries (`ImageFont.load_default(size=...)`, ASCII only). A character the font lacks
(Chinese or Japanese, say) comes out as an empty box; a prompt in any script never makes a drawing fail.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

PADDING = 4  # pixels around text
GUTTER = 8  # white pixels between the cells of a labelled sheet, wider than the gaps inside a cell
MAX_CAPTION_LINES = 6  # a very long prompt is cut after this many lines, ending in "..."
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def font_size_for(width: int) -> int:
    """A readable size for text under a picture `width` pixels wide (16 under a 512-pixel sample)."""
    return max(11, min(32, width // 32))


@functools.lru_cache(maxsize=8)
def load_font(size: int) -> Any:
    """DejaVu Sans at `size` from matplotlib's package; else Pillow's own scalable font; else (Pillow
    without FreeType) its fixed bitmap font."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _drawable(text: str, font: Any) -> str:
    """`text` as `font` can take it: the bitmap fallback font only knows Latin-1."""
    from PIL import ImageFont

    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def wrap_text(text: str, font: Any, width: int, max_lines: int = MAX_CAPTION_LINES) -> list[str]:
    """`text` in lines no wider than `width` pixels: broken between words, inside a word only when
    the word alone is too wide; at most `max_lines`, the last ending in "..." when text was cut."""
    text = _drawable(text, font)
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = word
            while font.getlength(line) > width and len(line) > 1:  # one word wider than the column
                cut = 1
                while cut < len(line) and font.getlength(line[:cut + 1]) <= width:
                    cut += 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines


def text_block(text: str, width: int, font_size: int, max_lines: int = MAX_CAPTION_LINES) -> Any:
    """A white strip `width` pixels wide with `text` wrapped and centred on it, as tall as it needs."""
    from PIL import Image, ImageDraw

    font = load_font(font_size)
    lines = wrap_text(text, font, max(1, width - 2 * PADDING), max_lines)
    line_height = _line_height(font)
    strip = Image.new("RGB", (width, len(lines) * line_height + 2 * PADDING), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for number, line in enumerate(lines):
        left = max(PADDING, (width - round(font.getlength(line))) // 2)
        draw.text((left, PADDING + number * line_height), line, font=font, fill=INK)
    return strip


def _line_height(font: Any) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom + max(2, bottom // 5)


def stack(images: Sequence[Any], *, vertical: bool = True) -> Any:
    """Images one below the other (or side by side), on white where their sizes differ."""
    from PIL import Image

    if vertical:
        size = (max(i.width for i in images), sum(i.height for i in images))
    else:
        size = (sum(i.width for i in images), max(i.height for i in images))
    sheet = Image.new("RGB", size, BACKGROUND)
    offset = 0
    for image in images:
        sheet.paste(image, (0, offset) if vertical else (offset, 0))
        offset += image.height if vertical else image.width
    return sheet


def captioned_columns(rows: Sequence[Sequence[Any]], captions: Sequence[str]) -> Any:
    """Images in rows (each row left to right, rows top to bottom; a last row may be short) with
    captions[c] written under column c. All images share the first image's size."""
    from PIL import Image

    width, height = rows[0][0].size
    columns = len(captions)
    font_size = font_size_for(width)
    strips = [text_block(caption, width, font_size) for caption in captions]
    strip_height = max(strip.height for strip in strips)
    sheet = Image.new("RGB", (columns * width, len(rows) * height + strip_height), BACKGROUND)
    for row_number, row in enumerate(rows):
        for column, image in enumerate(row):
            sheet.paste(image, (column * width, row_number * height))
    for column, strip in enumerate(strips):
        sheet.paste(strip, (column * width, len(rows) * height))
    return sheet


def labelled_sheet(cells: Sequence[Sequence[Any]], row_labels: Sequence[str], column_labels: Sequence[str]) -> Any:
    """A grid of pictures (cells[row][column], any sizes, GUTTER apart) with a label above each column
    and one left of each row, e.g. "before stage 1" / "after stage 1" by "1 step" / "16 steps"."""
    from PIL import Image

    column_widths = [max(row[c].width for row in cells) for c in range(len(column_labels))]
    row_heights = [max(cell.height for cell in row) for row in cells]
    font_size = font_size_for(min(column_widths) * 2)
    label_width = min(200, max(80, 8 * font_size))
    heads = [text_block(label, width, font_size, max_lines=2) for label, width in zip(column_labels, column_widths)]
    head_height = max(head.height for head in heads)
    lefts = [label_width + sum(column_widths[:c]) + c * GUTTER for c in range(len(column_widths))]
    tops = [head_height + sum(row_heights[:r]) + r * GUTTER for r in range(len(row_heights))]
    sheet = Image.new("RGB", (lefts[-1] + column_widths[-1], tops[-1] + row_heights[-1]), BACKGROUND)
    for head, left in zip(heads, lefts):
        sheet.paste(head, (left, 0))
    for row, label, top, height in zip(cells, row_labels, tops, row_heights):
        side = text_block(label, label_width, font_size, max_lines=4)
        sheet.paste(side, (0, top + max(0, (height - side.height) // 2)))
        for cell, left in zip(row, lefts):
            sheet.paste(cell, (left, top))
    return sheet


__all__ = ["captioned_columns", "font_size_for", "labelled_sheet", "load_font", "stack", "text_block", "wrap_text"]
