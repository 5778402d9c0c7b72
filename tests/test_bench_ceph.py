"""The pure part of benchmarks/bench_ceph.py: where the dirtying writes go."""

from __future__ import annotations

from benchmarks.bench_ceph import MiB, scattered


def test_the_writes_dirty_the_amount_asked_spread_over_the_data_aligned_and_apart() -> None:
    offsets = scattered(1024, 16, 64)
    assert len(offsets) * 64 * 1024 == 16 * MiB
    assert all(o % (64 * 1024) == 0 for o in offsets) and offsets[-1] + 64 * 1024 <= 1024 * MiB
    gaps = {b - a for a, b in zip(offsets, offsets[1:], strict=False)}
    assert len(gaps) == 1 and gaps.pop() >= 64 * 1024  # evenly spread, never overlapping
    assert scattered(64, 1, 4) == [i * 256 * 1024 for i in range(256)]
