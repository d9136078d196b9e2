"""vpn_dist.compat: the FFCV internals vpn-dist relies on are there, and behave as the callers assume."""
from __future__ import annotations

import numpy as np
import pytest

from vpn_dist import compat


def test_the_pinned_ffcv_has_every_internal_we_use():
    problems = compat.check_ffcv()
    assert not problems, "FFCV changed what vpn_dist/compat.py relies on:\n" + "\n".join(problems)


@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_order_is_ffcvs_own(tmp_path, shuffle):
    """The memory backend batches in this order; it must be the order FFCV's Loader reads, epoch by epoch."""
    from ffcv.loader import Loader, OrderOption

    from data_prep.write import SourceData, write_dataset

    x = np.zeros((37, 1, 4, 4), np.uint8)
    y = np.arange(37) % 3
    write_dataset(tmp_path / "set", SourceData(x, y, x[:5], y[:5], ["a", "b", "c"], "none"), source_kind="test")
    indices = np.array([1, 4, 5, 9, 10, 20, 30, 36])
    loader = Loader(str(tmp_path / "set" / "train.beton"), batch_size=4, seed=11, indices=indices,
                    order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL)
    for epoch in range(3):
        compat.set_next_epoch(loader, epoch)
        assert compat.next_epoch(loader) == epoch
        expected = loader.next_traversal_order()
        got = compat.epoch_order(indices, seed=11, epoch=epoch, shuffle=shuffle, distributed=False)
        np.testing.assert_array_equal(got, expected)
    assert sorted(got) == sorted(indices)


def test_fit_within_shrinks_the_long_side_only():
    image = np.zeros((300, 120, 3), np.uint8)
    assert compat.fit_within(image, 150).shape == (150, 60, 3)
    assert compat.fit_within(image, 400).shape == (300, 120, 3)  # never enlarged
