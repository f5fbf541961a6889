"""Worker restart back-off, decided on lifetimes given as numbers (no clock, no sleeps)."""

from __future__ import annotations

from gbalance.process.pool import MAX_BACKOFF, Seat


def test_a_worker_that_keeps_dying_waits_longer_each_time_up_to_the_cap():
    s = Seat(0)
    delays = [s.restart_delay(0.05) for _ in range(9)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]


def test_a_worker_that_lived_a_second_is_replaced_at_once_and_the_backoff_starts_over():
    s = Seat(0)
    for _ in range(4):
        s.restart_delay(0.5)
    assert s.restart_delay(0.999) == 1.6
    assert s.restart_delay(1.0) == 0.0
    assert s.restart_delay(0.1) == 0.1
