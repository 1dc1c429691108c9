import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.data.buckets import BucketBatchSampler, assign_buckets, make_buckets
from difftrain.data.images import (
    ImageBucketDataset,
    ImageItem,
    Tag,
    repeat_by_multiply,
    scan_image_folder,
    shuffled_caption,
    trained_in_epoch,
)
from difftrain.errors import ConfigError


def save_image(path, size=(64, 48), color=(200, 30, 30), mode="RGB", **save_args):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_args)
    return path


def captions_by_name(items):
    return {item.path.name: item.caption for item in items}


# ----------------------------------------------------------------------------- captions


def test_captions_sidecar_txt_beats_caption_beats_filename(tmp_path):
    save_image(tmp_path / "a cat_001.png")
    save_image(tmp_path / "a dog_002.jpg")
    (tmp_path / "a dog_002.caption").write_text("from caption file", encoding="utf-8")
    save_image(tmp_path / "bird_3.webp")
    (tmp_path / "bird_3.caption").write_text("loses", encoding="utf-8")
    (tmp_path / "bird_3.txt").write_text("  a blue\nbird  \n", encoding="utf-8")
    items = scan_image_folder(tmp_path)
    assert captions_by_name(items) == {
        "a cat_001.png": "a cat",
        "a dog_002.jpg": "from caption file",
        "bird_3.webp": "a blue bird",
    }


