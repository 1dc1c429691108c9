import math

import pytest
import torch

from difftrain.data.buckets import (
    RESOLUTION_CLASSES,
    BucketBatchSampler,
    assign_buckets,
    make_buckets,
    make_buckets_traintrain,
    nearest_bucket,
)
from difftrain.errors import ConfigError


def test_resolution_classes_are_256_to_1536_in_steps_of_64():
    assert RESOLUTION_CLASSES[0] == 256
    assert RESOLUTION_CLASSES[-1] == 1536
    assert all(b - a == 64 for a, b in zip(RESOLUTION_CLASSES, RESOLUTION_CLASSES[1:]))


@pytest.mark.parametrize("resolution", RESOLUTION_CLASSES)
def test_bucket_geometry(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets)
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 1 / 4 <= width / height <= 4
        # The short side is the multiple of 64 nearest to R^2 / long side.
        assert abs(width * height - resolution**2) <= 32 * max(width, height)
        assert (height, width) in buckets
    widest = max(w / h for w, h in buckets)
    assert widest >= 3.0


def test_bucket_areas_tighten_with_resolution():
    for width, height in make_buckets(1024):
        assert abs(width * height / 1024**2 - 1) < 0.06


def test_resolution_given_as_text_is_accepted():
    assert make_buckets("512") == make_buckets(512) == make_buckets(512.0)


@pytest.mark.parametrize("bad", [500, 128, 1600, "big", 512.5, True, None])
def test_resolution_outside_classes_is_a_config_error_listing_valid_ones(bad):
    with pytest.raises(ConfigError) as excinfo:
        make_buckets(bad)
    message = str(excinfo.value)
    assert "256" in message and "1536" in message and "576" in message


def test_assignment_picks_nearest_aspect_ratio():
    buckets = make_buckets(512)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(4000, 1000, buckets) == (1024, 256)
    assert nearest_bucket(1000, 4000, buckets) == (256, 1024)
    assert nearest_bucket(10000, 100, buckets) == (1024, 256)
    for width, height in [(640, 480), (1920, 1080), (1080, 1920), (333, 777), (3000, 2000)]:
        chosen = nearest_bucket(width, height, buckets)
        distance = abs(math.log(chosen[0] / chosen[1]) - math.log(width / height))
        for other in buckets:
            assert distance <= abs(math.log(other[0] / other[1]) - math.log(width / height)) + 1e-12
    assert assign_buckets([(1000, 1000), (4000, 1000)], buckets) == [(512, 512), (1024, 256)]


def test_traintrain_buckets():
    assert make_buckets_traintrain(512) == [(512, 512)]
    assert make_buckets_traintrain(1024, 256, 512, 2) == [(768, 1280), (1024, 1024), (1280, 768)]
    buckets = make_buckets_traintrain("1024", "64", "512", "2")
    assert len(buckets) == 9
    for width, height in buckets:
        assert width * height <= 1024 * 1024
        assert min(width, height) >= 512
        assert max(width, height) / min(width, height) <= 2
        assert width % 64 == 0 and height % 64 == 0
    assert (832, 1216) in make_buckets_traintrain([832, 1216], 64, 512, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size=512, step=100),
        dict(size=512, step=0),
        dict(size=512, max_ratio=0.5),
        dict(size="big"),
        dict(size=513),
    ],
)
def test_traintrain_bucket_mistakes_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        make_buckets_traintrain(**kwargs)


def _bucket_list(counts):
    buckets = []
    for bucket, count in counts.items():
        buckets += [bucket] * count
    return buckets


BUCKETS_OF_ITEMS = _bucket_list({(512, 512): 7, (640, 384): 5, (384, 640): 3, (768, 320): 1})


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_batches_share_a_bucket_and_cover_every_item_once():
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=0)
    batches = _epoch(sampler, 0)
    assert len(batches) == len(sampler) == sampler.batches_per_epoch == 4 + 3 + 2 + 1
    for batch in batches:
        assert len({BUCKETS_OF_ITEMS[i] for i in batch}) == 1
        assert 1 <= len(batch) <= 2
    assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKETS_OF_ITEMS)))


