"""Image folders for Stable Diffusion fine-tuning: scanning, captions, and a bucketed Dataset.

Captions follow EveryDream2 and TrainTrain: a ``.txt`` sidecar beside the image wins over a
``.caption`` sidecar, and a ``.yaml``/``.yml`` sidecar's ``main_prompt`` over both; without any,
the file name up to the first ``_`` is the caption (``a cat_001.png`` -> ``a cat``). An optional
trigger word is put in front (TrainTrain's ``lora_trigger_word``).

EveryDream2's folder conventions (its doc/DATA.md, data/dataset.py) hold too:

* a caption is a main prompt and comma-separated tags: ``a photo of x, smiling, outdoors``; with
  shuffle_tags the tags after the main prompt are reshuffled each epoch (keep_tags of them stay
  in place); tags with weights (yaml) are drawn weighted, up to ``max_caption_length`` characters;
* per folder: ``multiply.txt`` (repeats per epoch; a fraction is drawn anew each epoch),
  ``flip_p.txt``, ``cond_dropout.txt``, ``loss_scale.txt``, ``batch_id.txt`` (images batched only
  with their own batch id), ``shuffle_tags.txt`` (its presence turns shuffling on), and
  ``local.yaml`` with any of those keys plus ``main_prompt`` and ``tags``;
* ``global.yaml`` applies to its folder and every folder below; an image's own sidecar beats its
  folder's files, which beat the global.yaml files (a nearer global.yaml beats a farther one);
  tags add up over the levels;
* ``data_root`` may be a ``.json`` file: a list of items ``{"image": path, "caption": ...}`` or
  with the yaml keys (relative image paths are read from the working folder, else beside the file);
* hidden files and folders (a leading ``.``) are skipped; images are .jpg .jpeg .png .bmp .webp
  .jfif in any case.

Damaged images are found when the folder is scanned, not hours into training: each is probed
cheaply, the bad ones are reported together in one warning and left out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from difftrain.data.buckets import Bucket, mix_seed
from difftrain.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".jfif"})
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")  # in order of precedence

# EXIF orientations 5-8 rotate by 90 degrees, so the displayed image has width and height swapped.
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATIONS_THAT_SWAP_SIDES = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class Tag:
    """One caption tag; tags of higher weight are drawn earlier when weights differ."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class ImageItem:
    """One training image: where it is, its caption, and its size as displayed (EXIF applied).

    The other fields are EveryDream2's per-image settings (None: the run's own value).
    ``main_prompt`` and ``tags`` are the caption's parts, used when tags are shuffled.
    """

    path: Path
    caption: str
    width: int
    height: int
    main_prompt: str = ""
    tags: tuple[Tag, ...] = ()
    max_caption_length: int | None = None
    multiply: float = 1.0
    flip_p: float | None = None
    cond_dropout: float | None = None
    loss_scale: float = 1.0
    batch_id: str = ""
    shuffle_tags: bool = False
    rating: float = 1.0