def test_scan_is_recursive_sorted_and_case_insensitive(tmp_path):
    save_image(tmp_path / "sub" / "deeper" / "Zebra.PNG")
    save_image(tmp_path / "apple.JPEG")
    save_image(tmp_path / "sub" / "pear.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    save_image(tmp_path / ".hidden" / "skip.png")
    items = scan_image_folder(tmp_path)
    assert [item.path.relative_to(tmp_path).as_posix() for item in items] == [
        "apple.JPEG",
        "sub/deeper/Zebra.PNG",
        "sub/pear.bmp",
    ]
    assert items[0] == ImageItem(path=tmp_path / "apple.JPEG", caption="apple", width=64, height=48,
                                 main_prompt="apple")


def test_trigger_word_is_prepended_once(tmp_path):
    save_image(tmp_path / "red car_1.png")
    save_image(tmp_path / "sks red car_2.png")
    save_image(tmp_path / "_3.png")  # empty file-name caption
    captions = captions_by_name(scan_image_folder(tmp_path, trigger_word=" sks "))
    assert captions == {"red car_1.png": "sks, red car", "sks red car_2.png": "sks red car", "_3.png": "sks"}


def test_without_filename_captions_only_sidecars_count(tmp_path):
    save_image(tmp_path / "a cat_001.png")
    captions = captions_by_name(scan_image_folder(tmp_path, caption_from_filename=False, trigger_word="tw"))
    assert captions == {"a cat_001.png": "tw"}


def test_caption_bom_and_utf16_are_read(tmp_path):
    save_image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes("\ufeffcafé au lait".encode("utf-8"))
    save_image(tmp_path / "y.png")
    (tmp_path / "y.txt").write_bytes("猫と犬".encode("utf-16"))
    assert captions_by_name(scan_image_folder(tmp_path)) == {"x.png": "café au lait", "y.png": "猫と犬"}


def test_caption_in_wrong_encoding_is_a_config_error_naming_every_file(tmp_path):
    save_image(tmp_path / "one.png")
    (tmp_path / "one.txt").write_bytes("café".encode("latin-1"))
    save_image(tmp_path / "two.png")
    (tmp_path / "two.caption").write_bytes("猫".encode("shift_jis"))
    save_image(tmp_path / "fine.png")
    with pytest.raises(ConfigError) as excinfo:
        scan_image_folder(tmp_path)
    message = str(excinfo.value)
    assert "one.txt" in message and "two.caption" in message and "fine" not in message
    assert "UTF-8" in message and "save" in message


# ----------------------------------------------------------------------------- broken images


def test_damaged_images_are_skipped_with_one_warning_naming_each(tmp_path, caplog):
    save_image(tmp_path / "good.png")
    save_image(tmp_path / "good.jpg", size=(300, 200))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    full_png = save_image(tmp_path / "full.png", size=(120, 90), color=(1, 2, 3)).read_bytes()
    (tmp_path / "truncated.png").write_bytes(full_png[: len(full_png) // 2])
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    noisy.save(tmp_path / "whole.jpg", quality=90)
    jpeg = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    with caplog.at_level(logging.WARNING, logger="difftrain.data.images"):
        items = scan_image_folder(tmp_path)
    assert sorted(item.path.name for item in items) == ["full.png", "good.jpg", "good.png", "whole.jpg"]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for name in ("empty.png", "text.jpg", "truncated.png", "truncated.jpg"):
        assert name in message
    assert "good" not in message and "whole" not in message and "full" not in message
    assert "4 unreadable" in message


def test_only_damaged_images_is_a_config_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="none of the 1 image"):
        scan_image_folder(tmp_path)


def test_missing_or_empty_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        scan_image_folder(tmp_path / "nope", setting_name="lora_data_directory")
    assert "lora_data_directory" in str(excinfo.value) and "does not exist" in str(excinfo.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ConfigError, match="contains no images"):
        scan_image_folder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a folder"):
        scan_image_folder(tmp_path / "empty" / "readme.txt")


def test_single_backslash_json_path_gets_a_hint(tmp_path):
    with pytest.raises(ConfigError, match="single backslash"):
        scan_image_folder("x:\new\training")


def test_exif_rotation_swaps_the_reported_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    save_image(tmp_path / "phone.jpg", size=(80, 40), exif=exif)
    (item,) = scan_image_folder(tmp_path)
    assert (item.width, item.height) == (40, 80)


# ----------------------------------------------------------------------------- dataset


def make_dataset(tmp_path, **kwargs):
    items = scan_image_folder(tmp_path)
    buckets = assign_buckets([(item.width, item.height) for item in items], make_buckets(256))
    return ImageBucketDataset(items, buckets, seed=kwargs.pop("seed", 0), **kwargs)


def test_dataset_resizes_to_cover_center_crops_and_normalises(tmp_path):
    # Left half black, right half white, wide image -> wide bucket.
    pixels = np.zeros((100, 400, 3), dtype=np.uint8)
    pixels[:, 200:] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    dataset = make_dataset(tmp_path)
    assert dataset.buckets[0] == (512, 128)
    sample = dataset[0]
    image = sample["pixel_values"]
    assert image.shape == (3, 128, 512) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert torch.allclose(image[:, :, :240], torch.tensor(-1.0))
    assert torch.allclose(image[:, :, 272:], torch.tensor(1.0))
    assert sample["caption"] == "wide" and sample["index"] == 0 and sample["flipped"] is False
    flipped = dataset.load_pixels(0, flip=True)
    assert torch.equal(flipped, image.flip(-1))


def test_random_crop_moves_the_window(tmp_path):
    gradient = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(tmp_path / "g.png")
    items = scan_image_folder(tmp_path)
    dataset = ImageBucketDataset(items, [(128, 128)], seed=0)
    left = dataset.load_pixels(0, crop_position=(0.0, 0.5))
    right = dataset.load_pixels(0, crop_position=(1.0, 0.5))
    assert left.mean() < -0.4 and right.mean() > 0.4
    random_crops = ImageBucketDataset(items, [(128, 128)], seed=0, random_crop=True)
    positions = {random_crops.augmentation(0, epoch).crop_position for epoch in range(5)}
    assert len(positions) == 5


def test_transparency_becomes_white_and_grey_becomes_rgb(tmp_path):
    save_image(tmp_path / "clear.png", size=(64, 64), color=(0, 0, 0, 0), mode="RGBA")
    save_image(tmp_path / "grey.png", size=(64, 64), color=0, mode="L")
    dataset = make_dataset(tmp_path)
    clear = dataset.load_pixels(0)
    grey = dataset.load_pixels(1)
    assert clear.shape == grey.shape == (3, 256, 256)
    assert torch.allclose(clear, torch.tensor(1.0)) and torch.allclose(grey, torch.tensor(-1.0))


def test_exif_rotation_is_applied_when_loading(tmp_path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = 255  # left half white before rotation
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    dataset = make_dataset(tmp_path)
    image = dataset[0]["pixel_values"]
    assert image.shape[1] > image.shape[2]  # portrait after rotation
    # Rotating 90 degrees clockwise puts the original left half on top.
    middle = image.shape[1] // 2
    assert image[:, : middle - 8].mean() > 0.9 and image[:, middle + 8 :].mean() < -0.9


def test_large_jpeg_decodes_with_draft_and_still_covers_the_bucket(tmp_path):
    save_image(tmp_path / "big.jpg", size=(2048, 1536), color=(10, 200, 10), quality=80)
    dataset = make_dataset(tmp_path)
    image = dataset[0]["pixel_values"]
    assert image.shape == (3, 192, 320)
    assert image[1].mean() > 0.5


def test_augmentation_is_reproducible_and_follows_probabilities(tmp_path):
    for index in range(4):
        save_image(tmp_path / f"img{index}.png", color=(index * 40, 0, 0))
    dataset = make_dataset(tmp_path, seed=11, flip_p=0.5, caption_dropout=0.3)
    again = make_dataset(tmp_path, seed=11, flip_p=0.5, caption_dropout=0.3)
    other_seed = make_dataset(tmp_path, seed=12, flip_p=0.5, caption_dropout=0.3)
    draws = [dataset.augmentation(i, epoch) for epoch in range(250) for i in range(4)]
    assert draws == [again.augmentation(i, epoch) for epoch in range(250) for i in range(4)]
    assert draws != [other_seed.augmentation(i, epoch) for epoch in range(250) for i in range(4)]
    flip_rate = sum(d.flip for d in draws) / len(draws)
    drop_rate = sum(d.drop_caption for d in draws) / len(draws)
    assert 0.44 < flip_rate < 0.56 and 0.25 < drop_rate < 0.35
    dataset.set_epoch(3)
    sample = dataset[2]
    choice = dataset.augmentation(2, 3)
    assert sample["flipped"] == choice.flip
    assert sample["caption"] == ("" if choice.drop_caption else "img2")
    never = make_dataset(tmp_path, seed=11)
    never_draws = [never.augmentation(i, epoch) for epoch in range(50) for i in range(4)]
    assert not any(draw.flip or draw.drop_caption for draw in never_draws)


def test_dataloader_with_bucket_sampler_and_workers_matches_main_process(tmp_path):
    for index, size in enumerate([(64, 64), (60, 64), (128, 40), (120, 44), (64, 62)]):
        save_image(tmp_path / f"im{index}.png", size=size, color=(index * 50, 10, 10))
    dataset = make_dataset(tmp_path, seed=5, flip_p=0.5, caption_dropout=0.5)
    dataset.set_epoch(2)
    sampler = BucketBatchSampler(dataset.buckets, 2, seed=5)
    sampler.set_epoch(2)

    def load(num_workers):
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers  # torch's default collate
        )
        return list(loader)

    in_process, with_workers = load(0), load(2)
    assert len(in_process) == len(with_workers) == 3
    for one, two in zip(in_process, with_workers):
        assert torch.equal(one["pixel_values"], two["pixel_values"])
        assert one["caption"] == two["caption"] and torch.equal(one["flipped"], two["flipped"])
        assert one["pixel_values"].shape[0] == len(one["caption"]) == one["index"].shape[0]


def test_image_removed_after_scan_is_a_config_error_naming_it(tmp_path):
    path = save_image(tmp_path / "gone.png")
    dataset = make_dataset(tmp_path)
    path.unlink()
    with pytest.raises(ConfigError, match="gone.png"):
        dataset[0]


def test_probabilities_outside_0_1_are_config_errors(tmp_path):
    save_image(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="flip_p"):
        make_dataset(tmp_path, flip_p=1.5)
    with pytest.raises(ConfigError, match="caption_dropout"):
        make_dataset(tmp_path, caption_dropout=-0.1)


# ----------------------------------------------------------------------------- EveryDream2 conventions

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def by_name(items):
    return {item.path.name: item for item in items}


def test_yaml_sidecar_main_prompt_and_weighted_tags_beat_the_txt(tmp_path):
    save_image(tmp_path / "cloud_1.png")
    write(tmp_path / "cloud_1.txt", "loses, to the yaml")
    write(tmp_path / "cloud_1.yaml", "main_prompt: a portrait of Cloud\ntags:\n  - tag: low angle\n"
          "  - tag: buster sword\n    weight: 1.5\n  - smiling\nmax_caption_length: 40\n")
    save_image(tmp_path / "tifa_2.png")
    write(tmp_path / "tifa_2.txt", "tifa,  red dress ,smiling")
    save_image(tmp_path / "barret wallace_3.png")
    items = by_name(scan_image_folder(tmp_path))
    cloud = items["cloud_1.png"]
    assert cloud.main_prompt == "a portrait of Cloud" and cloud.max_caption_length == 40
    # heavier tags first; the txt's tags add to the yaml's (EveryDream2 unions the sidecars' tags)
    assert [tag.text for tag in cloud.tags][:1] == ["buster sword"]
    assert {tag.text for tag in cloud.tags} == {"buster sword", "low angle", "smiling", "to the yaml"}
    assert cloud.caption.startswith("a portrait of Cloud, buster sword, ")
    assert items["tifa_2.png"].main_prompt == "tifa"
    assert [tag.text for tag in items["tifa_2.png"].tags] == ["red dress", "smiling"]
    assert items["barret wallace_3.png"].caption == "barret wallace"


def test_image_beats_local_beats_global_and_global_reaches_below(tmp_path):
    write(tmp_path / "global.yaml", "main_prompt: from the global\nflip_p: 0.1\ntags: [everywhere]\n")
    write(tmp_path / "sub" / "local.yaml", "flip_p: 0.2\ntags: [sub only]\n")
    write(tmp_path / "sub" / "cond_dropout.txt", "0.5\n")
    save_image(tmp_path / "sub" / "own.png")
    write(tmp_path / "sub" / "own.yaml", "flip_p: 0.3\nmain_prompt: its own\n")
    save_image(tmp_path / "sub" / "plain.png")
    save_image(tmp_path / "other" / "far.png")
    write(tmp_path / "sub" / "deeper" / "global.yaml", "flip_p: 0.4\n")
    save_image(tmp_path / "sub" / "deeper" / "deep.png")
    items = by_name(scan_image_folder(tmp_path))
    assert {name: item.flip_p for name, item in items.items()} == {
        "own.png": 0.3, "plain.png": 0.2, "far.png": 0.1, "deep.png": 0.4}
    assert items["own.png"].caption == "its own, sub only, everywhere"
    assert items["plain.png"].caption == "from the global, sub only, everywhere"
    assert items["deep.png"].caption == "from the global, everywhere"  # local.yaml is its folder's alone
    assert items["plain.png"].cond_dropout == 0.5 and items["deep.png"].cond_dropout is None


def test_folder_files_set_each_setting(tmp_path):
    for name, text in {"multiply.txt": "2.5", "flip_p.txt": "1", "cond_dropout.txt": "0.25",
                       "loss_scale.txt": "3", "batch_id.txt": "faces\n", "shuffle_tags.txt": ""}.items():
        write(tmp_path / "set" / name, text)
    save_image(tmp_path / "set" / "a.png")
    save_image(tmp_path / "b.png")
    items = by_name(scan_image_folder(tmp_path))
    a, b = items["a.png"], items["b.png"]
    assert (a.multiply, a.flip_p, a.cond_dropout, a.loss_scale, a.batch_id, a.shuffle_tags) == \
        (2.5, 1.0, 0.25, 3.0, "faces", True)
    assert (b.multiply, b.flip_p, b.cond_dropout, b.loss_scale, b.batch_id, b.shuffle_tags) == \
        (1.0, None, None, 1.0, "", False)


def test_bad_settings_files_name_the_file(tmp_path):
    save_image(tmp_path / "a.png")
    write(tmp_path / "multiply.txt", "twice")
    with pytest.raises(ConfigError, match="multiply.txt: expected a number"):
        scan_image_folder(tmp_path)
    (tmp_path / "multiply.txt").unlink()
    write(tmp_path / "local.yaml", "cond_droput: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'cond_droput'.*Did you mean 'cond_dropout'"):
        scan_image_folder(tmp_path)


def test_hidden_files_skipped_and_every_extension_in_any_case(tmp_path):
    for name in ["a.JFIF", "b.jfif", "c.Webp", "d.BMP", ".e.png", "f.gif"]:
        save_image(tmp_path / name, format="JPEG" if "jfif" in name.lower() else None)
    write(tmp_path / ".hidden" / "global.yaml", "main_prompt: never read\n")
    assert sorted(by_name(scan_image_folder(tmp_path))) == ["a.JFIF", "b.jfif", "c.Webp", "d.BMP"]


def test_data_root_as_a_json_list(tmp_path, monkeypatch):
    save_image(tmp_path / "pics" / "one.png")
    save_image(tmp_path / "pics" / "two_x.png")
    listing = [{"image": "pics/one.png", "caption": "first, tagged"},
               {"image": str(tmp_path / "pics" / "two_x.png"), "main_prompt": "second", "flip_p": 1}]
    write(tmp_path / "data.json", json.dumps(listing))
    monkeypatch.chdir(tmp_path.parent)  # relative paths are found beside the .json as well
    items = scan_image_folder(tmp_path / "data.json")
    assert [(item.path.name, item.caption, item.flip_p) for item in items] == [
        ("one.png", "first, tagged", None), ("two_x.png", "second", 1.0)]
    write(tmp_path / "bad.json", json.dumps([{"caption": "no image"}]))
    with pytest.raises(ConfigError, match="item 0: each item needs \"image\""):
        scan_image_folder(tmp_path / "bad.json")


def test_fractional_multiply_is_drawn_per_epoch_and_reproducible():
    item = ImageItem(path=Path("x.png"), caption="x", width=8, height=8, multiply=2.25)
    other = ImageItem(path=Path("y.png"), caption="y", width=8, height=8, multiply=0)
    repeated, chances = repeat_by_multiply([item, other])
    assert repeated == [item] * 3 and chances == [1.0, 1.0, 0.25]
    epochs = [trained_in_epoch(chances, 7, epoch) for epoch in range(400)]
    assert all(selection[:2] == [0, 1] for selection in epochs)
    fraction = sum(2 in selection for selection in epochs) / len(epochs)
    assert 0.18 < fraction < 0.32
    assert epochs == [trained_in_epoch(chances, 7, epoch) for epoch in range(400)]


def test_shuffled_tags_keep_the_main_prompt_and_keep_tags_and_change_per_epoch():
    tags = tuple(Tag(f"t{i}") for i in range(8))
    item = ImageItem(path=Path("x.png"), caption="main, " + ", ".join(t.text for t in tags), width=8, height=8,
                     main_prompt="main", tags=tags)
    captions = {shuffled_caption(item, 1, epoch, 0, keep_tags=2) for epoch in range(20)}
    assert len(captions) > 10
    assert all(caption.startswith("main, t0, t1, ") for caption in captions)
    assert all(sorted(caption.split(", ")[1:]) == sorted(t.text for t in tags) for caption in captions)
    assert shuffled_caption(item, 1, 3, 0) == shuffled_caption(item, 1, 3, 0)


def test_weighted_tags_favour_heavy_ones_and_respect_max_caption_length():
    tags = (Tag("heavy", 20.0), Tag("light", 0.05), Tag("mid", 1.0))
    item = ImageItem(path=Path("x.png"), caption="m", width=8, height=8, main_prompt="m", tags=tags,
                     max_caption_length=7)
    firsts = [shuffled_caption(item, 0, epoch, 0).split(", ")[1] for epoch in range(50)]
    assert firsts.count("heavy") > 40
    # "m" leaves 6 characters: one tag fits before the budget is reached, then it stops
    assert all(len(shuffled_caption(item, 0, epoch, 0).split(", ")) <= 3 for epoch in range(50))


def test_an_items_own_flip_and_dropout_win_over_the_runs(tmp_path):
    save_image(tmp_path / "a.png")
    item = scan_image_folder(tmp_path)[0]
    always = [replace(item, flip_p=1.0, cond_dropout=1.0), replace(item, flip_p=0.0, cond_dropout=0.0)]
    dataset = ImageBucketDataset(always, [(64, 48)] * 2, seed=0, flip_p=0.5, caption_dropout=0.5)
    for epoch in range(10):
        assert dataset.augmentation(0, epoch).flip and dataset.caption(0, epoch) == ""
        assert not dataset.augmentation(1, epoch).flip and dataset.caption(1, epoch) == "a"


@pytest.mark.usefixtures("one_thread")
def test_a_folder_in_everydream2_conventions_trains(tmp_path, tiny_sd15):
    """multiply, batch_id, loss_scale, shuffle_tags and yaml captions reach the batches, and it trains."""
    from types import SimpleNamespace

    from difftrain.config import validate_config_dict
    from difftrain.engine import run
    from difftrain.tasks.sd import SDTask

    data = tmp_path / "data"
    for folder, count in (("people", 3), ("things", 2)):
        for index in range(count):
            save_image(data / folder / f"{folder}{index}_{index}.png", size=(72, 80), color=(40 * index, 90, 200))
    write(data / "people" / "batch_id.txt", "people")
    write(data / "people" / "multiply.txt", "1.5")
    write(data / "people" / "shuffle_tags.txt", "")
    write(data / "people" / "local.yaml", "tags: [smiling, outdoors, photo]\nloss_scale: 2\n")
    write(data / "global.yaml", "main_prompt: a picture\n")
    write(data / "things" / "things0_0.yaml", "main_prompt: a red thing\n")
    settings = {"task": "sd", "mode": "Full", "resume_ckpt": str(tiny_sd15), "data_root": str(data),
                "resolution": 64, "max_epochs": 2, "batch_size": 2, "lr": 1e-3, "seed": 5, "sample_steps": 0,
                "tracker": "none", "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"),
                "ckpt_every_n_minutes": 0, "project_name": "conv"}
    config = validate_config_dict(settings)
    from difftrain.tasks.base import StartPoint

    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)
    task = SDTask(config, cpu, StartPoint(base=str(tiny_sd15)))
    items = task.train_set.items
    people = [i for i, item in enumerate(items) if item.batch_id == "people"]
    assert len(people) == 6  # 3 images x ceil(1.5)
    for epoch in range(4):
        batches = task.epoch_batches(epoch, 0, 1)
        trained = [i for batch in batches for i in batch]
        assert sum(i in people for i in trained) in (3, 4, 5, 6)  # 3 always, 3 more at 1/2 each
        assert all(len({items[i].batch_id for i in batch}) == 1 for batch in batches)
        batch = task.collate(batches[0], epoch)
        if items[batches[0][0]].batch_id == "people":
            assert torch.equal(batch["loss_scale"], torch.full((len(batches[0]),), 2.0))
    assert items[people[0]].caption.startswith("a picture, smiling")
    assert {items[i].caption for i in range(len(items)) if i not in people} == {"a red thing", "a picture"}
    assert run(config) == 0
