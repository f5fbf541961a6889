"""Per-process counter rows and the maxc lock (gbalance.table.counters), in real processes."""

from __future__ import annotations

import os

import pytest

from gbalance.table import layout as L
from gbalance.table import state as S
from gbalance.table.channels import Channels
from gbalance.table.counters import Counters


@pytest.fixture
def st(tmp_path):
    state = S.SharedState.create(str(tmp_path / "balance.8080.any"))
    g = state.add_group()
    state.add_channel(g, "127.0.0.1", 8080)
    yield state
    state.close()


def test_single_row_counts_as_before(st):
    c = Counters(st)
    base = L.slot(0, 0, 0)
    assert not c.shared and c.room(base)
    c.count_attempt(base)
    assert st.get(0, 0, L.C_C) == 1 and st.get(0, 0, L.C_TOTALC) == 1
    st.put(0, 0, L.C_MAXC, 1)
    assert not c.room(base)          # one open, limit one
    c.uncount(base)
    assert c.room(base) and st.get(0, 0, L.C_C) == 0


def test_rows_are_summed_and_held_once(st):
    st.set_workers(3)
    base = L.slot(0, 0, 0)
    w0, w2 = Counters(st, 0, 3, st.open_own_lock()), Counters(st, 2, 3, st.open_own_lock())
    w2.count_attempt(base)
    w2.count_attempt(base)
    w0.count_attempt(base)
    assert st.q[base + L.C_C + L.row_offset(2)] == 2 and st.get(0, 0, L.C_C) == 1
    snap = st.channel(0, 0)
    assert (snap.c, snap.totalc) == (3, 3)
    st.put(0, 0, L.C_MAXC, 4)
    assert w0.room(base)             # counted at once, under the lock ...
    assert st.channel(0, 0).c == 4
    w0.count_attempt(base)           # ... and not again when the connect starts
    assert st.channel(0, 0).c == 4 and st.channel(0, 0).totalc == 4
    assert not w2.room(base)         # full for every worker
    w2.uncount(base)
    assert w2.room(base)


def test_reset_records_baselines_and_loses_no_count(st):
    st.set_workers(2)
    base = L.slot(0, 0, 0)
    w1 = Counters(st, 1, 2)
    for _ in range(5):
        w1.count_attempt(base)
    st.q[base + L.C_SENT + L.row_offset(1)] += 100
    assert Channels(st).reset(0, 0).name == "OK"
    snap = st.channel(0, 0)
    assert (snap.totalc, snap.sent, snap.c) == (0, 0, 5)
    assert st.q[base + L.C_TOTALC + L.row_offset(1)] == 5     # the worker's row is untouched
    w1.count_attempt(base)
    assert st.channel(0, 0).totalc == 1


def test_maxc_lock_is_exact_across_processes(st):
    """Four processes race for one slot of maxc 1; none ever sees two taken."""
    st.set_workers(4)
    st.put(0, 0, L.C_MAXC, 1)
    base = L.slot(0, 0, 0)
    pids = []
    for w in range(4):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                c = Counters(st, w, 4, st.open_own_lock())
                for _ in range(3000):
                    if c.room(base):
                        c.count_attempt(base)
                        if c.open_count(base) > 1:
                            code = 1
                        c.uncount(base)
            except BaseException:
                code = 2
            os._exit(code)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    assert codes == [0, 0, 0, 0]
    assert st.channel(0, 0).c == 0 and st.channel(0, 0).totalc > 0


def test_own_lock_is_a_separate_open(st):
    fd = st.open_own_lock()
    try:
        assert fd != st.lock_fd
        assert os.stat(f"/proc/self/fd/{fd}").st_ino == os.fstat(st.lock_fd).st_ino
    finally:
        os.close(fd)


def test_the_attempt_hook_counts_as_count_attempt(st):
    """Counters.attempt(g, c) (the connect hook without -d) is count_attempt of
    the channel's record: once per connect, a connection room() held counted once."""
    g = st.add_group()
    for port in (9001, 9002):
        st.add_channel(g, "127.0.0.1", port)
    st.set_workers(2)
    w1 = Counters(st, 1, 2)
    w1.attempt(1, 1)
    w1.attempt(1, 1)
    assert (st.channel(1, 1).c, st.channel(1, 1).totalc) == (2, 2)
    assert st.q[L.slot(1, 1, L.C_C) + L.row_offset(1)] == 2           # in its own row only
    assert (st.channel(1, 0).c, st.channel(0, 0).c) == (0, 0)
    st.put(1, 0, L.C_MAXC, 5)
    assert w1.room(L.slot(1, 0, 0))      # counted at once, held ...
    w1.attempt(1, 1)                     # ... an attempt elsewhere counts normally ...
    w1.attempt(1, 0)                     # ... and the held one is not counted again
    assert (st.channel(1, 0).c, st.channel(1, 0).totalc) == (1, 1)
    assert (st.channel(1, 1).c, st.channel(1, 1).totalc) == (3, 3)
    w1.attempt(1, 0)
    assert (st.channel(1, 0).c, st.channel(1, 0).totalc) == (2, 2)