def scan_image_folder(
    data_root: str | os.PathLike[str],
    *,
    trigger_word: str = "",
    caption_from_filename: bool = True,
    setting_name: str = "data_root",
) -> list[ImageItem]:
    """Find every readable image under ``data_root`` (recursively) with its caption and settings.

    Args:
        data_root: the folder of training images (sub-folders are searched too), or a ``.json``
            list of items (see the module docstring).
        trigger_word: put in front of every caption as ``"<trigger>, <caption>"``.
        caption_from_filename: without a sidecar, use the file name up to the first ``_``;
            when False such images get an empty caption (plus the trigger word).
        setting_name: the config key that named ``data_root``, for error messages
            (``data_root`` for train.py, ``lora_data_directory`` for train_j.py).

    Returns:
        Items sorted by path relative to ``data_root`` (a stable order for seeded shuffles); a
        .json list keeps its own order.

    Raises:
        ConfigError: the folder is missing, holds no images, or none of them can be read; a
            caption file is not UTF-8 (all such files are named at once); a settings file is
            malformed.
    """
    root = Path(data_root).expanduser()
    from_list = root.is_file() and root.suffix.lower() == ".json"
    if from_list:
        entries = _json_list_entries(root, setting_name)
    else:
        _check_folder(root, data_root, setting_name)
        entries = _folder_entries(root)
    if not entries:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ConfigError(
            f"{setting_name} '{root}' contains no images ({extensions}, searched recursively); "
            f"copy your training images into it or point {setting_name} at the right folder"
        )

    items: list[ImageItem] = []
    damaged: list[tuple[Path, str]] = []
    badly_encoded: list[tuple[Path, str]] = []
    for path, lower_levels in entries:
        probe = _probe_image(path)
        if isinstance(probe, str):
            damaged.append((path, probe))
            continue
        try:
            # A .json list item's own keys beat the image's sidecars; in a folder the sidecars win.
            own = _sidecar_settings(path)
            settings = lower_levels.over(own) if from_list else own.over(lower_levels)
        except _CaptionEncodingError as error:
            badly_encoded.append((error.path, error.detail))
            continue
        width, height = probe
        items.append(_item(path, width, height, settings, caption_from_filename, trigger_word))

    if badly_encoded:
        listing = "\n".join(f"  {path}: {detail}" for path, detail in badly_encoded)
        raise ConfigError(
            f"{len(badly_encoded)} caption file(s) are not UTF-8 text:\n{listing}\n"
            "open each in a text editor and save it with the UTF-8 encoding"
        )
    if damaged:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in damaged)
        logger.warning("skipping %d unreadable image(s) under %s:\n%s", len(damaged), root, listing)
    if not items:
        raise ConfigError(
            f"none of the {len(entries)} image(s) under {setting_name} '{root}' could be read "
            "(all are empty, truncated or not images, see the warning above); replace them with "
            "working copies"
        )
    return items


def _check_folder(root: Path, data_root: str | os.PathLike[str], setting_name: str) -> None:
    if not root.exists():
        raise ConfigError(
            f"{setting_name} {str(root)!r} does not exist; create it and put your training images in "
            f"it, or set {setting_name} to the folder that holds them"
            + _backslash_hint(str(data_root))
        )
    if not root.is_dir():
        raise ConfigError(
            f"{setting_name} '{root}' is a file, not a folder; set {setting_name} to the folder "
            "holding the images, or to a .json list of images"
        )


def _item(path: Path, width: int, height: int, settings: "ItemSettings", caption_from_filename: bool,
          trigger_word: str) -> ImageItem:
    main = settings.main_prompt
    if main is None:
        # EveryDream2 falls back to the file name, itself read as "main prompt, tags".
        fallback = _split_caption(path.stem.split("_", 1)[0]) if caption_from_filename else ItemSettings(main_prompt="")
        settings = settings.over(fallback)
        main = settings.main_prompt or ""
    tags = tuple(sorted(settings.tags, key=lambda tag: -tag.weight))  # stable: equal weights keep their order
    caption = ", ".join([main, *(tag.text for tag in tags)]) if tags else main
    return ImageItem(
        path=path, caption=add_trigger_word(caption, trigger_word), width=width, height=height,
        main_prompt=add_trigger_word(main, trigger_word), tags=tags,
        max_caption_length=settings.max_caption_length,
        multiply=1.0 if settings.multiply is None else settings.multiply,
        flip_p=settings.flip_p, cond_dropout=settings.cond_dropout,
        loss_scale=1.0 if settings.loss_scale is None else settings.loss_scale,
        batch_id=settings.batch_id or "", shuffle_tags=bool(settings.shuffle_tags),
        rating=settings.rating or 1.0)  # EveryDream2 reads a rating of 0 as 1 too ("rating or 1.0")


def caption_for_image(image_path: Path, *, caption_from_filename: bool = True) -> str:
    """The caption of one image from its own sidecars or name (no folder settings, no trigger word)."""
    item = _item(image_path, 1, 1, _sidecar_settings(image_path), caption_from_filename, "")
    return item.caption


def read_caption_file(path: Path) -> str:
    """A caption file's text with runs of whitespace (newlines too) folded into one space.

    UTF-8 with or without a byte-order mark is read; so is UTF-16 with a byte-order mark (what
    Windows Notepad calls "Unicode"), since the mark makes it unambiguous.

    Raises:
        ConfigError: the file is neither (e.g. saved as Latin-1 or Shift-JIS).
    """
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise _CaptionEncodingError(
            path, f"byte 0x{raw[error.start]:02x} at offset {error.start} is not valid {error.encoding}"
        ) from None
    return " ".join(text.split())


