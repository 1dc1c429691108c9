import logging
import os

import pytest
import torch
from PIL import Image

import difftrain.data.cache as cache_module
from difftrain.data.cache import (
    LatentCache,
    encode_images_cached,
    file_sha256,
    fingerprint_module,
    image_latent_key,
    text_embedding_key,
)
from difftrain.data.images import ImageBucketDataset, scan_image_folder
from difftrain.errors import ConfigError


class CountingCompute:
    def __init__(self, value=1.0):
        self.calls = 0
        self.value = value

    def __call__(self):
        self.calls += 1
        return {"latent": torch.full((4, 8, 8), self.value), "mask": torch.ones(2, dtype=torch.bool)}


def key(**changes):
    parts = dict(content_sha256="a" * 64, model_fingerprint="vae-1", bucket=(512, 512), flip_pair=False)
    parts.update(changes)
    return image_latent_key(**parts)


@pytest.mark.parametrize("on_disk", [False, True])
def test_hit_after_miss(tmp_path, on_disk):
    cache = LatentCache(tmp_path / "cache" if on_disk else None)
    compute = CountingCompute()
    first = cache.get_or_compute(key(), compute)
    second = cache.get_or_compute(key(), compute)
    assert compute.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first["latent"], second["latent"]) and second["mask"].dtype == torch.bool
    assert set(second) == {"latent", "mask"}


def test_disk_entries_survive_a_new_process(tmp_path):
    LatentCache(tmp_path).get_or_compute(key(), CountingCompute(3.0))
    compute = CountingCompute()
    fresh = LatentCache(tmp_path)
    entry = fresh.get_or_compute(key(), compute)
    assert compute.calls == 0 and torch.all(entry["latent"] == 3.0)
    path = fresh.entry_path(key())
    assert path.is_file() and path.suffix == ".safetensors" and path.parent.name == path.name[:2]


@pytest.mark.parametrize(
    "changed",
    [
        dict(content_sha256="b" * 64),
        dict(model_fingerprint="vae-2"),
        dict(bucket=(576, 448)),
        dict(crop_position=(0.0, 0.5)),
        dict(flip_pair=True),
    ],
)
def test_any_key_part_change_is_a_miss(tmp_path, changed):
    cache = LatentCache(tmp_path)
    compute = CountingCompute()
    cache.get_or_compute(key(), compute)
    cache.get_or_compute(key(**changed), compute)
    assert compute.calls == 2


def test_text_embedding_keys_differ_by_caption_and_encoder():
    assert LatentCache.key(text_embedding_key(caption="a cat", model_fingerprint="te")) != LatentCache.key(
        text_embedding_key(caption="a dog", model_fingerprint="te")
    )
    assert LatentCache.key(text_embedding_key(caption="a cat", model_fingerprint="te")) != LatentCache.key(
        text_embedding_key(caption="a cat", model_fingerprint="te2")
    )


def test_key_parts_must_be_plain_data():
    with pytest.raises(TypeError, match="not JSON data"):
        LatentCache.key({"weights": torch.zeros(3)})


def test_file_hash_follows_content_not_name(tmp_path):
    first = tmp_path / "a.png"
    first.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    copy = tmp_path / "renamed.png"
    copy.write_bytes(first.read_bytes())
    assert file_sha256(first) == file_sha256(copy)
    before = file_sha256(first)
    stat = first.stat()
    first.write_bytes(b"y" * 3_000_000)
    # Same size and a forged modification time: the change time still reveals the edit.
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(first) != before


def test_writes_are_atomic(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path)

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_file", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        cache.get_or_compute(key(), CountingCompute())
    assert not cache.entry_path(key()).exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    cache.get_or_compute(key(), CountingCompute())
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [cache.entry_path(key()).name]


def test_damaged_or_foreign_entry_is_recomputed(tmp_path, caplog):
    cache = LatentCache(tmp_path)
    cache.get_or_compute(key(), CountingCompute(1.0))
    path = cache.entry_path(key())
    path.write_bytes(path.read_bytes()[:20])
    compute = CountingCompute(2.0)
    with caplog.at_level(logging.WARNING):
        entry = cache.get_or_compute(key(), compute)
    assert compute.calls == 1 and torch.all(entry["latent"] == 2.0) and "unreadable" in caplog.text
    # An entry whose stored key differs (a renamed file) is not trusted either.
    other = cache.entry_path(key(model_fingerprint="other"))
    LatentCache(tmp_path).get_or_compute(key(model_fingerprint="other"), CountingCompute(5.0))
    other.replace(path)
    compute = CountingCompute(3.0)
    assert torch.all(cache.get_or_compute(key(), compute)["latent"] == 3.0) and compute.calls == 1


