"""gbalance.proxy.watchers.Watchers: the per-loop pool of recycled libev watchers.

Every test runs on the real gevent hub loop with real sockets; timings are
measured around loop turns (``gevent.sleep``), each wait bounded.
"""

from __future__ import annotations

import gc
import socket
import time
import weakref

import gevent
import pytest
from gevent import get_hub

from gbalance.proxy import watchers as watchers_mod
from gbalance.proxy.watchers import KEEP, Watchers

LIMIT = 5.0   # seconds any single wait may take


class Holder:
    """Something a watcher's callback can keep alive (a link, a race)."""

    def callback(self, *args) -> None:
        pass


def wait_until(predicate, timeout: float = LIMIT) -> None:
    """Run the loop until ``predicate()`` is true (or fail after ``timeout``)."""
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.002)


def fire_delay(timer, arm: str = "again") -> float:
    """Arm ``timer`` (``again()``, as the race arms pooled timers, or
    ``start()``) and return the seconds until its callback ran."""
    fired: list[float] = []
    get_hub().loop.update_now()      # the loop may have been idle: start from now
    t0 = time.monotonic()
    getattr(timer, arm)(lambda: fired.append(time.monotonic() - t0))
    try:
        wait_until(lambda: fired)
    finally:
        timer.stop()
    return fired[0]


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pool():
    return Watchers(get_hub().loop, timeout=0.2)


# -- I/O watchers -----------------------------------------------------------------------

def test_io_reuses_a_recycled_watcher_on_a_new_fd_and_events(pool, pair):
    """A recycled stopped I/O watcher is handed out again (no new one), pointed
    at the new descriptor and events, and it then really watches that descriptor."""
    a, b = pair
    w = pool.io(a.fileno(), 1)
    assert pool.io_free == []
    pool.recycle_io(w)
    assert pool.io_free == [w]
    again = pool.io(b.fileno(), 2)
    assert again is w and pool.io_free == []
    assert again.fd == b.fileno()
    assert again.events & 3 == 2
    hits = []
    again.start(hits.append, "writable")     # a fresh socket is writable at once
    try:
        wait_until(lambda: hits)
    finally:
        again.stop()
    assert hits[0] == "writable"
    # An empty pool makes a new watcher.
    other = pool.io(a.fileno(), 1)
    assert other is not w and other.fd == a.fileno() and other.events & 3 == 1


def test_recycled_io_watcher_watches_its_new_fd_not_the_old_one(pool, pair):
    """After recycling onto another descriptor, readiness of the old one no
    longer fires the watcher and readiness of the new one does."""
    a, b = pair
    c, d = socket.socketpair()
    try:
        w = pool.io(a.fileno(), 1)
        pool.recycle_io(w)
        w = pool.io(c.fileno(), 1)
        hits = []
        w.start(lambda: hits.append(True))
        try:
            b.send(b"x")                  # makes ``a`` (the old fd) readable
            gevent.sleep(0.05)
            assert hits == []
            d.send(b"y")                  # makes ``c`` (the new fd) readable
            wait_until(lambda: hits)
        finally:
            w.stop()
    finally:
        c.close()
        d.close()


@pytest.mark.parametrize("kind", ["io", "timer"])
def test_recycling_drops_callback_and_args(pool, pair, kind):
    """A recycled watcher keeps neither its callback nor its arguments: the
    object they were bound to (a closed link, a finished race) is freed.

    The callback is set on a stopped watcher directly, so the test fails if
    the recycle itself stops clearing them (gevent's stop() already clears
    what start() set; that case is checked too)."""
    a, _ = pair
    w = pool.io(a.fileno(), 1) if kind == "io" else pool.timer()
    recycle = pool.recycle_io if kind == "io" else pool.recycle_timer
    free = pool.io_free if kind == "io" else pool.timer_free

    held = Holder()
    ref = weakref.ref(held)
    w.callback = held.callback
    w.args = (held,)
    del held
    recycle(w)
    assert free == [w]
    assert w.callback is None and w.args is None
    gc.collect()
    assert ref() is None, "the pooled watcher still keeps its old callback's object alive"

    # Started, stopped and recycled, as a link or a race does.
    w = pool.io(a.fileno(), 1) if kind == "io" else pool.timer()
    held = Holder()
    ref = weakref.ref(held)
    w.start(held.callback, held)
    w.stop()
    del held
    recycle(w)
    gc.collect()
    assert ref() is None


