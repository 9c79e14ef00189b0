"""The quickstart's training shards: 100 samples each, fewer when its readers (ranks × loader workers) would
otherwise share one (`wysiwyc quickstart --num-images 64` refused to train before)."""

import pytest

from pipeline.workflows.quickstart import train_shard_size


@pytest.mark.parametrize(
    ("num_images", "readers", "size"),
    [(2000, 2, 100), (200, 2, 100), (150, 2, 75), (64, 2, 32), (64, 4, 16), (3, 4, 1), (0, 2, 1)],
)
def test_every_reader_gets_a_shard_and_a_shard_holds_at_most_100(num_images, readers, size):
    assert train_shard_size(num_images, readers) == size
    if num_images >= readers:
        assert -(-num_images // size) >= readers  # shards = ceil(n / size)
