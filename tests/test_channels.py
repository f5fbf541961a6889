"""gbalance.table.channels: every channel state transition, over a real state file."""

from __future__ import annotations

import os

import pytest

from gbalance.table import layout as L
from gbalance.table import state as S
from gbalance.table.channels import Channels, Result, last_resort, usable, valid_address
from gbalance.table.layout import ENABLED, HARD_DISABLED, HASH, MON_DISABLED, MON_ENABLED, SOFT_DISABLED


@pytest.fixture
def st(tmp_path):
    state = S.SharedState.create(str(tmp_path / "balance.8080.any"))
    yield state
    state.close()


@pytest.fixture
def ch(st):
    c = Channels(st)
    g = c.add_group()
    c.add_channel(g, "127.0.0.1", 8001)
    c.add_channel(g, "::1", 8002)
    return c


@pytest.mark.parametrize("text, ok", [
    ("127.0.0.1", True), ("::1", True), ("2001:db8::5", True), ("::ffff:10.0.0.1", True),
    ("", False), ("localhost", False), ("1.2.3.4; touch x", False), ("$(id)", False),
    ("1.2.3", False), ("127.0.0.1 ", False), ("1.2.3.4\n", False), ("\u0661.2.3.4", False),
    ("x" * 100, False),
])
def test_valid_address_is_numeric_only(text, ok):
    assert valid_address(text) is ok


def test_admin_enable_disable_and_already(ch, st):
    assert ch.disable(0, 0) == Result.OK and ch.status(0, 0) == HARD_DISABLED
    assert ch.disable(0, 0) == Result.ALREADY
    assert ch.enable(0, 0) == Result.OK and ch.status(0, 0) == ENABLED
    assert ch.enable(0, 0) == Result.ALREADY
    assert ch.enable(0, 2) == Result.NO_CHANNEL and ch.disable(1, 0) == Result.NO_CHANNEL
    assert ch.enable(-1, 0) == Result.NO_CHANNEL and ch.enable(0, -1) == Result.NO_CHANNEL
    st.set_status(0, 1, SOFT_DISABLED)
    assert ch.enable(0, 1) == Result.OK and ch.status(0, 1) == ENABLED   # admin beats monitoring


def test_create_starts_hard_disabled_and_fills_up(ch, st):
    assert ch.create(0, "10.0.0.1", 80) == (Result.OK, 2)
    assert ch.status(0, 2) == HARD_DISABLED and st.address(0, 2) == "10.0.0.1"
    assert ch.create(3, "10.0.0.1", 80) == (Result.OK, 0) and st.ngroups == 4   # group 3 made
    assert ch.create(0, "not-an-ip", 80)[0] == Result.INVALID_ADDRESS
    assert ch.create(0, "10.0.0.1", 0)[0] == Result.OUT_OF_RANGE
    assert ch.create(0, "10.0.0.1", 65536)[0] == Result.OUT_OF_RANGE
    assert ch.create(L.MAXGROUPS, "10.0.0.1", 80)[0] == Result.OUT_OF_RANGE
    for _ in range(L.MAXCHANNELS - 3):
        assert ch.create(0, "10.0.0.2", 80)[0] == Result.OK
    assert ch.create(0, "10.0.0.3", 80) == (Result.NO_SLOTS, -1)


def test_assign_only_on_hard_disabled(ch, st):
    gen = st.generation
    assert ch.assign(0, 0, "10.0.0.9", 9) == Result.NOT_DISABLED           # ENA
    st.set_status(0, 0, SOFT_DISABLED)
    assert ch.assign(0, 0, "10.0.0.9", 9) == Result.NOT_DISABLED           # dis
    ch.disable(0, 0)
    st.put(0, 0, L.C_FAILS, 4)
    assert ch.assign(0, 0, "10.0.0.9", 9) == Result.OK
    assert (st.address(0, 0), st.get(0, 0, L.C_PORT), st.get(0, 0, L.C_FAILS)) == ("10.0.0.9", 9, 0)
    assert st.generation == gen + 1
    assert ch.assign(0, 5, "10.0.0.9", 9) == Result.NO_CHANNEL
    assert ch.assign(0, 0, "bad", 9) == Result.INVALID_ADDRESS


def test_maxc_and_reset(ch, st):
    assert ch.set_maxc(0, 1, 3) == Result.OK and st.get(0, 1, L.C_MAXC) == 3
    assert ch.set_maxc(0, 1, -1) == Result.OUT_OF_RANGE and ch.set_maxc(0, 1, 2**31) == Result.OUT_OF_RANGE
    assert ch.set_maxc(0, 9, 1) == Result.NO_CHANNEL
    for field, value in ((L.C_TOTALC, 7), (L.C_SENT, 100), (L.C_RCVD, 200), (L.C_C, 2)):
        st.put(0, 0, field, value)
    assert ch.reset(0, 0) == Result.OK
    snap = st.channel(0, 0)
    assert (snap.totalc, snap.sent, snap.rcvd, snap.c) == (0, 0, 0, 2)     # open links stay counted
    assert ch.reset(0, 9) == Result.NO_CHANNEL