def add_trigger_word(caption: str, trigger_word: str) -> str:
    """``"<trigger>, <caption>"``; left alone when the caption already starts with the trigger."""
    trigger = trigger_word.strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if re.match(re.escape(trigger) + r"(\W|$)", caption):
        return caption
    return f"{trigger}, {caption}"


class _CaptionEncodingError(ConfigError):
    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"caption file '{path}' is not UTF-8 text ({detail}); open it in a text editor and "
            "save it with the UTF-8 encoding"
        )
        self.path = path
        self.detail = detail


def _backslash_hint(path_text: str) -> str:
    # JSON reads the single backslashes of x:\new\tiles as a newline and a tab.
    if any(ord(char) < 32 for char in path_text):
        return (
            "; the path contains a control character, the mark of a single backslash in a JSON "
            "string: write Windows paths with / or doubled \\\\ (\"x:/mydata\")"
        )
    return ""


# --------------------------------------------------------------------------------------------
# EveryDream2's settings files: sidecars, folder files, local.yaml, global.yaml, .json lists

SETTING_KEYS = ("main_prompt", "tags", "caption", "rating", "max_caption_length", "multiply", "flip_p",
                "cond_dropout", "loss_scale", "batch_id", "shuffle_tags")
FOLDER_NUMBER_FILES = {"multiply.txt": "multiply", "flip_p.txt": "flip_p", "cond_dropout.txt": "cond_dropout",
                       "loss_scale.txt": "loss_scale"}


@dataclass(frozen=True)
class ItemSettings:
    """One level's settings (an image's sidecars, a folder's files, a global.yaml); None: not set here."""

    main_prompt: str | None = None
    tags: tuple[Tag, ...] = ()
    max_caption_length: int | None = None
    multiply: float | None = None
    flip_p: float | None = None
    cond_dropout: float | None = None
    loss_scale: float | None = None
    batch_id: str | None = None
    shuffle_tags: bool | None = None
    rating: float | None = None

    def over(self, lower: "ItemSettings") -> "ItemSettings":
        """These settings where set, else ``lower``'s; tags add up (these first, no repeats)."""
        merged = {f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(lower, f.name)
                  for f in fields(self) if f.name != "tags"}
        seen = {tag.text for tag in self.tags}
        return ItemSettings(**merged, tags=self.tags + tuple(t for t in lower.tags if t.text not in seen))


def _split_caption(text: str) -> ItemSettings:
    """``"main, tag, tag"`` -> main prompt and tags (EveryDream2 splits every caption on commas)."""
    parts = [part.strip() for part in text.split(",")]
    return ItemSettings(main_prompt=parts[0], tags=tuple(Tag(part) for part in parts[1:] if part))


def _sidecar_settings(image: Path) -> ItemSettings:
    settings = ItemSettings()
    for extension in CAPTION_EXTENSIONS:
        sidecar = image.with_suffix(extension)
        if sidecar.is_file():
            settings = _split_caption(read_caption_file(sidecar))
            break
    for extension in (".yml", ".yaml"):  # .yaml beats .yml beats the text sidecars, as in EveryDream2
        sidecar = image.with_suffix(extension)
        if sidecar.is_file():
            settings = _settings_from_mapping(_read_yaml(sidecar), str(sidecar)).over(settings)
    return settings


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"'{path}' is not UTF-8 text; save it with the UTF-8 encoding") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"'{path}' is not valid YAML ({error}); fix it or remove it") from None


