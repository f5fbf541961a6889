"""gbalance.table.carry: what a reload copies from the replaced master's table.

Real state files in a temporary directory; the end-to-end behaviour (real
masters, ``balance -r``) is in tests/test_e2e_reload.py.
"""

from __future__ import annotations

import os

import pytest

from gbalance.table import layout as L
from gbalance.table import state as S
from gbalance.table.carry import MAX_COUNT, Carry, open_previous, table_digest
from gbalance.config import ProxyConfig
from gbalance.process.master import fill_table
from gbalance.arguments import ChannelSpec, GroupSpec


def config(*groups: list[tuple[str, int, int]], kinds: tuple[int, ...] = ()) -> ProxyConfig:
    return ProxyConfig(port=1, groups=[
        GroupSpec(kind=kinds[i] if i < len(kinds) else L.RR,
                  channels=[ChannelSpec(a, a, p, m) for a, p, m in g]) for i, g in enumerate(groups)])


@pytest.fixture
def tables(tmp_path):
    """(old, new): two state files, as the replaced and the new master hold them."""
    made = []

    def make(name: str, cfg: ProxyConfig) -> S.SharedState:
        st = S.SharedState.create(str(tmp_path / f"balance.{name}.any"))
        fill_table(st, cfg)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def serve(st: S.SharedState, g: int, c: int, totalc: int, sent: int, rcvd: int, row: int = 0) -> None:
    off = L.row_offset(row)
    st.q[L.slot(g, c, L.C_TOTALC) + off] += totalc
    st.q[L.slot(g, c, L.C_SENT) + off] += sent
    st.q[L.slot(g, c, L.C_RCVD) + off] += rcvd


def test_digest_tells_tables_apart_but_not_other_options():
    a = config([("10.0.0.1", 80, 0), ("10.0.0.2", 80, 0)])
    assert table_digest(a.groups) == table_digest(config([("10.0.0.1", 80, 0), ("10.0.0.2", 80, 0)]).groups)
    assert table_digest(a.groups) != table_digest(config([("10.0.0.1", 80, 0), ("10.0.0.2", 81, 0)]).groups)
    assert table_digest(a.groups) != table_digest(config([("10.0.0.1", 80, 5), ("10.0.0.2", 80, 0)]).groups)
    assert table_digest(a.groups) != table_digest(
        config([("10.0.0.1", 80, 0), ("10.0.0.2", 80, 0)], kinds=(L.HASH,)).groups)
    assert table_digest([]) != 0


def test_same_table_carries_everything(tables):
    cfg = config([("10.0.0.1", 80, 0), ("10.0.0.2", 80, 0)], [("10.0.0.3", 80, 0)])
    old = tables("1", cfg)
    old.set_workers(2)
    serve(old, 0, 0, 3, 300, 3000)
    serve(old, 0, 0, 2, 200, 2000, row=1)
    old.set_status(0, 1, L.HARD_DISABLED)
    old.put(0, 0, L.C_MAXC, 9)
    old.add_channel(0, "10.0.0.9", 8080, status=L.HARD_DISABLED)      # create
    old.set_group_type(1, L.HASH)
    new = tables("2", cfg)
    lines = Carry(old, cfg).apply(new)
    got = [(ch.group, ch.index, ch.status, ch.address, ch.port, ch.maxc, ch.totalc, ch.sent, ch.rcvd)
           for ch in new.channels()]
    assert got == [(0, 0, L.ENABLED, "10.0.0.1", 80, 9, 5, 500, 5000),
                   (0, 1, L.HARD_DISABLED, "10.0.0.2", 80, 0, 0, 0, 0),
                   (0, 2, L.HARD_DISABLED, "10.0.0.9", 8080, 0, 0, 0, 0),
                   (1, 0, L.ENABLED, "10.0.0.3", 80, 0, 0, 0, 0)]
    assert new.group_type(1) == L.HASH
    assert lines == [(False, "reload: kept channel 0 0 (10.0.0.1:80): ENA, maxc 9"),
                     (False, "reload: kept channel 0 1 (10.0.0.2:80): DIS, maxc 0"),
                     (False, "reload: kept channel 0 2 (10.0.0.9:8080): DIS, maxc 0 (added at run time)"),
                     (False, "reload: group 1 keeps type Hash")]
    # The new master's own counting adds to what was carried; a reset zeroes both.
    serve(new, 0, 0, 1, 10, 100)
    assert new.counter(0, 0, L.C_TOTALC) == 6 and new.counter(0, 0, L.C_SENT) == 510


