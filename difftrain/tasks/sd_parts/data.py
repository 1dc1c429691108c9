"""The data source of a Stable Diffusion run: images scanned with their captions, held-out images,
buckets, bucketed data sets, and the batches of each epoch.

Everything here runs before any model is loaded, so a wrong folder or image costs nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from difftrain.config import Config
from difftrain.data.buckets import (RESOLUTION_CLASSES, BucketBatchSampler, assign_buckets, make_buckets,
                                    make_buckets_traintrain, nearest_bucket)
from difftrain.data.images import (IMAGE_EXTENSIONS, ImageBucketDataset, ImageItem, rated_subset,
                                   scan_image_folder, trained_in_epoch)
from difftrain.errors import ConfigError

MAX_VALIDATION_ITEMS = 256
Bucket = tuple[int, int]


def buckets_for(config: Config) -> list[Bucket]:
    """Bucket shapes (width, height) for the config.

    TrainTrain's modes (LoRA, ADDifT, ...) follow TrainTrain (image_size, image_buckets_step, image_min_length,
    image_max_ratio); 'Full' follows EveryDream2's resolution classes (256..1536). Below 256,
    which no real model trains at, a single square bucket is used so that small test models
    and previews can run.
    """
    resolution = config.resolution
    if config.mode != "Full":
        height, width = config.training_size()  # TrainTrain's image_size(height, width): its area is the budget
        return make_buckets_traintrain((width, height), config.image_buckets_step,
                                       min(config.image_min_length, height, width), config.image_max_ratio)
    if resolution < RESOLUTION_CLASSES[0]:
        if resolution % 8:
            raise ConfigError(f"resolution {resolution} is not a multiple of 8; the VAE works on 8x8 blocks.")
        return [(resolution, resolution)]
    return make_buckets(resolution)


def split_validation(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(train, validation): a seeded random `fraction` of the items held out (at least one when
    fraction > 0, at least one left to train on)."""
    if fraction <= 0:
        return items, []
    count = min(len(items) - 1, max(1, round(len(items) * fraction)))
    if count < 1:
        raise ConfigError(f"validation_fraction {fraction} leaves no image to train on ({len(items)} image(s)); "
                          "add images, set validation_fraction to 0, or use validation_root.")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    return ([item for i, item in enumerate(items) if i not in held_out],
            [item for i, item in enumerate(items) if i in held_out])


def scan_captioned_images(config: Config) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items repeated image_num_multiply times, held-out items) of data_root and
    validation_root (or a validation_fraction of data_root)."""
    setting = "data_root" if config.mode == "Full" else "lora_data_directory"
    from_filename = config.mode == "Full" or config.image_use_filename_as_tag
    items = scan_image_folder(config.data_root, trigger_word=config.lora_trigger_word,
                              caption_from_filename=from_filename, setting_name=setting)
    if config.validation_root:
        valid = scan_image_folder(config.validation_root, trigger_word=config.lora_trigger_word,
                                  caption_from_filename=from_filename, setting_name="validation_root")
        train = items
    else:
        train, valid = split_validation(items, config.validation_fraction, config.seed)
    return train * config.image_num_multiply, valid[:MAX_VALIDATION_ITEMS]


def extra_validation_sets(config: Config, buckets: Sequence[Bucket],
                          train_items: Sequence[ImageItem]) -> dict[str, ImageBucketDataset]:
    """Metric name -> images: validation_extra_roots' folders (EveryDream2's extra_manual_datasets) as
    loss_valid_<name>, and validation_stabilize_fraction of the training images as loss_train_stabilized."""
    from_filename = config.mode == "Full" or config.image_use_filename_as_tag
    sets = {}
    for name, folder in config.validation_extra_roots.items():
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"validation_extra_roots: the name {name!r} becomes the metric loss_valid_<name>; "
                              "use letters, digits, '_' or '-'.")
        items = scan_image_folder(folder, trigger_word=config.lora_trigger_word, caption_from_filename=from_filename,
                                  setting_name=f"validation_extra_roots.{name}")
        sets[f"loss_valid_{name}"] = bucketed(items[:MAX_VALIDATION_ITEMS], buckets, config.seed)
    if config.validation_stabilize_fraction > 0:
        unique = list({item.path: item for item in train_items}.values())  # image_num_multiply repeats once
        count = min(len(unique), max(1, math.ceil(len(unique) * config.validation_stabilize_fraction)))
        order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(config.seed)).tolist()
        chosen = [unique[i] for i in sorted(order[:count])][:MAX_VALIDATION_ITEMS]
        sets["loss_train_stabilized"] = bucketed(chosen, buckets, config.seed)  # unflipped, undropped captions
    return sets


def image_item(path_text: str, setting: str, caption: str) -> ImageItem:
    """The image a config key names (e.g. "original image"), as an ImageItem with `caption`.

    Raises:
        ConfigError: the key is empty, the file is missing, or it is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path_text.strip():
        raise ConfigError(f"'{setting}' is empty; this mode trains on an image pair: set \"original image\" "
                          "and \"target image\" to image files.")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"'{setting}' {str(path)!r} does not exist (or is a folder); give the path of an image "
                          f"file ({' '.join(sorted(IMAGE_EXTENSIONS))}).")
    try:
        with Image.open(path) as image:
            width, height = ImageOps.exif_transpose(image).size
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError(f"'{setting}' {str(path)!r} is not a readable image ({error}).") from None
    return ImageItem(path=path, caption=caption, width=width, height=height)


