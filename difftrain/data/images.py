"""Image folders for Stable Diffusion fine-tuning: scanning, captions, and a bucketed Dataset.

Captions follow EveryDream2 and TrainTrain: a ``.txt`` sidecar beside the image wins over a
``.caption`` sidecar; without one, the file name up to the first ``_`` is the caption
(``a cat_001.png`` -> ``a cat``). An optional trigger word is put in front (TrainTrain's
``lora_trigger_word``).

Damaged images are found when the folder is scanned, not hours into training: each is probed
cheaply, the bad ones are reported together in one warning and left out.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from difftrain.data.buckets import Bucket, mix_seed
from difftrain.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")  # in order of precedence

# EXIF orientations 5-8 rotate by 90 degrees, so the displayed image has width and height swapped.
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATIONS_THAT_SWAP_SIDES = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class ImageItem:
    """One training image: where it is, its caption, and its size as displayed (EXIF applied)."""

    path: Path
    caption: str
    width: int
    height: int


def scan_image_folder(
    data_root: str | os.PathLike[str],
    *,
    trigger_word: str = "",
    caption_from_filename: bool = True,
    setting_name: str = "data_root",
) -> list[ImageItem]:
    """Find every readable image under ``data_root`` (recursively) with its caption.

    Args:
        data_root: the folder of training images; sub-folders are searched too.
        trigger_word: put in front of every caption as ``"<trigger>, <caption>"``.
        caption_from_filename: without a sidecar, use the file name up to the first ``_``;
            when False such images get an empty caption (plus the trigger word).
        setting_name: the config key that named ``data_root``, for error messages
            (``data_root`` for train.py, ``lora_data_directory`` for train_j.py).

    Returns:
        Items sorted by path relative to ``data_root`` (a stable order for seeded shuffles).

    Raises:
        ConfigError: the folder is missing, holds no images, or none of them can be read; or
            a caption file is not UTF-8 (all such files are named at once).
    """
    root = Path(data_root).expanduser()
    if not root.exists():
        raise ConfigError(
            f"{setting_name} {str(root)!r} does not exist; create it and put your training images in "
            f"it, or set {setting_name} to the folder that holds them"
            + _backslash_hint(str(data_root))
        )
    if not root.is_dir():
        raise ConfigError(
            f"{setting_name} '{root}' is a file, not a folder; set {setting_name} to the folder "
            "holding the images"
        )

    image_paths = _find_image_files(root)
    if not image_paths:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ConfigError(
            f"{setting_name} '{root}' contains no images ({extensions}, searched recursively); "
            f"copy your training images into it or point {setting_name} at the right folder"
        )

    items: list[ImageItem] = []
    damaged: list[tuple[Path, str]] = []
    badly_encoded: list[tuple[Path, str]] = []
    for path in image_paths:
        probe = _probe_image(path)
        if isinstance(probe, str):
            damaged.append((path, probe))
            continue
        try:
            caption = caption_for_image(path, caption_from_filename=caption_from_filename)
        except _CaptionEncodingError as error:
            badly_encoded.append((error.path, error.detail))
            continue
        width, height = probe
        caption = add_trigger_word(caption, trigger_word)
        items.append(ImageItem(path=path, caption=caption, width=width, height=height))

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
            f"none of the {len(image_paths)} image(s) under {setting_name} '{root}' could be read "
            "(all are empty, truncated or not images, see the warning above); replace them with "
            "working copies"
        )
    return items


def caption_for_image(image_path: Path, *, caption_from_filename: bool = True) -> str:
    """The caption of one image, without the trigger word (see the module docstring)."""
    for extension in CAPTION_EXTENSIONS:
        sidecar = image_path.with_suffix(extension)
        if sidecar.is_file():
            return read_caption_file(sidecar)
    if caption_from_filename:
        return image_path.stem.split("_", 1)[0].strip()
    return ""


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


def _find_image_files(root: Path) -> list[Path]:
    found: list[Path] = []
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
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(directory) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


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
        flip_p: probability of a horizontal flip.
        caption_dropout: probability that the caption becomes "" (for classifier-free guidance).
        random_crop: crop at a random place instead of the center.
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
        return Augmentation(
            flip=flip_draw < self.flip_p,
            drop_caption=caption_draw < self.caption_dropout,
            crop_position=(crop_x, crop_y) if self.random_crop else CENTER,
        )

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
            "caption": "" if choice.drop_caption else self.items[index].caption,
            "index": index,
            "flipped": choice.flip,
        }


def collate_image_batch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``ImageBucketDataset`` samples of one bucket.

    Returns:
        ``{"pixel_values": (B, 3, H, W), "captions": list[str], "indices": (B,) long,
        "flipped": (B,) bool}``.
    """
    shapes = {tuple(sample["pixel_values"].shape) for sample in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"a batch mixes image shapes {sorted(shapes)}; batch with BucketBatchSampler so "
            "every batch comes from one bucket"
        )
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "captions": [sample["caption"] for sample in samples],
        "indices": torch.tensor([sample["index"] for sample in samples], dtype=torch.long),
        "flipped": torch.tensor([sample["flipped"] for sample in samples], dtype=torch.bool),
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