def test_changed_table_keeps_only_unchanged_channels(tables):
    old_cfg = config([("10.0.0.1", 80, 0), ("10.0.0.2", 80, 0), ("10.0.0.3", 80, 0)])
    old = tables("1", old_cfg)
    serve(old, 0, 0, 4, 40, 400)
    serve(old, 0, 2, 7, 70, 700)
    for c in (1, 2):
        old.set_status(0, c, L.HARD_DISABLED)
    new_cfg = config([("10.0.0.1", 80, 0), ("10.0.0.2", 80, 0), ("10.0.0.4", 80, 0)])
    new = tables("2", new_cfg)
    lines = Carry(old, new_cfg).apply(new)
    got = [(ch.status, ch.address, ch.totalc) for ch in new.channels()]
    assert got == [(L.ENABLED, "10.0.0.1", 4), (L.HARD_DISABLED, "10.0.0.2", 0), (L.ENABLED, "10.0.0.4", 0)]
    assert lines == [(False, "reload: kept channel 0 1 (10.0.0.2:80): DIS, maxc 0"),
                     (True, "reload: dropped channel 0 2 (10.0.0.3:80): DIS, maxc 0: the command line"
                            " no longer has it there; it starts as the command line says")]


def test_fold_adds_what_the_old_master_counted_later(tables):
    cfg = config([("10.0.0.1", 80, 0)])
    old = tables("1", cfg)
    serve(old, 0, 0, 1, 10, 100)
    new = tables("2", cfg)
    carry = Carry(old, cfg)
    carry.apply(new)
    serve(old, 0, 0, 0, 5, 50)           # a link the old master still drains
    serve(new, 0, 0, 1, 1, 1)
    carry.fold(new)
    carry.fold(new)                      # twice: nothing counted twice
    assert (new.counter(0, 0, L.C_TOTALC), new.counter(0, 0, L.C_SENT), new.counter(0, 0, L.C_RCVD)) == \
        (2, 16, 151)


def test_damaged_values_are_bounded(tables):
    cfg = config([("10.0.0.1", 80, 0)])
    old = tables("1", cfg)
    old.set_workers(2)
    base = L.slot(0, 0, 0)
    old.q[base + L.C_TOTALC] = 2**63 - 1
    old.q[base + L.C_TOTALC + L.row_offset(1)] = 2**63 - 1
    old.q[base + L.C_STATUS] = 77
    old.q[base + L.C_MAXC] = -5
    old.add_channel(0, "10.0.0.2", 80)
    old.set_address(0, 1, "1.2.3.4; reboot", 80)
    new = tables("2", cfg)
    Carry(old, cfg).apply(new)
    first, second = list(new.channels())
    assert first.status == L.HARD_DISABLED and first.maxc == 0 and first.totalc == MAX_COUNT
    assert second.status == L.HARD_DISABLED and second.address == "0.0.0.0"


def test_open_previous_wants_the_peer_pid(tmp_path):
    st = S.SharedState.create(str(tmp_path / "balance.1.any"))
    try:
        assert open_previous(st.path, os.getpid() + 1) is None
        prev = open_previous(st.path, os.getpid())
        assert prev is not None
        prev.close()
        assert open_previous(str(tmp_path / "missing"), os.getpid()) is None
    finally:
        st.close()


def test_monitoring_switched_off_stays_off(tables):
    cfg = config([("10.0.0.1", 80, 0)])
    old = tables("1", cfg)
    old.set_monitor(L.MON_DISABLED)
    new = tables("2", cfg)
    new.set_monitor(L.MON_ENABLED)           # the new command line has -m
    lines = Carry(old, cfg).apply(new)
    assert new.monitor == L.MON_DISABLED
    assert lines == [(False, "reload: monitoring stays disabled (monitor enable turns it on)")]