def bucketed(items: Sequence[ImageItem], buckets: Sequence[Bucket], seed: int, **augment: Any) -> ImageBucketDataset:
    """`items`, each in its nearest bucket, with ImageBucketDataset's augmentations `augment`."""
    return ImageBucketDataset(items, assign_buckets([(i.width, i.height) for i in items], buckets), seed=seed,
                              **augment)


def paired(items: Sequence[ImageItem], buckets: Sequence[Bucket], seed: int) -> ImageBucketDataset:
    """Items 2k (an original) and 2k + 1 (its target), both in the original's bucket, unflipped, so
    the two images of a pair line up pixel for pixel."""
    shapes = []
    for original in items[::2]:
        bucket = nearest_bucket(original.width, original.height, buckets)
        shapes += [bucket, bucket]
    return ImageBucketDataset(items, shapes, seed=seed)


def check_bucket_sizes(buckets: Sequence[Bucket], multiple: int, resolution: int) -> None:
    """Every bucket side must be a multiple of `multiple` (VAE factor x UNet downsamplings)."""
    bad = [b for b in buckets if b[0] % multiple or b[1] % multiple]
    if bad:
        raise ConfigError(f"resolution {resolution} gives bucket(s) {bad[:3]} whose sides are not "
                          f"multiples of {multiple}, which this model needs; pick another resolution.")


class EpochBatches:
    """The batches of each epoch over items with bucket keys `keys` (items of one batch share a key),
    one sampler per process layout (rank, world size)."""

    def __init__(self, keys: Sequence[Any], batch_size: int, seed: int):
        self.keys, self.batch_size, self.seed = list(keys), batch_size, seed
        self._samplers: dict[tuple[int, int], BucketBatchSampler] = {}

    def __call__(self, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        layout = (rank, world_size)
        if layout not in self._samplers:
            self._samplers[layout] = BucketBatchSampler(self.keys, self.batch_size, seed=self.seed,
                                                        num_replicas=world_size, rank=rank)
        return self._samplers[layout].epoch_batches(epoch)


class ImageEpochBatches:
    """The batches of each epoch over an image data set: items batch together when they share a
    bucket, and a batch_id (EveryDream2's batch_id.txt) if they have one. Copies with a chance
    below 1 (the last copy of a fractional multiply) are drawn anew each epoch. With
    `rated_fraction` (EveryDream2's rated_dataset: epoch -> share of the images), an epoch whose
    share is below 1 trains that share of the distinct images, picked by rating, each once (as
    there, multiply does not apply to such an epoch)."""

    def __init__(self, dataset: ImageBucketDataset, chances: Sequence[float], batch_size: int, seed: int,
                 rated_fraction: Optional[Callable[[int], float]] = None):
        self.keys = [(item.batch_id, bucket) if item.batch_id else bucket
                     for item, bucket in zip(dataset.items, dataset.buckets)]
        self.chances, self.batch_size, self.seed = list(chances), batch_size, seed
        self.every_item = EpochBatches(self.keys, batch_size, seed)
        self.rated_fraction = rated_fraction
        first_copy: dict[Path, int] = {}
        for index, item in enumerate(dataset.items):
            first_copy.setdefault(item.path, index)
        self.distinct = list(first_copy.values())
        self.ratings = [dataset.items[index].rating for index in self.distinct]

    def trained(self, epoch: int) -> Optional[list[int]]:
        """The items `epoch` trains, or None for every one of them."""
        fraction = self.rated_fraction(epoch) if self.rated_fraction is not None else 1.0
        if fraction < 1.0:
            return [self.distinct[i] for i in rated_subset(self.ratings, fraction, self.seed, epoch)]
        if all(chance >= 1.0 for chance in self.chances):
            return None
        return trained_in_epoch(self.chances, self.seed, epoch)

    def __call__(self, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        trained = self.trained(epoch)
        if trained is None:
            return self.every_item(epoch, rank, world_size)
        batches = EpochBatches([self.keys[i] for i in trained], self.batch_size, self.seed)(epoch, rank, world_size)
        return [[trained[position] for position in batch] for batch in batches]


def repeated(index: int, batch_size: int) -> list[list[int]]:
    """One batch of `batch_size` copies of item `index` (a single example, fresh noise per row)."""
    return [[index] * batch_size]


__all__ = ["EpochBatches", "ImageEpochBatches", "MAX_VALIDATION_ITEMS", "bucketed", "buckets_for", "check_bucket_sizes",
           "extra_validation_sets", "image_item", "paired", "repeated", "scan_captioned_images", "split_validation"]