def test_at_most_keep_of_each_kind_are_kept(pool, pair):
    """The pool keeps at most KEEP stopped watchers of each kind; more are dropped."""
    a, _ = pair
    loop = get_hub().loop
    ios = [loop.io(a.fileno(), 1) for _ in range(KEEP + 5)]
    timers = [loop.timer(0.2) for _ in range(KEEP + 5)]
    for w in ios:
        pool.recycle_io(w)
    for t in timers:
        pool.recycle_timer(t)
    assert len(pool.io_free) == KEEP
    assert len(pool.timer_free) == KEEP
    assert pool.io_free == ios[:KEEP] and pool.timer_free == timers[:KEEP]


def test_keep_is_read_at_recycle_time(pool, pair, monkeypatch):
    """The bound is the module's KEEP (a small one here), for both kinds."""
    monkeypatch.setattr(watchers_mod, "KEEP", 2)
    a, _ = pair
    loop = get_hub().loop
    for _ in range(4):
        pool.recycle_io(loop.io(a.fileno(), 1))
        pool.recycle_timer(loop.timer(0.2))
    assert len(pool.io_free) == 2 and len(pool.timer_free) == 2


def test_an_active_watcher_is_never_kept(pool, pair):
    """Recycling a watcher that is still active keeps nothing and leaves it
    alone: still active, callback intact, still firing."""
    a, b = pair
    hits = []
    w = pool.io(a.fileno(), 1)
    w.start(hits.append, "read")
    t = pool.timer()
    t.start(hits.append, "timer")
    try:
        pool.recycle_io(w)
        pool.recycle_timer(t)
        assert pool.io_free == [] and pool.timer_free == []
        assert w.active and t.active
        assert w.callback is not None and w.args == ("read",)
        assert t.callback is not None and t.args == ("timer",)
        b.send(b"x")
        wait_until(lambda: "read" in hits and "timer" in hits)
    finally:
        w.stop()
        t.stop()
    assert pool.recycle_io(None) is None and pool.io_free == []
    assert pool.recycle_timer(None) is None and pool.timer_free == []


# -- timers -------------------------------------------------------------------------------

def test_new_timer_has_the_pool_timeout(pool):
    """An empty pool makes a timer of its ``timeout`` (0.2 s here)."""
    d = fire_delay(pool.timer())
    assert 0.18 <= d < 1.0, d


def test_pooled_timer_stopped_before_firing_waits_its_full_delay(pool):
    """A timer stopped at once (a connect that succeeded or was cancelled
    immediately), recycled and started again, waits the full timeout."""
    t = pool.timer()
    t.start(lambda: None)
    t.stop()
    pool.recycle_timer(t)
    again = pool.timer()
    assert again is t
    d = fire_delay(again)
    assert 0.18 <= d < 1.0, d


def test_pooled_timer_stopped_part_way_waits_its_full_delay(pool):
    """A timer stopped part-way through its delay (a connect that succeeded
    or was cancelled after a while), recycled and handed out again, must wait
    the full timeout: it is the next connect's ``-t`` timeout."""
    t = pool.timer()
    t.again(lambda: None)
    gevent.sleep(0.15)               # three quarters of the 0.2 s delay pass
    assert t.active
    t.stop()
    pool.recycle_timer(t)
    again = pool.timer()
    assert again is t
    d = fire_delay(again)
    assert d >= 0.18, f"a recycled 0.2 s timer fired after {d:.3f} s"


def test_gevent_quirk_a_fired_timer_started_again_fires_at_once():
    """Documents the gevent/libev behaviour the pool works around: a timer that
    has FIRED, when started again with ``start()``, fires at once instead of
    after its delay (and one stopped part-way keeps only what was left).

    That is why the pool's timers repeat and the race arms them with
    ``again()`` (see the next test).  If this starts failing, gevent changed."""
    t = get_hub().loop.timer(0.5)
    first = fire_delay(t, "start")
    assert first >= 0.45, first
    assert not t.active
    second = fire_delay(t, "start")
    assert second < 0.25, f"a fired 0.5 s timer restarted waited {second:.3f} s"


def test_pooled_timer_that_fired_waits_its_full_delay_when_armed_again(pool):
    """The pool's timers repeat and are armed with ``again()``: one that fired
    (a connect that timed out), stopped, recycled and armed again waits the
    full timeout, unlike the ``start()`` quirk above."""
    t = pool.timer()
    first = fire_delay(t)
    assert first >= 0.18, first
    pool.recycle_timer(t)
    again = pool.timer()
    assert again is t
    second = fire_delay(again)
    assert second >= 0.18, f"a recycled timer that had fired waited only {second:.3f} s"