def test_group_type_and_monitor_switch(ch, st):
    assert ch.set_group_type(2, HASH) == Result.OK and st.ngroups == 3 and st.group_type(2) == HASH
    assert ch.set_group_type(L.MAXGROUPS, HASH) == Result.OUT_OF_RANGE
    assert ch.set_group_type(0, 7) == Result.BAD_REQUEST
    assert ch.set_monitor(True) == Result.NO_MONITOR                        # started without -m
    st.set_monitor(MON_ENABLED)
    assert ch.set_monitor(True) == Result.ALREADY
    ch.mark_suspect(0, 0)
    assert ch.set_monitor(False) == Result.OK and st.monitor == MON_DISABLED
    assert st.get(0, 0, L.C_SUSPECT) == 0                                    # nothing would clear it
    assert ch.set_monitor(True) == Result.OK and st.monitor == MON_ENABLED


def test_soft_disable_only_from_enabled_and_restarts_rise_count(ch, st):
    st.put(0, 0, L.C_PASSES, 5)
    assert ch.soft_disable(0, 0) and ch.status(0, 0) == SOFT_DISABLED
    assert st.get(0, 0, L.C_PASSES) == 0
    assert not ch.soft_disable(0, 0)
    ch.disable(0, 1)
    assert not ch.soft_disable(0, 1) and ch.status(0, 1) == HARD_DISABLED


def test_suspect_marks(ch, st):
    assert ch.mark_suspect(0, 0) and not ch.mark_suspect(0, 0)
    assert not usable(st.q, L.slot(0, 0, 0)) and last_resort(st.q, L.slot(0, 0, 0))
    assert ch.clear_suspect(0, 0) and not ch.clear_suspect(0, 0)
    ch.disable(0, 1)
    assert not ch.mark_suspect(0, 1)                                         # DIS is left alone


def test_rise_and_fall(ch, st):
    out = [ch.check_failed(0, 0, 3, True) for _ in range(3)]
    assert [(o.count, o.changed, o.counting) for o in out] == [(1, False, True), (2, False, True), (3, True, False)]
    assert ch.status(0, 0) == SOFT_DISABLED
    ok = [ch.check_passed(0, 0, 2, True) for _ in range(2)]
    assert [(o.count, o.changed) for o in ok] == [(1, False), (2, True)]
    assert ch.status(0, 0) == ENABLED and st.get(0, 0, L.C_FAILS) == 0
    # noenable / nodisable: counted, never changed
    assert not ch.check_failed(0, 0, 1, False).changed and ch.status(0, 0) == ENABLED
    st.set_status(0, 0, SOFT_DISABLED)
    assert not ch.check_passed(0, 0, 1, False).changed and ch.status(0, 0) == SOFT_DISABLED
    ch.mark_suspect(0, 0)
    assert ch.check_passed(0, 0, 5, True).unsuspected


def test_invalid_address_read_back_is_hard_disabled(ch, st):
    off = L.ADDR_OFFSET + 1 * L.ADDR_LEN                 # channel 1 of group 0
    st.mm[off: off + L.ADDR_LEN] = b"1.2.3.4;reboot".ljust(L.ADDR_LEN, b"\0")
    assert ch.address_of(0, 1) is None and ch.address_of(0, 0) == ("127.0.0.1", 8001)
    assert ch.invalidate(0, 1) and ch.status(0, 1) == HARD_DISABLED and not ch.invalidate(0, 1)
    assert ch.enable(0, 1) == Result.INVALID_ADDRESS
    st.put(0, 0, L.C_PORT, 70000)
    assert ch.address_of(0, 0) is None


def test_usable_and_last_resort(ch, st):
    q, b0 = st.q, L.slot(0, 0, 0)
    assert usable(q, b0)
    ch.set_maxc(0, 0, 1)
    st.put(0, 0, L.C_C, 1)
    assert not usable(q, b0) and not last_resort(q, b0)                      # full
    st.put(0, 0, L.C_C, 0)
    ch.soft_disable(0, 0)
    assert not usable(q, b0) and last_resort(q, b0)
    ch.disable(0, 0)
    assert not usable(q, b0) and not last_resort(q, b0)


def test_address_cache_disables_what_it_cannot_trust(ch, st):
    from gbalance.proxy.server import AddressCache

    class Log:
        lines: list[str] = []

        def warning(self, text: str) -> None:
            self.lines.append(text)

    log = Log()
    cache = AddressCache(st, ch, log)
    cache.refresh()
    assert cache(0, 0)[1] == ("127.0.0.1", 8001) and cache(0, 1)[1][:2] == ("::1", 8002)
    off = L.ADDR_OFFSET + 1 * L.ADDR_LEN
    st.mm[off: off + L.ADDR_LEN] = b"$(touch x)".ljust(L.ADDR_LEN, b"\0")
    st.bump_generation()
    cache.refresh()
    assert ch.status(0, 1) == HARD_DISABLED
    assert log.lines == ["group 0 channel 1: invalid address in the state file, channel disabled"]


