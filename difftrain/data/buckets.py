"""Aspect-ratio buckets and a batch sampler that keeps each batch inside one bucket.

Images of different shapes cannot share a batch tensor, and squashing them all into a square
crops away what users wanted to train on. Buckets are a small set of (width, height) shapes of
about the same pixel count; every image goes to the bucket whose aspect ratio is nearest, and
every batch draws from a single bucket.

Two bucket families exist because the two peers define them differently:

- ``make_buckets(resolution)`` (EveryDream2): a resolution class R in 256..1536 (steps of 64)
  gives buckets of about R*R pixels, sides multiples of 64, aspect ratios from 4:1 to 1:4.
- ``make_buckets_traintrain(size, step, min_length, max_ratio)`` (TrainTrain): sides step in
  ``image_buckets_step``, the short side is at least ``image_min_length``, the ratio at most
  ``image_max_ratio``, and the area at most size*size.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch

from difftrain.errors import ConfigError

logger = logging.getLogger(__name__)

Bucket = tuple[int, int]
"""A bucket shape as (width, height) in pixels."""

RESOLUTION_CLASSES: tuple[int, ...] = tuple(range(256, 1536 + 1, 64))
BUCKET_SIDE_MULTIPLE = 64
MAX_ASPECT_RATIO = 4.0


def make_buckets(resolution: int) -> list[Bucket]:
    """EveryDream2-style buckets for a resolution class.

    Args:
        resolution: the class R; one of ``RESOLUTION_CLASSES`` (256, 320, ..., 1536).

    Returns:
        (width, height) pairs, sorted by aspect ratio from tallest to widest. Each side is a
        multiple of 64, each height is the multiple of 64 that brings the area nearest R*R (within
        12.5% at R=256, 6% from R=1024 up), and
        every ratio lies within 1:4 .. 4:1. The square (R, R) is always present.
    """
    valid = ", ".join(str(r) for r in RESOLUTION_CLASSES)
    requested = resolution
    try:
        resolution = _positive_int("resolution", resolution)
    except ConfigError:
        resolution = 0
    if resolution not in RESOLUTION_CLASSES:
        raise ConfigError(
            f"resolution {requested!r} is not a resolution class; set resolution to one of: {valid}"
        )
    target_area = resolution * resolution
    landscape: set[Bucket] = set()
    # The long side runs from R (square) to 2R (4:1 at area R^2); the short side is whatever
    # multiple of 64 brings the area closest to R^2.
    for width in range(resolution, 2 * resolution + 1, BUCKET_SIDE_MULTIPLE):
        height = _round_to_multiple(target_area / width, BUCKET_SIDE_MULTIPLE)
        if height <= 0 or width / height > MAX_ASPECT_RATIO:
            continue
        landscape.add((width, height))
    shapes = landscape | {(h, w) for (w, h) in landscape}
    return sorted(shapes, key=lambda shape: shape[0] / shape[1])


def make_buckets_traintrain(
    size: int | Sequence[int],
    step: int = 256,
    min_length: int = 512,
    max_ratio: float = 2.0,
) -> list[Bucket]:
    """TrainTrain-style buckets (``image_size``, ``image_buckets_step``, ``image_min_length``,
    ``image_max_ratio``).

    Args:
        size: ``image_size``: one side (square) or (width, height); its area is the pixel budget.
        step: every non-square side is a multiple of this.
        min_length: the shortest side a bucket may have.
        max_ratio: the largest long-side / short-side ratio.

    Returns:
        (width, height) pairs sorted by aspect ratio, always including ``size`` itself.
    """
    base = _parse_size(size)
    step = _positive_int("image_buckets_step", step)
    min_length = _positive_int("image_min_length", min_length)
    if step % 8:
        raise ConfigError(
            f"image_buckets_step {step} is not a multiple of 8; the VAE works on 8x8 pixel "
            "blocks, so use 64, 128 or 256"
        )
    try:
        max_ratio = float(max_ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"image_max_ratio {max_ratio!r} is not a number; use e.g. 2") from None
    if not max_ratio >= 1.0:
        raise ConfigError(f"image_max_ratio {max_ratio} is below 1; it is long side / short side, e.g. 2")

    pixel_budget = base[0] * base[1]
    shapes: set[Bucket] = {base}
    short_side = _round_up_to_multiple(min_length, step)
    while short_side * short_side <= pixel_budget:
        long_side = (pixel_budget // short_side) // step * step
        if long_side >= short_side and long_side / short_side <= max_ratio:
            shapes.add((long_side, short_side))
            shapes.add((short_side, long_side))
        short_side += step
    return sorted(shapes, key=lambda shape: shape[0] / shape[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest to width:height.

    Distance is measured on log(aspect) so that 2:1 and 1:2 are equally far from 1:1. Ties go
    to the larger area (less upscaling), then to the first in ``buckets``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    log_aspect = math.log(width / height)
    return min(
        buckets,
        key=lambda shape: (round(abs(math.log(shape[0] / shape[1]) - log_aspect), 12), -shape[0] * shape[1]),
    )


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[Bucket]) -> list[Bucket]:
    """Bucket for each (width, height) in ``sizes`` (see ``nearest_bucket``)."""
    return [nearest_bucket(w, h, buckets) for (w, h) in sizes]


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches whose items all share a bucket, shuffled per epoch from (seed, epoch).

    Use as ``DataLoader(dataset, batch_sampler=sampler)``. Each epoch every item appears once
    (per replica split, see below). Call ``set_epoch(epoch)`` before iterating each epoch.

    Exact resume: ``state_dict()`` records the epoch and how many batches of it were taken;
    after ``load_state_dict`` and ``set_epoch`` of that same epoch, iteration yields exactly the
    batches an uninterrupted run would still have produced. A ``set_epoch`` of another epoch
    starts that epoch from its first batch.

    Data parallel: with ``num_replicas`` > 1, each epoch's batch list is cut to a multiple of
    ``num_replicas`` (the surplus batches are dropped) and rank r takes batches r, r+R, r+2R...
    so every process runs the same number of steps, on disjoint batches.

    Args:
        bucket_of_item: the bucket key of item i (any hashable and sortable, e.g. (w, h)).
        batch_size: items per batch; the last batch of a bucket may be smaller unless drop_last.
        seed: shuffle seed; the order is a pure function of (seed, epoch, bucket_of_item).
        drop_last: drop each bucket's incomplete last batch.
        num_replicas: number of data-parallel processes.
        rank: this process's index in 0..num_replicas-1.
    """

    def __init__(
        self,
        bucket_of_item: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if not bucket_of_item:
            raise ConfigError("there are no training images to batch; check the data folder")
        self.bucket_of_item = list(bucket_of_item)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._start_position = 0
        self._position = 0
        self._data_digest = _digest_buckets(self.bucket_of_item)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"batch_size {batch_size} with drop_last leaves no full batch "
                f"(largest bucket has {max(self._bucket_sizes().values())} images, "
                f"{num_replicas} process(es)); lower batch_size or add images"
            )

    def _bucket_sizes(self) -> dict[Hashable, int]:
        sizes: dict[Hashable, int] = {}
        for bucket in self.bucket_of_item:
            sizes[bucket] = sizes.get(bucket, 0) + 1
        return sizes

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank runs in a whole epoch."""
        total = 0
        for count in self._bucket_sizes().values():
            total += count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)
        return total // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next; keeps a resumed position only for its own epoch."""
        if epoch != self.epoch:
            self._start_position = 0
        self.epoch = epoch
        self._position = self._start_position

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` for this rank, in order (a pure function, no state)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of_item):
            groups.setdefault(bucket, []).append(index)
        batches: list[list[int]] = []
        # Sorting the buckets keeps the draw order independent of dict/hash order.
        for bucket in sorted(groups, key=repr):
            members = groups[bucket]
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start : start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        batch_order = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in batch_order]
        usable = len(batches) // self.num_replicas * self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        self._position = self._start_position
        while self._position < len(batches):
            batch = batches[self._position]
            self._position += 1
            yield batch
        # A finished epoch replays from its start if iterated again.
        self._start_position = 0

    def __len__(self) -> int:
        """Batches the next iteration yields (fewer than a full epoch right after a resume)."""
        return self.batches_per_epoch - self._start_position

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Where this epoch stands, for an exact resume.

        Args:
            batches_consumed: batches of the current epoch the training loop has actually used
                (counting those before a resume). Pass it when the DataLoader has worker
                processes: they prefetch, so the sampler has handed out more batches than the
                loop consumed. Without it, the count of batches handed out is used, which is
                exact for ``num_workers=0``.
        """
        position = self._position if batches_consumed is None else int(batches_consumed)
        return {
            "epoch": self.epoch,
            "position": position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "drop_last": self.drop_last,
            "data_digest": self._data_digest,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next iteration of its epoch skips the batches taken."""
        mismatched = [
            key
            for key, mine in (
                ("seed", self.seed),
                ("batch_size", self.batch_size),
                ("num_replicas", self.num_replicas),
                ("drop_last", self.drop_last),
            )
            if key in state and state[key] != mine
        ]
        if state.get("data_digest", self._data_digest) != self._data_digest:
            mismatched.append("the training images or their buckets")
        if mismatched:
            # Resuming is still useful, but the rest of this epoch will not match the old run.
            logger.warning(
                "resuming the data order with a different %s than the checkpoint; the rest of "
                "epoch %s will not be the batches the interrupted run would have used",
                ", ".join(mismatched),
                state["epoch"],
            )
        self.epoch = int(state["epoch"])
        self._start_position = min(int(state["position"]), self.batches_per_epoch)
        self._position = self._start_position


def mix_seed(*parts: int) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` from several integers.

    Unlike ``seed + epoch``, (seed 1, epoch 2) and (seed 2, epoch 1) get unrelated streams.
    """
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _digest_buckets(bucket_of_item: Sequence[Hashable]) -> str:
    return hashlib.sha256(repr(list(bucket_of_item)).encode()).hexdigest()[:16]


def _round_to_multiple(value: float, multiple: int) -> int:
    # Exact halves round down: the smaller bucket keeps memory use at or under the class.
    return math.ceil(value / multiple - 0.5) * multiple


def _round_up_to_multiple(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _positive_int(name: str, value: Any) -> int:
    """``value`` as a positive int; presets store numbers as strings ("256", "256.0")."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {value!r} is not a whole number") from None
    if not number.is_integer() or number <= 0:
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    return int(number)


def _parse_size(size: int | str | Sequence[int]) -> Bucket:
    """``image_size`` as (width, height): 512, "512", "512,768" or [512, 768]."""
    if isinstance(size, str):
        parts: list[Any] = [p for p in size.replace("x", ",").split(",") if p.strip()]
    elif isinstance(size, Sequence):
        parts = list(size)
    else:
        parts = [size]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ConfigError(f"image_size {size!r} must be one number or width,height (e.g. 512 or 832,1216)")
    width, height = (_positive_int("image_size", p) for p in parts)
    if width % 8 or height % 8:
        raise ConfigError(
            f"image_size {size!r} has a side that is not a multiple of 8; the VAE needs multiples of 8"
        )
    return width, height