def _settings_from_mapping(data: Any, where: str) -> ItemSettings:
    """Settings from a yaml file or a .json list item (EveryDream2's keys, checked)."""
    if data is None:
        return ItemSettings()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected keys like main_prompt and tags, got {type(data).__name__}")
    from difftrain.config import did_you_mean

    for key in data:
        if key not in SETTING_KEYS and key != "image":
            raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(str(key), list(SETTING_KEYS))} "
                              f"Known keys: {', '.join(SETTING_KEYS)}")
    values: dict[str, Any] = {}
    for key in ("multiply", "flip_p", "cond_dropout", "loss_scale"):
        if data.get(key) is not None:
            values[key] = _number(data[key], f"{where}: {key}")
    if data.get("rating") is not None:
        values["rating"] = _number(data["rating"], f"{where}: rating")
    if data.get("max_caption_length") is not None:
        values["max_caption_length"] = int(_number(data["max_caption_length"], f"{where}: max_caption_length"))
    if data.get("batch_id") is not None:
        values["batch_id"] = str(data["batch_id"]).strip()
    if data.get("shuffle_tags") is not None:
        values["shuffle_tags"] = bool(data["shuffle_tags"])
    main = data.get("main_prompt")
    settings = ItemSettings(main_prompt=None if main is None else " ".join(str(main).split()),
                            tags=tuple(_tag(entry, where) for entry in data.get("tags") or []), **values)
    if data.get("caption"):
        settings = settings.over(_split_caption(" ".join(str(data["caption"]).split())))
    return settings


def _tag(entry: Any, where: str) -> Tag:
    if isinstance(entry, dict) and "tag" in entry:
        weight = entry.get("weight")
        return Tag(str(entry["tag"]).strip(), 1.0 if weight is None else _number(weight, f"{where}: tag weight"))
    if isinstance(entry, (str, int, float)):
        return Tag(str(entry).strip())
    raise ConfigError(f"{where}: a tag is a text or {{tag: text, weight: number}}, got {entry!r}")


def _number(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where}: expected a number of 0 or more, got {value!r}")
    return number


def _folder_settings(folder: Path, names: set[str]) -> tuple[ItemSettings, ItemSettings]:
    """(local, global) settings of one folder from its multiply.txt ... local.yaml, global.yaml."""
    values: dict[str, Any] = {}
    for name, key in FOLDER_NUMBER_FILES.items():
        if name in names:
            values[key] = _number(_read_text(folder / name).strip(), str(folder / name))
    if "batch_id.txt" in names:
        values["batch_id"] = _read_text(folder / "batch_id.txt").strip()
    if "shuffle_tags.txt" in names:
        values["shuffle_tags"] = True
    local = ItemSettings(**values)
    for name in ("local.yml", "local.yaml"):  # a folder's own files beat each other in this order
        if name in names:
            local = _settings_from_mapping(_read_yaml(folder / name), str(folder / name)).over(local)
    own_global = ItemSettings()
    for name in ("global.yml", "global.yaml"):
        if name in names:
            own_global = _settings_from_mapping(_read_yaml(folder / name), str(folder / name)).over(own_global)
    return local, own_global


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"'{path}' is not UTF-8 text; save it with the UTF-8 encoding") from None


def _folder_entries(root: Path) -> list[tuple[Path, ItemSettings]]:
    """Every image under ``root`` with its folder's settings over the global.yaml chain above it."""
    found: list[tuple[Path, ItemSettings]] = []
    globals_of: dict[str, ItemSettings] = {}
    visited_dirs: set[str] = set()
    # followlinks: datasets are often symlinked in; the realpath set stops symlink loops.
    for directory, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited_dirs:
            subdirs[:] = []
            continue
        visited_dirs.add(real)
        # Hidden entries are tool droppings (.ipynb_checkpoints, macOS "._x.png" forks), not data.
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        names = {name for name in files if not name.startswith(".")}
        local, own_global = _folder_settings(Path(directory), names)
        inherited = own_global.over(globals_of.get(os.path.dirname(directory), ItemSettings()))
        globals_of[directory] = inherited
        level = local.over(inherited)
        for name in names:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((Path(directory) / name, level))
    return sorted(found, key=lambda entry: entry[0].relative_to(root).as_posix())