def tiny_vae_like(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))
    module.register_buffer("scale", torch.tensor([0.18215]))
    return module.to(dtype)


def test_fingerprint_tracks_weights_dtype_and_config():
    base = fingerprint_module(tiny_vae_like(0))
    assert base == fingerprint_module(tiny_vae_like(0))
    assert base != fingerprint_module(tiny_vae_like(1))
    assert base != fingerprint_module(tiny_vae_like(0, torch.float16))
    finetuned = tiny_vae_like(0)
    with torch.no_grad():
        finetuned[2].weight.add_(1e-3)
    assert base != fingerprint_module(finetuned)

    configured = tiny_vae_like(0)
    configured.config = {"scaling_factor": 0.18215, "_name_or_path": "/models/a"}
    moved = tiny_vae_like(0)
    moved.config = {"scaling_factor": 0.18215, "_name_or_path": "/elsewhere/b"}
    changed = tiny_vae_like(0)
    changed.config = {"scaling_factor": 0.13025, "_name_or_path": "/models/a"}
    assert fingerprint_module(configured) == fingerprint_module(moved)
    assert fingerprint_module(configured) != fingerprint_module(changed)


# ----------------------------------------------------------------------------- with the dataset


def make_dataset(tmp_path, flip_p=0.5, **kwargs):
    tmp_path.mkdir()
    for index in range(4):
        image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
        image.rotate(90 * index).save(tmp_path / f"im{index}.png")
    items = scan_image_folder(tmp_path)
    return ImageBucketDataset(items, [(64, 64)] * len(items), seed=1, flip_p=flip_p, **kwargs)


class CountingEncoder:
    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, pixels):
        self.calls += 1
        self.images += pixels.shape[0]
        mean = torch.nn.functional.avg_pool2d(pixels, 8)
        return {"mean": mean, "std": mean.abs() + 0.1}


def test_flip_survives_caching(tmp_path):
    dataset = make_dataset(tmp_path / "images")
    cache = LatentCache(tmp_path / "cache")
    encoder = CountingEncoder()
    indices = [0, 1, 2, 3]
    seen_flips = set()
    for epoch in range(6):
        latents = encode_images_cached(
            cache, dataset, indices, model_fingerprint="fp", encode=encoder, epoch=epoch
        )
        assert latents["mean"].shape == (4, 3, 8, 8) and set(latents) == {"mean", "std"}
        for row, index in enumerate(indices):
            flip = dataset.augmentation(index, epoch).flip
            seen_flips.add(flip)
            expected = torch.nn.functional.avg_pool2d(dataset.load_pixels(index, flip=flip)[None], 8)[0]
            assert torch.allclose(latents["mean"][row], expected)
    assert seen_flips == {True, False}
    # One encoder call for the first batch, both orientations of each image, then only hits.
    assert (encoder.calls, encoder.images) == (1, 8)
    assert cache.misses == 4 and cache.hits == 20


def test_without_flip_only_one_orientation_is_encoded(tmp_path):
    dataset = make_dataset(tmp_path / "images", flip_p=0.0)
    encoder = CountingEncoder()
    encode_images_cached(LatentCache(), dataset, [2, 0], model_fingerprint="fp", encode=encoder)
    assert encoder.images == 2


def test_random_crop_with_caching_is_a_config_error(tmp_path):
    dataset = make_dataset(tmp_path / "images", random_crop=True)
    with pytest.raises(ConfigError, match="random_crop"):
        encode_images_cached(LatentCache(), dataset, [0], model_fingerprint="fp", encode=CountingEncoder())


def test_edited_image_is_reencoded(tmp_path):
    dataset = make_dataset(tmp_path / "images", flip_p=0.0)
    cache = LatentCache(tmp_path / "cache")
    encoder = CountingEncoder()
    encode_images_cached(cache, dataset, [0], model_fingerprint="fp", encode=encoder)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(dataset.items[0].path)
    latents = encode_images_cached(cache, dataset, [0], model_fingerprint="fp", encode=encoder)
    assert encoder.calls == 2
    assert torch.allclose(latents["mean"], torch.tensor(9 / 127.5 - 1))
    encode_images_cached(cache, dataset, [0], model_fingerprint="other vae", encode=encoder)
    assert encoder.calls == 3
