"""The steering decision (gbalance.process.steering) on made-up samples and a made-up clock."""

from __future__ import annotations

from gbalance.process.steering import HOLD, NUDGE_EVERY, SPREAD, TICK, Sample, Steering


class Run:
    """Feeds a Steering one sample per tick; counters grow as told."""

    def __init__(self, n: int, **kw):
        self.st = Steering(n, **kw)
        self.n = n
        self.now = 1000.0
        self.accepted = [0] * n
        self.open = [0] * n
        self.cpu = 0.0

    def tick(self, queued: int = 0, took: int = 0, busy: float = 0.0, opened: "list[int] | None" = None) -> int:
        """One tick: ``took`` accepted (by worker 0), ``busy`` cores used, ``opened`` open counts now."""
        self.now += TICK
        self.accepted[0] += took
        self.cpu += busy * TICK
        if opened is not None:
            self.open = list(opened)
        cpu = self.cpu if self.st.cpu_due(self.now) else None
        return self.st.decide(Sample(self.now, queued, tuple(self.accepted), tuple(self.open), cpu))


def test_one_worker_is_never_steered():
    r = Run(1)
    assert [r.tick(queued=100) for _ in range(5)] == [1] * 5


def test_a_busy_first_worker_that_keeps_up_keeps_the_others_on_standby():
    # The bench's load: ~1,200 accepted per tick and up to 50 waiting at a
    # time (at most 2 ms of waiting at that rate): the second worker stays out.
    r = Run(2)
    for i in range(200):
        assert r.tick(queued=50 if i % 2 else 0, took=1200, busy=1.0) == 1


def test_clients_waiting_longer_than_the_limit_bring_one_more_worker_per_tick():
    r = Run(4)
    r.tick(took=100)
    assert r.tick(queued=1000, took=100) == 1           # not yet: waiting at one sample only
    assert r.tick(queued=1000, took=100) == 2           # 1000 waiting at 2,000/s: 500 ms
    assert "clients wait" in r.st.why
    assert r.tick(queued=1000, took=200) == 3
    assert r.tick(queued=1000, took=300) == 4
    assert r.tick(queued=1000, took=300) == 4           # no more than there are


def test_a_stalled_worker_with_clients_waiting_brings_the_next_one():
    r = Run(3)
    r.tick(took=10)
    assert r.tick(queued=0, took=0) == 1                # nobody waits: idle, not stalled
    assert r.tick(queued=1, took=0) == 1                # one client that may have just come
    assert r.tick(queued=0, took=1) == 1                # ... and was taken
    assert r.tick(queued=1, took=0) == 1
    assert r.tick(queued=1, took=0) == 2                # still there a tick later: stalled
    assert "none was accepted" in r.st.why


def test_one_client_now_and_then_at_light_load_brings_nobody():
    # A few connections a tick, one of them caught waiting at a sample now and then.
    r = Run(2)
    for i in range(200):
        assert r.tick(queued=1 if i % 3 == 0 else 0, took=2) == 1


def test_the_first_sample_decides_nothing_about_the_rate():
    r = Run(2)
    assert r.tick(queued=3, took=0) == 1                # no earlier sample to compare with
    assert r.tick(queued=3, took=0) == 2


def test_long_lived_connections_are_spread_as_many_workers_as_it_takes():
    r = Run(4)
    assert r.tick(opened=[SPREAD - 1, 0, 0, 0]) == 1
    assert r.tick(opened=[3 * SPREAD, 0, 0, 0]) == 2
    assert r.tick(opened=[3 * SPREAD, 2 * SPREAD, 0, 0]) == 3
    # Several at once when each is that far behind the ones before it.
    r = Run(4)
    assert r.tick(opened=[5 * SPREAD, 3 * SPREAD, SPREAD, 0]) == 4


def test_fewer_workers_after_a_quiet_hold_with_little_cpu():
    r = Run(2)
    r.tick(queued=500, took=100)
    assert r.tick(queued=500, took=100, busy=1.5) == 2
    ticks = 0
    while r.tick(took=500, busy=0.3) == 2:
        ticks += 1
        assert ticks < 10 * HOLD / TICK, "never went back to one worker"
    # Once the pressure ended: a hold without pressure, then a hold of CPU measured.
    assert 2 * HOLD / TICK - 2 <= ticks <= 2 * HOLD / TICK + 2, ticks
    assert "0.30 of a core" in r.st.why


def test_a_replaced_worker_s_cpu_time_starting_over_is_not_taken_for_idleness():
    r = Run(2)
    r.tick(queued=500, took=100)
    assert r.tick(queued=500, took=100) == 2
    for _ in range(int(1.5 * HOLD / TICK)):
        r.tick(took=1000, busy=1.4)
    r.cpu -= 30.0                                       # one worker's CPU time gone with it
    for _ in range(int(0.9 * HOLD / TICK)):
        assert r.tick(took=1000, busy=1.4) == 2


def test_no_fewer_workers_while_they_are_busy():
    r = Run(2)
    r.tick(queued=500, took=100)
    assert r.tick(queued=500, took=100) == 2
    for _ in range(int(5 * HOLD / TICK)):
        assert r.tick(took=1000, busy=1.4) == 2          # two workers at 70 %: one would not do


def test_no_fewer_workers_if_the_spread_would_take_one_straight_back():
    r = Run(2)
    assert r.tick(opened=[2 * SPREAD, 0]) == 2
    for _ in range(int(5 * HOLD / TICK)):
        assert r.tick(opened=[2 * SPREAD, SPREAD // 2]) == 2


def test_grow_from_outside_as_when_a_worker_dies():
    st = Steering(3)
    assert st.grow("worker 0 died", 5.0) == 2 and st.why == "worker 0 died"
    assert st.grow("worker 1 died", 5.0) == 3
    assert st.grow("again", 5.0) == 3


def test_a_stall_with_every_worker_accepting_nudges_them_instead():
    # All workers accept already (none can be added): a client that waits two
    # samples with nothing accepted in between asks the accepting workers to
    # look at the listener (a lost wake-up), once, then at most every NUDGE_EVERY.
    r = Run(2)
    r.tick(opened=[2 * SPREAD, 0])
    assert r.st.accepting == 2 and not r.st.nudge
    r.tick(queued=1)
    assert not r.st.nudge                               # one sample: may have just come
    assert r.tick(queued=1) == 2 and r.st.nudge
    assert "none was accepted" in r.st.why
    nudges = 0
    for _ in range(int(NUDGE_EVERY / TICK) * 3 + 5):    # still stuck (every worker at its limit, say)
        assert r.tick(queued=1) == 2
        nudges += r.st.nudge
    assert nudges == 3
    # Taken at last; the next stall is nudged as soon as it is seen.
    r.tick(queued=0, took=1)
    r.tick(queued=1)
    r.tick(queued=1)
    assert r.st.nudge


def test_no_nudge_while_clients_are_taken_or_a_worker_can_be_added():
    r = Run(2)
    r.tick(opened=[2 * SPREAD, 0])
    for _ in range(50):                                  # waiting, but being accepted
        r.tick(queued=5, took=10)
        assert not r.st.nudge
    r = Run(3)
    r.tick(queued=1)
    assert r.tick(queued=1) == 2 and not r.st.nudge     # stalled: one more worker instead