# -- the state machine as a table --------------------------------------------------

from gbalance.table import channels as CH  # noqa: E402
from gbalance.table.channels import TRANSITIONS, Event, Mark, Step  # noqa: E402
from gbalance.table.layout import C_SUSPECT, ChannelState  # noqa: E402

# The rules in words (the module's docstring), written out independently of
# how channels.py builds its table: (state, event) -> (state after, mark).
_E, _S, _H = ChannelState.ENABLED, ChannelState.SOFT_DISABLED, ChannelState.HARD_DISABLED
_RULES = {
    Event.ADMIN_ENABLE: lambda s: (_E, Mark.KEEP),
    Event.ADMIN_DISABLE: lambda s: (_H, Mark.KEEP),
    Event.CONNECT_FAILED: lambda s: (_S if s == _E else s, Mark.KEEP),
    Event.CONNECT_PENDING: lambda s: (s, Mark.KEEP if s == _H else Mark.SET),
    Event.CONNECT_SUCCEEDED: lambda s: (s, Mark.CLEAR),
    Event.CHECK_PASSED: lambda s: (s, Mark.CLEAR),
    Event.RISE: lambda s: (_E if s == _S else s, Mark.CLEAR),
    Event.FALL: lambda s: (_S if s == _E else s, Mark.KEEP),
    Event.MONITOR_OFF: lambda s: (s, Mark.CLEAR),
    Event.ADDRESS_INVALID: lambda s: (_H, Mark.CLEAR),
    Event.READDRESS: lambda s: (s, Mark.CLEAR),
}


def test_the_table_covers_every_state_and_event_and_says_what_the_docstring_says():
    assert set(_RULES) == set(Event)
    assert set(TRANSITIONS) == {(s, e) for s in ChannelState for e in Event}
    for (s, e), step in TRANSITIONS.items():
        assert (step.to, step.suspect) == _RULES[e](s), (s, e)
    for e in Event:                                  # every event is in the docstring's table
        assert f"``{e.name}``" in CH.__doc__


def test_the_states_keep_the_file_layout():
    assert (int(_E), int(_S), int(_H)) == (0, 1, 2)
    assert L.MON_NONE == 0 and L.MON_ENABLED == 1 and L.MON_DISABLED == 2


@pytest.mark.parametrize("key", sorted(TRANSITIONS, key=lambda k: (k[0], k[1].name)),
                         ids=lambda k: f"{k[0].name}-{k[1].name}")
@pytest.mark.parametrize("suspect", [0, 1])
def test_fire_executes_every_row_on_the_file(ch, st, key, suspect):
    state, event = key
    step: Step = TRANSITIONS[key]
    st.set_status(0, 0, state)
    st.q[L.slot(0, 0, C_SUSPECT)] = suspect
    other = st.channel(0, 1)
    fired = ch.fire(0, 0, event)
    assert ch.status(0, 0) == step.to and fired.before == state and fired.after == step.to
    assert fired.changed == (state != step.to)
    want = {Mark.KEEP: suspect, Mark.SET: 1, Mark.CLEAR: 0}[step.suspect]
    assert st.q[L.slot(0, 0, C_SUSPECT)] == want
    assert fired.suspect_set == (want and not suspect)
    assert fired.suspect_cleared == (suspect and not want)
    assert st.channel(0, 1) == other                 # nothing else in the table moved


def test_a_status_the_file_should_not_hold_counts_as_hard_disabled(ch, st):
    st.q[L.slot(0, 0, L.C_STATUS)] = 7
    assert not ch.soft_disable(0, 0) and st.q[L.slot(0, 0, L.C_STATUS)] == 7
    assert not ch.mark_suspect(0, 0)
    assert ch.invalidate(0, 0) and ch.status(0, 0) == HARD_DISABLED


def test_with_workers_a_change_waits_for_the_lock_another_process_holds(st):
    import threading

    from gbalance.table.counters import lock, unlock
    setup = Channels(st)
    setup.add_channel(setup.add_group(), "127.0.0.1", 8001)
    held, mine = st.open_own_lock(), st.open_own_lock()    # two opens: two "processes"
    try:
        ch = Channels(st, lock_fd=mine)
        lock(held)
        worker = threading.Thread(target=ch.fire, args=(0, 0, Event.CONNECT_FAILED))
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and ch.status(0, 0) == ENABLED     # waits for the holder
        unlock(held)
        worker.join(10)
        assert not worker.is_alive() and ch.status(0, 0) == SOFT_DISABLED
    finally:
        os.close(held)
        os.close(mine)
