"""gbalance.proxy.bulkmode: a bulk flow measures splicing against copying and keeps the faster.

The clock is made up: each test says when every wake-up ended and what
it moved, as the flow does from its loop's time.
"""

from __future__ import annotations

import pytest

from gbalance.proxy import bulkmode
from gbalance.proxy.bulkmode import HOLD, MARGIN, STALE, TRIALS, WINDOW, BulkChoice

MB = 1 << 20


def run(choice: BulkChoice, now: float, seconds: float, rate: dict[bool, float], tick: float = 0.001
        ) -> tuple[float, list[bool]]:
    """Wake-ups every ``tick`` s for ``seconds``, each moving what the way in
    use moves per second (``rate[copy]``) times ``tick``; the ways used."""
    ways = []
    end = now + seconds
    while now < end - 1e-9:
        now += tick
        ways.append(choice.step(now, int(rate[choice.copy] * tick)))
    return now, ways


def test_it_starts_splicing_and_measures_both_ways_in_turn():
    choice = BulkChoice(True, 100.0)
    assert choice.copy is False and choice.trial
    now, ways = run(choice, 100.0, WINDOW * 2 * TRIALS + 0.01, {False: 1000 * MB, True: 1000 * MB})
    # splice, copy, splice, copy: three changes of way, then a choice.
    assert choice.switches >= 3 and not choice.trial
    assert True in ways and False in ways


def test_copying_is_kept_when_it_moves_clearly_more():
    choice = BulkChoice(True, 0.0)
    now, _ = run(choice, 0.0, WINDOW * 2 * TRIALS + 0.01, {False: 1500 * MB, True: 2000 * MB})
    assert choice.copy is True and not choice.trial
    # It holds: no change of way until HOLD has passed.
    switches = choice.switches
    now, ways = run(choice, now, HOLD - 0.05, {False: 1500 * MB, True: 2000 * MB})
    assert all(ways) and choice.switches == switches


def test_splicing_is_kept_when_copying_is_slower_or_only_a_little_faster():
    for copied in (1000 * MB, 1500 * MB * (MARGIN - 0.02)):
        choice = BulkChoice(True, 0.0)
        run(choice, 0.0, WINDOW * 2 * TRIALS + 0.01, {False: 1500 * MB, True: copied})
        assert choice.copy is False, copied


def test_a_rate_limited_stream_keeps_splicing():
    """An application that sends at its own pace moves the same either way:
    splicing, the cheaper for the proxy, stays."""
    choice = BulkChoice(True, 0.0)
    run(choice, 0.0, WINDOW * 2 * TRIALS + 0.01, {False: 50 * MB, True: 50 * MB})
    assert choice.copy is False


def test_after_the_hold_it_measures_again_and_follows_a_change():
    choice = BulkChoice(True, 0.0)
    now, _ = run(choice, 0.0, WINDOW * 2 * TRIALS + 0.01, {False: 1000 * MB, True: 2000 * MB})
    assert choice.copy is True
    # Conditions change (say the proxy's core got busy): splicing is now faster.
    now, ways = run(choice, now, HOLD + WINDOW * 2 * TRIALS + 0.02, {False: 2000 * MB, True: 1000 * MB})
    assert choice.copy is False and not choice.trial
    assert ways[-1] is False


def test_an_idle_gap_in_a_window_voids_that_comparison():
    choice = BulkChoice(True, 0.0)
    choice.step(0.001, MB)
    # The sender pauses well past the window: the window's rate says nothing.
    assert choice.step(0.001 + WINDOW * (STALE + 1), MB) is False
    assert not choice.trial and choice.switches == 0
    # The next comparison starts only after the hold.
    assert choice.step(0.001 + WINDOW * (STALE + 1) + HOLD / 2, MB) is False and not choice.trial


def test_without_a_pipe_a_bulk_flow_copies_and_never_measures():
    choice = BulkChoice(False, 0.0)
    assert choice.copy is True and not choice.trial
    _, ways = run(choice, 0.0, 2 * HOLD, {False: 0, True: 100 * MB}, tick=0.01)
    assert all(ways) and choice.switches == 0


def test_window_and_hold_are_read_when_a_choice_is_made(monkeypatch):
    monkeypatch.setattr(bulkmode, "WINDOW", 0.5)
    monkeypatch.setattr(bulkmode, "HOLD", 7.0)
    choice = BulkChoice(True, 0.0)
    assert (choice.window, choice.hold) == (0.5, 7.0)
    assert BulkChoice(True, 0.0, window=0.01, hold=0.02).window == 0.01


@pytest.mark.parametrize("moved", [0, 1])
def test_a_wake_up_inside_a_window_changes_nothing(moved):
    choice = BulkChoice(True, 0.0)
    assert choice.step(WINDOW / 2, moved) is False
    assert choice.windows == 0 and choice.moved == moved
