"""Conversion of large image trees runs in bounded memory: twice the images, not more memory (slow)."""
from __future__ import annotations

import pytest

from vpn_dist.benchmarks.scale import convert, generate_tree


@pytest.mark.slow
def test_converting_twice_the_images_takes_no_more_memory(tmp_path):
    rows = {}
    for n in (1500, 3000):
        generate_tree(tmp_path / f"tree{n}", n, classes=20)
        rows[n] = convert(tmp_path / f"tree{n}", tmp_path / f"out{n}", max_side=256, workers=2)
    small, large = rows[1500], rows[3000]
    assert small["images"] == 1500 + 150 and large["images"] == 3000 + 300
    assert large["beton_bytes"] > 1.8 * small["beton_bytes"]  # twice the data was written...
    # ...in the same memory: the old in-memory conversion needed about 3.7 MB more per added image (5.5 GB here).
    assert large["peak_rss"] < 1.15 * small["peak_rss"] + 100 * 2**20, (small["peak_rss"], large["peak_rss"])
