"""The adaptive stagger rule, driven with measured times (no clock, no sockets)."""

from __future__ import annotations

import pytest

from gbalance.proxy.stagger import DEFAULT_FLOOR, INITIAL, StaggerEstimator, StaggerRule


def est(ceiling: float = 0.25, floor: float = DEFAULT_FLOOR) -> StaggerEstimator:
    return StaggerEstimator(StaggerRule(ceiling, floor), 2, 4)


def test_unmeasured_channel_starts_at_the_initial_delay_within_the_ceiling():
    assert est(0.25).delay(0, 3) == INITIAL
    assert est(0.01).delay(1, 2) == 0.01


def test_fast_connects_shrink_the_delay_to_the_floor():
    e = est(0.25, floor=0.005)
    e.sample(0, 0, 0.0002)
    first = e.delay(0, 0)
    for _ in range(30):
        e.sample(0, 0, 0.0002)
    assert e.delay(0, 0) == pytest.approx(0.005)
    assert first <= 0.25
    assert e.delay(0, 1) == INITIAL       # other channels keep their own history


def test_delay_follows_srtt_plus_four_deviations():
    e = est(1.0, floor=0.0)
    e.sample(0, 0, 0.010)                 # first sample: srtt 10 ms, var 5 ms
    assert e.delay(0, 0) == pytest.approx(0.010 + 4 * 0.005)
    e.sample(0, 0, 0.010)                 # var decays by a quarter, srtt stays
    assert e.delay(0, 0) == pytest.approx(0.010 + 4 * 0.00375)


def test_slow_connects_grow_the_delay():
    e = est(0.25, floor=0.005)
    for _ in range(20):
        e.sample(0, 0, 0.0005)
    low = e.delay(0, 0)
    for _ in range(5):
        e.sample(0, 0, 0.030)             # the backend (or this machine) got slow
    assert e.delay(0, 0) > low
    assert e.delay(0, 0) > 0.030          # never below the connect times it sees


def test_clamped_by_the_ceiling():
    e = est(0.1)
    for _ in range(10):
        e.sample(0, 2, 0.5)
    assert e.delay(0, 2) == pytest.approx(0.1)


def test_zero_stagger_stays_off():
    e = est(0.0)
    e.sample(0, 0, 0.001)
    assert e.delay(0, 0) == 0.0


def test_floor_never_exceeds_the_ceiling():
    e = est(0.002, floor=0.005)
    e.sample(0, 0, 0.0)
    assert e.delay(0, 0) == pytest.approx(0.002)


def test_forget_returns_to_the_initial_delay():
    e = est(0.25)
    for _ in range(10):
        e.sample(0, 1, 0.001)
    assert e.delay(0, 1) < INITIAL
    e.forget(0, 1)
    assert e.delay(0, 1) == INITIAL


def test_backoff_doubles_up_to_the_ceiling_and_a_sample_resets_it():
    e = est(0.1, floor=0.005)
    seen = [e.backoff(0, 0) for _ in range(4)]
    assert seen == pytest.approx([2 * INITIAL, 4 * INITIAL, 0.1, 0.1])
    for _ in range(20):
        e.sample(0, 0, 0.0002)
    assert e.delay(0, 0) == pytest.approx(0.005)


def test_negative_sample_counts_as_zero():
    e = est(0.25, floor=0.0)
    e.sample(0, 0, -1.0)
    assert e.delay(0, 0) == 0.0


def test_groups_are_kept_apart():
    e = est(0.25, floor=0.0)
    e.sample(1, 0, 0.001)
    assert e.delay(1, 0) < INITIAL
    assert e.delay(0, 0) == INITIAL