def test_sampler_drop_last_keeps_only_full_batches():
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=0, drop_last=True)
    batches = _epoch(sampler, 0)
    assert all(len(batch) == 2 for batch in batches)
    assert len(batches) == 3 + 2 + 1 == len(sampler)


def test_sampler_is_deterministic_per_seed_and_epoch():
    first = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=7)
    second = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=7)
    assert _epoch(first, 3) == _epoch(second, 3)
    assert _epoch(first, 3) != _epoch(first, 4)
    assert _epoch(first, 3) != _epoch(BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=8), 3)
    # Iterating the same epoch twice replays it.
    assert _epoch(first, 5) == _epoch(first, 5)


def test_sampler_exact_resume_mid_epoch():
    uninterrupted = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    expected = _epoch(uninterrupted, 0) + _epoch(uninterrupted, 1) + _epoch(uninterrupted, 2)

    interrupted = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    produced = _epoch(interrupted, 0)
    interrupted.set_epoch(1)
    iterator = iter(interrupted)
    produced += [next(iterator) for _ in range(4)]
    state = interrupted.state_dict()
    assert state["epoch"] == 1 and state["position"] == 4

    resumed = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert len(resumed) == resumed.batches_per_epoch - 4
    produced += list(resumed)
    produced += _epoch(resumed, 2)
    assert produced == expected


def test_sampler_resume_at_the_end_of_an_epoch_goes_on_with_the_next():
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    _epoch(sampler, 0)
    resumed = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    resumed.load_state_dict(sampler.state_dict(batches_consumed=sampler.batches_per_epoch))
    assert _epoch(resumed, 0) == []
    assert _epoch(resumed, 1) == sampler.epoch_batches(1)


def test_sampler_resume_position_can_come_from_the_training_loop():
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    sampler.set_epoch(2)
    iterator = iter(sampler)
    for _ in range(6):  # a prefetching DataLoader ran ahead of the loop
        next(iterator)
    state = sampler.state_dict(batches_consumed=4)
    resumed = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert list(resumed) == sampler.epoch_batches(2)[4:]


def test_sampler_resume_with_other_data_warns(caplog):
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=3)
    state = sampler.state_dict()
    other = BucketBatchSampler(BUCKETS_OF_ITEMS + [(512, 512)], 2, seed=3)
    other.load_state_dict(state)
    assert "training images" in caplog.text


def test_sampler_splits_each_epoch_across_replicas():
    buckets = _bucket_list({(512, 512): 9, (640, 384): 6})  # 5 + 3 = 8 batches of 2 per epoch
    ranks = [BucketBatchSampler(buckets, 2, seed=1, num_replicas=3, rank=rank) for rank in range(3)]
    for epoch in (0, 1):
        per_rank = [_epoch(sampler, epoch) for sampler in ranks]
        assert [len(batches) for batches in per_rank] == [2, 2, 2]  # 8 // 3, remainder dropped
        assert all(len(s) == 2 for s in ranks)
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert len(seen) == len(set(seen))


def test_two_replicas_cover_disjoint_batches_of_the_single_process_order():
    single = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=4).epoch_batches(0)
    rank0 = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=4, num_replicas=2, rank=0).epoch_batches(0)
    rank1 = BucketBatchSampler(BUCKETS_OF_ITEMS, 2, seed=4, num_replicas=2, rank=1).epoch_batches(0)
    assert len(rank0) == len(rank1) == len(single) // 2
    assert rank0 + rank1 and not {tuple(b) for b in rank0} & {tuple(b) for b in rank1}
    assert sorted(rank0 + rank1) == sorted(single[: 2 * len(rank0)])


def test_sampler_feeds_a_dataloader():
    dataset = torch.arange(len(BUCKETS_OF_ITEMS))
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 3, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    batches = list(loader)
    assert sum(len(batch) for batch in batches) == len(BUCKETS_OF_ITEMS)


def test_sampler_rejects_impossible_settings():
    with pytest.raises(ConfigError):
        BucketBatchSampler(BUCKETS_OF_ITEMS, 0, seed=0)
    with pytest.raises(ConfigError, match="batch_size 8"):
        BucketBatchSampler(BUCKETS_OF_ITEMS, 8, seed=0, drop_last=True)
    with pytest.raises(ConfigError):
        BucketBatchSampler([], 2, seed=0)
