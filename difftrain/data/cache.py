"""A cache for VAE latents and text embeddings, keyed by what they were computed from.

An entry's key is a hash of everything that decides its value: the image file's content
(sha256, so a renamed file still hits and an edited one misses), a fingerprint of the model
that computed it (config, parameter shapes and dtypes, a sample of the weights; so a different
VAE or precision misses instead of feeding stale latents), and the bucket, crop and flip. A
changed input therefore changes the key: invalidation is automatic and nothing is ever
overwritten with a different meaning.

Entries live in memory (``cache_dir=None``) or on disk as one safetensors file each (no
pickle), written to a temporary file and renamed into place so a crash or a second process
never leaves a half-written entry under a real name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difftrain.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_KEY_METADATA = "difftrain_cache_key"
FLIPPED_PREFIX = "flipped."

TensorDict = dict[str, torch.Tensor]


class LatentCache:
    """Tensors computed once per key, in memory or on disk.

    Args:
        cache_dir: folder for entries (created when needed); None keeps them in memory.

    Returned tensors are on the CPU and shared with the cache: move or copy them before
    modifying them in place.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self._memory: dict[str, TensorDict] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(key_parts: Mapping[str, Any]) -> str:
        """The entry name for ``key_parts``: sha256 hex of their canonical JSON."""
        return hashlib.sha256(_canonical_json(key_parts).encode()).hexdigest()

    def entry_path(self, key_parts: Mapping[str, Any]) -> Path | None:
        """Where the entry for ``key_parts`` lives on disk (None for an in-memory cache)."""
        if self.cache_dir is None:
            return None
        name = self.key(key_parts)
        # Two-character shards keep any one folder small enough for every filesystem.
        return self.cache_dir / name[:2] / f"{name}.safetensors"

    def get(self, key_parts: Mapping[str, Any]) -> TensorDict | None:
        """The cached tensors for ``key_parts``, or None when absent or unreadable."""
        if self.cache_dir is None:
            entry = self._memory.get(self.key(key_parts))
            return None if entry is None else dict(entry)
        canonical = _canonical_json(key_parts)
        path = self.entry_path(key_parts)
        assert path is not None
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as handle:
                metadata = _read_safetensors_metadata(handle)
            if metadata.get(_KEY_METADATA) != canonical:
                logger.warning("cache entry %s belongs to another key; recomputing it", path)
                return None
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            # A damaged entry (disk full, killed copy) is recomputed rather than trusted.
            logger.warning("cache entry %s is unreadable (%s); recomputing it", path, error)
            return None

    def put(self, key_parts: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> TensorDict:
        """Store ``tensors`` under ``key_parts`` and return the stored (CPU) copies."""
        if not tensors:
            raise ValueError("refusing to cache an empty tensor dict")
        stored = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
        if self.cache_dir is None:
            self._memory[self.key(key_parts)] = stored
            return dict(stored)
        path = self.entry_path(key_parts)
        assert path is not None
        # safetensors refuses tensors that share storage (e.g. views of one encoder output).
        stored = {name: tensor.clone() for name, tensor in stored.items()}
        _atomic_save(stored, path, {_KEY_METADATA: _canonical_json(key_parts)})
        return stored

    def get_or_compute(
        self, key_parts: Mapping[str, Any], compute_fn: Callable[[], Mapping[str, torch.Tensor]]
    ) -> TensorDict:
        """The cached tensors for ``key_parts``; on a miss, ``compute_fn()`` is run and stored.

        Args:
            key_parts: JSON-serialisable values that decide the result (see ``image_latent_key``
                and ``text_embedding_key``).
            compute_fn: returns ``{name: tensor}``; called only on a miss.
        """
        cached = self.get(key_parts)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        return self.put(key_parts, compute_fn())


def image_latent_key(
    *,
    content_sha256: str,
    model_fingerprint: str,
    bucket: Sequence[int],
    crop_position: Sequence[float] = (0.5, 0.5),
    flip_pair: bool,
) -> dict[str, Any]:
    """Key parts for an image's latents.

    Args:
        content_sha256: ``file_sha256`` of the image file.
        model_fingerprint: ``fingerprint_module(vae)`` (it covers the dtype too).
        bucket: (width, height) the image was resized and cropped to.
        crop_position: where the crop sat, as in ``ImageBucketDataset.load_pixels``.
        flip_pair: the entry holds both the unflipped and the mirrored latents (needed when
            flip augmentation is on, so flips survive caching).
    """
    return {
        "kind": "image_latents",
        "version": CACHE_FORMAT_VERSION,
        "content_sha256": content_sha256,
        "model": model_fingerprint,
        "bucket": [int(side) for side in bucket],
        "crop": [round(float(c), 6) for c in crop_position],
        "flip": "pair" if flip_pair else "none",
    }


def text_embedding_key(*, caption: str, model_fingerprint: str) -> dict[str, Any]:
    """Key parts for a caption's text-encoder output (``model_fingerprint`` of the encoder(s))."""
    return {
        "kind": "text_embedding",
        "version": CACHE_FORMAT_VERSION,
        "caption": caption,
        "model": model_fingerprint,
    }


def encode_images_cached(
    cache: LatentCache,
    dataset: Any,
    indices: Sequence[int],
    *,
    model_fingerprint: str,
    encode: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    epoch: int | None = None,
) -> TensorDict:
    """Latents of a batch of ``ImageBucketDataset`` items, flipped as the epoch draws.

    Misses are encoded together in one ``encode`` call. When the dataset flips (``flip_p`` > 0)
    each entry stores both orientations, encoded from the real mirrored image (a mirrored
    latent is not the latent of the mirrored image), and the epoch's draw picks one.

    Args:
        cache: where entries live.
        dataset: an ``ImageBucketDataset``; ``indices`` must share one bucket.
        model_fingerprint: ``fingerprint_module(vae)``.
        encode: pixels (N, 3, H, W) in [-1, 1], float32 on the CPU (move them to the VAE's
            device and dtype) -> ``{name: (N, ...)}``, e.g. the VAE's
            ``{"mean": ..., "std": ...}`` so every epoch can draw a fresh latent sample.
        epoch: whose flip draws to use (default: the dataset's current epoch).

    Returns:
        ``{name: (B, ...)}`` in the order of ``indices``, on the CPU.
    """
    if dataset.random_crop:
        raise ConfigError(
            "random_crop cannot be combined with latent caching: every epoch crops elsewhere, "
            "so nothing would ever be reused; turn off random_crop or latent caching"
        )
    flip_pair = dataset.flip_p > 0
    key_by_index = {
        index: image_latent_key(
            content_sha256=file_sha256(dataset.items[index].path),
            model_fingerprint=model_fingerprint,
            bucket=dataset.buckets[index],
            flip_pair=flip_pair,
        )
        for index in indices
    }
    entries: dict[int, TensorDict] = {}
    missing: list[int] = []
    for index in dict.fromkeys(indices):
        cached = cache.get(key_by_index[index])
        if cached is None:
            missing.append(index)
        else:
            cache.hits += 1
            entries[index] = cached
    if missing:
        cache.misses += len(missing)
        pixels = [dataset.load_pixels(index) for index in missing]
        if flip_pair:
            pixels += [image.flip(-1) for image in pixels]
        with torch.no_grad():
            encoded = encode(torch.stack(pixels))
        count = len(missing)
        for position, index in enumerate(missing):
            entry = {name: value[position] for name, value in encoded.items()}
            if flip_pair:
                for name, value in encoded.items():
                    entry[FLIPPED_PREFIX + name] = value[count + position]
            entries[index] = cache.put(key_by_index[index], entry)

    chosen: list[TensorDict] = []
    for index in indices:
        entry = entries[index]
        flipped = dataset.augmentation(index, epoch).flip
        chosen.append(
            {
                name.removeprefix(FLIPPED_PREFIX): value
                for name, value in entry.items()
                if name.startswith(FLIPPED_PREFIX) == flipped
            }
        )
    return {name: torch.stack([entry[name] for entry in chosen]) for name in chosen[0]}


def fingerprint_module(module: torch.nn.Module) -> str:
    """A short hash that changes when the module's results could: its class, config,
    parameter and buffer names, shapes and dtypes, and a strided sample of every tensor's values.

    Cheap (a few values per tensor, one device transfer) and device independent (raw values,
    no floating-point sums), so the same weights on CPU or GPU give the same fingerprint.
    Retraining or merging changes every value of a tensor and is caught; a change to a single
    weight element may not be.
    """
    digest = hashlib.sha256()
    kind = type(module)
    digest.update(f"{kind.__module__}.{kind.__qualname__}\n".encode())
    # Configs may hold dtypes and enums; their str() is exact enough to tell configs apart.
    digest.update(json.dumps(_module_config(module), sort_keys=True, default=str).encode())
    samples_by_device: dict[torch.device, list[torch.Tensor]] = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        digest.update(f"\n{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel() == 0 or tensor.is_meta:
            continue
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), 16)
        stride = flat.numel() // count
        positions = torch.arange(count, device=flat.device) * stride
        picked = torch.cat([flat[positions], flat[-1:]])
        picked = picked.real.float() if picked.is_complex() else picked.float()
        samples_by_device.setdefault(picked.device, []).append(picked)
    # One transfer per device rather than one synchronisation per tensor.
    for device in sorted(samples_by_device, key=str):
        digest.update(torch.cat(samples_by_device[device]).cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


_sha256_memo: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """sha256 hex of a file's content, read in chunks.

    Remembered per (path, size, modification and change time) so that looking up a cached
    latent every epoch does not re-read the image.
    """
    real = os.path.realpath(path)
    status = os.stat(real)
    # ctime too: it changes on every write and, unlike mtime, cannot be set back by tools.
    memo_key = (real, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    known = _sha256_memo.get(memo_key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    _sha256_memo[memo_key] = digest.hexdigest()
    return _sha256_memo[memo_key]


def _module_config(module: torch.nn.Module) -> Any:
    config = getattr(module, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        # Underscored entries (_name_or_path, _diffusers_version) say where a model came from,
        # not what it computes; the same weights loaded from elsewhere must still hit.
        return {
            key: value
            for key, value in config.items()
            if not str(key).startswith("_") and key != "transformers_version"
        }
    return repr(config)


def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_key_part_to_json
    )


def _key_part_to_json(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # str() of most objects (a tensor's repr is abridged) would let different keys collide.
    raise TypeError(
        f"cache key part {value!r:.80} of type {type(value).__name__} is not JSON data; "
        "pass strings and numbers"
    )


def _read_safetensors_metadata(handle: Any) -> dict[str, str]:
    """The ``__metadata__`` of an open safetensors file, reading only its header."""
    header_length = int.from_bytes(handle.read(8), "little")
    if header_length <= 0 or header_length > 100_000_000:
        raise ValueError("not a safetensors file")
    header = json.loads(handle.read(header_length))
    return header.get("__metadata__", {}) or {}


def _atomic_save(tensors: TensorDict, path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