def _json_list_entries(path: Path, setting_name: str) -> list[tuple[Path, ItemSettings]]:
    """EveryDream2's data_root as a .json file: a list of {"image": path, caption or yaml keys}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{setting_name} '{path}' is not a readable JSON list ({error})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{setting_name} '{path}': expected a list of items like "
                          '{"image": "a.png", "caption": "a cat"}, got a JSON ' + type(data).__name__)
    entries = []
    for number, entry in enumerate(data):
        where = f"{path}: item {number}"
        if not isinstance(entry, dict) or not entry.get("image"):
            raise ConfigError(f"{where}: each item needs \"image\", the path of an image file")
        image = Path(str(entry["image"])).expanduser()
        if not image.is_absolute() and not image.is_file():
            image = path.parent / image
        if not image.is_file():
            raise ConfigError(f"{where}: image '{entry['image']}' does not exist (looked in the working "
                              "folder and beside the .json file)")
        entries.append((image, _settings_from_mapping(entry, where)))
    return entries


def _probe_image(path: Path) -> tuple[int, int] | str:
    """(width, height) as displayed, or why the file cannot be used.

    Cheap by design: headers are read and PNG chunk checksums verified, but pixels are only
    decoded when a cheap check cannot rule out truncation (JPEG without its end marker, BMP).
    """
    try:
        size_on_disk = path.stat().st_size
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if size_on_disk == 0:
        return "empty file (0 bytes)"
    try:
        # verify() must come straight after open, and leaves the image unusable: open twice.
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            image_format = image.format
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        if image_format == "JPEG" and not _tail_contains(path, b"\xff\xd9"):
            _decode_fully(path)
        elif image_format == "WEBP" and not _riff_size_matches(path, size_on_disk):
            return "truncated WebP file"
        elif image_format == "BMP":
            _decode_fully(path)
    except UnidentifiedImageError:
        return "not an image Pillow can read (unknown or damaged format)"
    # Pillow signals damage with many exception types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError...); any of them means this file is unusable.
    except Exception as error:  # noqa: BLE001
        return f"not a readable image ({type(error).__name__}: {error})"
    if width <= 0 or height <= 0:
        return f"has no pixels ({width}x{height})"
    if orientation in _ORIENTATIONS_THAT_SWAP_SIDES:
        width, height = height, width
    return width, height


def _tail_contains(path: Path, marker: bytes, tail_bytes: int = 64) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - tail_bytes))
        return marker in handle.read()


def _riff_size_matches(path: Path, size_on_disk: int) -> bool:
    with open(path, "rb") as handle:
        header = handle.read(8)
    declared = int.from_bytes(header[4:8], "little") + 8
    # RIFF pads odd chunk sizes, so one trailing byte more is still a whole file.
    return size_on_disk >= declared


def _decode_fully(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


# --------------------------------------------------------------------------------------------
# Per-epoch choices: shuffled tags, fractional multiply

DEFAULT_MAX_CAPTION_LENGTH = 2048  # EveryDream2's, in characters


def shuffled_caption(item: ImageItem, seed: int, epoch: int, index: int, *, keep_tags: int = 0) -> str:
    """The caption with its tags reordered for ``epoch``, a pure function of (seed, epoch, index).

    Tags of equal weight: the first ``keep_tags`` stay, the rest are shuffled. Tags of different
    weights: drawn one at a time with chance proportional to weight (heavier tags tend to come
    first) until the caption reaches ``max_caption_length`` characters. The main prompt leads.
    """
    if not item.tags:
        return item.caption
    rng = random.Random(mix_seed(seed, epoch, index, 0x7A65))
    texts = [tag.text for tag in item.tags]
    weights = [tag.weight for tag in item.tags]
    if len(set(weights)) > 1:
        budget = (item.max_caption_length or DEFAULT_MAX_CAPTION_LENGTH) - len(item.main_prompt)
        picked: list[str] = []
        while texts and len(", ".join(picked)) < budget:
            position = rng.choices(range(len(texts)), weights=weights)[0]
            weights.pop(position)
            picked.append(texts.pop(position))
        texts = picked
    else:
        rest = texts[keep_tags:]
        rng.shuffle(rest)
        texts = texts[:keep_tags] + rest
    return ", ".join([item.main_prompt, *texts]) if item.main_prompt else ", ".join(texts)


def repeat_by_multiply(items: Sequence[ImageItem]) -> tuple[list[ImageItem], list[float]]:
    """Each item ceil(multiply) times, with the chance each copy is trained in an epoch.

    Whole copies always train; the last copy of a fractional multiply (2.5 -> 3 copies) trains
    with the fraction as its chance, drawn anew each epoch (see ``trained_in_epoch``), so an
    epoch holds 2 or 3 of them and 2.5 on average, as in EveryDream2.
    """
    repeated: list[ImageItem] = []
    chances: list[float] = []
    for item in items:
        whole = math.floor(item.multiply)
        fraction = item.multiply - whole
        repeated += [item] * whole
        chances += [1.0] * whole
        if fraction > 1e-9:
            repeated.append(item)
            chances.append(fraction)
    return repeated, chances


def trained_in_epoch(chances: Sequence[float], seed: int, epoch: int) -> list[int]:
    """Indices of the copies trained in ``epoch``: a pure function of (seed, epoch), so a resumed
    run trains the same images as an uninterrupted one."""
    draws = torch.rand(len(chances), generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 0x6D75)),
                       dtype=torch.float64).tolist()
    return [index for index, (chance, draw) in enumerate(zip(chances, draws)) if chance >= 1.0 or draw < chance]


def rated_dataset_fraction(epoch: int, max_epochs: int, target_percent: float) -> float:
    """The share of the distinct images trained in `epoch` (0-based) under EveryDream2's rated_dataset.

    EveryDream2 (data/every_dream.py) draws each next epoch's images when an epoch ends, from the
    ending epoch's number n: (max_epochs - n x drop) / max_epochs with drop = 1 - target/100 (the
    target clamped to 0..100). So epochs 0 and 1 train everything, and the share then falls by
    drop / max_epochs an epoch, reaching the target only past the last epoch.
    """
    drop = 1.0 - min(max(target_percent, 0.0), 100.0) / 100.0
    if epoch < 1:
        return 1.0
    return (max_epochs - (epoch - 1) * drop) / max_epochs


def rated_subset(ratings: Sequence[float], fraction: float, seed: int, epoch: int) -> list[int]:
    """Indices (sorted) of the images a rated epoch trains: ceil(fraction x count) of them, drawn
    without replacement with chances in proportion to their ratings (EveryDream2's rule: double the
    rating, double the chance; its running sums go stale after each pick, a slip not copied here).
    A pure function of (seed, epoch), so a resumed run trains the same images."""
    count = min(len(ratings), math.ceil(len(ratings) * fraction))
    if count >= len(ratings):
        return list(range(len(ratings)))
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x7261))
    picked = torch.multinomial(torch.tensor(ratings, dtype=torch.float64), count, replacement=False,
                               generator=generator)
    return sorted(picked.tolist())


# --------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True)
class Augmentation:
    """The random choices for one item in one epoch.

    ``crop_position`` is where the crop window sits in the resized image, as fractions of the
    free room along x and y: (0.5, 0.5) is a center crop.
    """

    flip: bool
    drop_caption: bool
    crop_position: tuple[float, float]


CENTER = (0.5, 0.5)


class ImageBucketDataset(torch.utils.data.Dataset):
    """Training images resized and cropped to their bucket, as tensors in [-1, 1].

    Randomness (flip, caption dropout, random crop) is drawn from a ``torch.Generator`` seeded
    from (seed, epoch, index). That keeps a run reproducible, makes a resumed run draw exactly
    what the interrupted one would have, and gives DataLoader worker processes the same draws
    as the main process, none of which holds for one shared generator. Call ``set_epoch`` with
    the sampler's epoch; with ``persistent_workers=True`` the workers keep a stale copy, so use
    the default (workers are re-created per epoch and see the new epoch).

    Args:
        items: the images (see ``scan_image_folder``).
        buckets: the (width, height) bucket of each item, same length as ``items``.
        seed: the data seed.
        flip_p: probability of a horizontal flip (an item's own flip_p wins).
        caption_dropout: probability that the caption becomes "" (for classifier-free guidance;
            an item's own cond_dropout wins).
        random_crop: crop at a random place instead of the center.
        shuffle_tags: reshuffle every item's tags each epoch (an item's shuffle_tags turns it on
            for that item alone).
        keep_tags: tags kept in place when shuffling.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        buckets: Sequence[Bucket],
        *,
        seed: int,
        flip_p: float = 0.0,
        caption_dropout: float = 0.0,
        random_crop: bool = False,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
    ) -> None:
        if len(items) != len(buckets):
            raise ValueError(f"{len(items)} items but {len(buckets)} bucket assignments")
        for name, probability in (("flip_p", flip_p), ("caption_dropout", caption_dropout)):
            if not 0.0 <= probability <= 1.0:
                raise ConfigError(f"{name} is {probability}; it is a probability, so use a value from 0 to 1")
        self.items = list(items)
        self.buckets = [tuple(b) for b in buckets]
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.caption_dropout = float(caption_dropout)
        self.random_crop = random_crop
        self.shuffle_tags = shuffle_tags
        self.keep_tags = int(keep_tags)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random draws ``__getitem__`` uses."""
        self.epoch = int(epoch)

    def augmentation(self, index: int, epoch: int | None = None) -> Augmentation:
        """The random choices for item ``index`` in ``epoch`` (default: the current epoch).

        All four numbers are always drawn, so changing ``flip_p`` does not move the crops.
        """
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        flip_draw, caption_draw, crop_x, crop_y = draws
        item = self.items[index]
        flip_p = self.flip_p if item.flip_p is None else item.flip_p
        caption_dropout = self.caption_dropout if item.cond_dropout is None else item.cond_dropout
        return Augmentation(
            flip=flip_draw < flip_p,
            drop_caption=caption_draw < caption_dropout,
            crop_position=(crop_x, crop_y) if self.random_crop else CENTER,
        )

    def caption(self, index: int, epoch: int | None = None) -> str:
        """Item ``index``'s caption in ``epoch``: tags shuffled if asked, "" when dropped."""
        epoch = self.epoch if epoch is None else epoch
        if self.augmentation(index, epoch).drop_caption:
            return ""
        item = self.items[index]
        if self.shuffle_tags or item.shuffle_tags:
            return shuffled_caption(item, self.seed, epoch, index, keep_tags=self.keep_tags)
        return item.caption

    def load_pixels(
        self, index: int, *, flip: bool = False, crop_position: tuple[float, float] = CENTER
    ) -> torch.Tensor:
        """Item ``index`` as a float tensor of shape (3, H, W) in [-1, 1], (W, H) its bucket.

        The image is turned upright (EXIF), made RGB (transparency composited on white),
        scaled to cover the bucket, cropped at ``crop_position`` and optionally mirrored.
        """
        item = self.items[index]
        bucket_width, bucket_height = self.buckets[index]
        try:
            image = _load_upright_rgb(item.path, (bucket_width, bucket_height))
        except OSError as error:
            raise ConfigError(
                f"training image '{item.path}' can no longer be read ({error}); it was readable "
                "when the folder was scanned, so it was changed or removed during training: "
                "restore it, or remove it and restart"
            ) from None
        image = _resize_to_cover(image, bucket_width, bucket_height)
        free_x = image.width - bucket_width
        free_y = image.height - bucket_height
        left = min(free_x, int(round(crop_position[0] * free_x)))
        top = min(free_y, int(round(crop_position[1] * free_y)))
        image = image.crop((left, top, left + bucket_width, top + bucket_height))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        # Flip and make contiguous on uint8: a strided float conversion is several times slower.
        pixels = pixels.flip(-1) if flip else pixels.contiguous()
        return pixels.float().div_(127.5).sub_(1.0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"pixel_values": (3, H, W) float in [-1, 1], "caption": str, "index": int, "flipped": bool}``."""
        choice = self.augmentation(index)
        return {
            "pixel_values": self.load_pixels(index, flip=choice.flip, crop_position=choice.crop_position),
            "caption": self.caption(index),
            "index": index,
            "flipped": choice.flip,
        }


def _load_upright_rgb(path: Path, bucket: Bucket) -> Image.Image:
    with Image.open(path) as image:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        if image.format == "JPEG":
            # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers the
            # bucket: a 24 MP photo trained at 512 decodes several times faster.
            needed = bucket[::-1] if orientation in _ORIENTATIONS_THAT_SWAP_SIDES else bucket
            image.draft("RGB", _draft_request(image.size, needed))
        image.load()
        upright = ImageOps.exif_transpose(image)
    if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
        # Transparent pixels hold arbitrary colour (often black); white is what a viewer shows.
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return upright.convert("RGB")


def _draft_request(image_size: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """The size draft() must not go below so the decoded image still covers ``bucket``."""
    scale = max(bucket[0] / image_size[0], bucket[1] / image_size[1])
    return (int(np.ceil(image_size[0] * scale)), int(np.ceil(image_size[1] * scale)))


def _resize_to_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = max(width / image.width, height / image.height)
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
