"""The adaptive stagger rule, driven with measured times (no clock, no sockets)."""

from __future__ import annotations

import pytest

from gbalance.stagger import DEFAULT_FLOOR, StaggerEstimator, StaggerRule


def est(ceiling: float = 0.25, floor: float = DEFAULT_FLOOR, n: int = 4) -> StaggerEstimator:
    return StaggerEstimator(StaggerRule(ceiling, floor), n)


def test_unmeasured_channel_uses_the_ceiling():
    e = est(0.25)
    assert e.delay(0) == 0.25
    assert e.delay(3) == 0.25


def test_fast_connects_shrink_the_delay_to_the_floor():
    e = est(0.25, floor=0.005)
    e.sample(0, 0.0002)
    first = e.delay(0)
    for _ in range(30):
        e.sample(0, 0.0002)
    assert e.delay(0) == pytest.approx(0.005)
    assert first <= 0.25
    assert e.delay(1) == 0.25          # other channels keep their own history


def test_delay_follows_srtt_plus_four_deviations():
    e = est(1.0, floor=0.0)
    e.sample(0, 0.010)                 # first sample: srtt 10 ms, var 5 ms
    assert e.delay(0) == pytest.approx(0.010 + 4 * 0.005)
    e.sample(0, 0.010)                 # var decays by a quarter, srtt stays
    assert e.delay(0) == pytest.approx(0.010 + 4 * 0.00375)


def test_slow_connects_grow_the_delay():
    e = est(0.25, floor=0.005)
    for _ in range(20):
        e.sample(0, 0.0005)
    low = e.delay(0)
    for _ in range(5):
        e.sample(0, 0.030)             # the backend (or this machine) got slow
    assert e.delay(0) > low
    assert e.delay(0) > 0.030          # never below the connect times it sees


def test_clamped_by_the_ceiling():
    e = est(0.1)
    for _ in range(10):
        e.sample(2, 0.5)
    assert e.delay(2) == pytest.approx(0.1)


def test_zero_stagger_stays_off():
    e = est(0.0)
    e.sample(0, 0.001)
    assert e.delay(0) == 0.0
    assert not StaggerRule(0.0).enabled


def test_floor_never_exceeds_the_ceiling():
    e = est(0.002, floor=0.005)
    e.sample(0, 0.0)
    assert e.delay(0) == pytest.approx(0.002)


def test_forget_returns_to_the_ceiling():
    e = est(0.25)
    e.sample(1, 0.001)
    assert e.delay(1) < 0.25
    e.forget(1)
    assert e.delay(1) == 0.25


def test_negative_sample_counts_as_zero():
    e = est(0.25, floor=0.0)
    e.sample(0, -1.0)
    assert e.delay(0) == 0.0
