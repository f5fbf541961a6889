"""What a reload (``balance -r``) keeps of the table of the master it replaces.

An admin's run-time changes (``disable``, ``maxc``, ``assign``, ``create``,
``group N rr|hash``, ``monitor disable``) and the counters live in the
running master's state file only.  The new master maps that file (same
user, the pid the control socket's peer has) before it takes the listener,
and copies from it into its own table:

* **same table on the command line** (the groups, their types and the
  channels with address, port and maxc hash to the digest the old master
  recorded in ``H_TABLE_DIGEST``): the whole table carries over - every
  group and its type, every channel with its address (also one ``assign``
  changed), state, maxc and counters, and the channels ``create`` added;
* **changed table**: each channel of the command line whose group,
  position, address and port equal those of a channel of the old table
  keeps that channel's state, maxc and counters; every other channel starts
  as the command line says, and what the old table held beyond it is
  dropped.

Counters (``totalc``, ``sent``, ``rcvd``) are carried as reset baselines
(the master's own slots, see :mod:`gbalance.table.state`): the new table's
baseline is minus the old value, so readers show old + new and no serving
process ever writes a carried number.  Bytes that the old master's draining
links move after the hand-over are added the same way once it has exited
(:meth:`Carry.fold`).  Open-connection counts never carry (those links stay
with the old master).

A full stop and start carries nothing: the state file goes with the master
that stops, and the next one starts from its command line.

Every value read from the old file is checked (it is a file of our own
user, but a damaged one must not break the new master): states outside
ENA/dis/DIS, a maxc out of range and addresses that are not numeric make
the channel hard-disabled or take the command line's value.

This module imports nothing but :mod:`gbalance.table.state` and
:mod:`gbalance.table.channels`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

from gbalance.table.channels import MAX_MAXC, valid_address, valid_port
from gbalance.table.files import StateError
from gbalance.table.layout import (C_CHANGED, C_MAXC, C_PORT, C_RCVD, C_RCVD_BASE, C_SENT, C_SENT_BASE,
                                   C_STATUS, C_TOTALC, C_TOTALC_BASE, ENABLED, HARD_DISABLED, HASH,
                                   H_TABLE_DIGEST, MAXCHANNELS, MAXGROUPS, MON_DISABLED, MON_ENABLED, RR,
                                   SOFT_DISABLED, STATUS_NAMES, TYPE_NAMES, slot)
from gbalance.table.state import SharedState

#: Largest counter value carried (a damaged file must not overflow a slot).
MAX_COUNT = 2**62

#: Counters that carry over, with the baseline slot that carries them.
CARRIED = ((C_TOTALC, C_TOTALC_BASE), (C_SENT, C_SENT_BASE), (C_RCVD, C_RCVD_BASE))


def table_digest(groups) -> int:
    """A non-zero 64-bit digest of the command line's table (``cfg.groups``)."""
    h = hashlib.blake2b(digest_size=8)
    for group in groups:
        h.update(f"G{group.kind}\n".encode())
        for ch in group.channels:
            h.update(f"C{ch.address} {ch.port} {ch.maxc}\n".encode())
    return int.from_bytes(h.digest(), "little", signed=True) or 1


def open_previous(path: str, pid: int) -> SharedState | None:
    """Map the state file of the running master ``pid`` (read-only use), or None.

    Only a regular file of our own user that names ``pid`` as its master is
    used; anything else carries nothing.
    """
    try:
        st = SharedState.attach(path)
    except (StateError, OSError):
        return None
    try:
        info = os.fstat(st.fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or st.pid != pid:
            st.close()
            return None
    except OSError:
        st.close()
        return None
    return st


@dataclass
class Link:
    """One carried channel: where it was, where it is, its counters at the copy."""

    old_g: int
    old_c: int
    new_g: int
    new_c: int
    counts: tuple[int, int, int]


def _status(value: int) -> int:
    return value if value in (ENABLED, SOFT_DISABLED, HARD_DISABLED) else HARD_DISABLED


def _describe(st: SharedState, g: int, c: int) -> str:
    q = st.q
    b = slot(g, c, 0)
    return (f"channel {g} {c} ({st.address(g, c)}:{q[b + C_PORT]}): {STATUS_NAMES.get(q[b + C_STATUS], '?')},"
            f" maxc {q[b + C_MAXC]}")


class Carry:
    """Copies the old master's table into the new one; remembers what it linked."""

    def __init__(self, old: SharedState, cfg):
        self.old = old
        self.cfg = cfg
        self.links: list[Link] = []
        self.same = False

    def _counts(self, g: int, c: int) -> tuple[int, int, int]:
        a, b, d = (max(0, min(self.old.counter(g, c, field), MAX_COUNT)) for field, _ in CARRIED)
        return a, b, d

    def apply(self, new: SharedState) -> list[tuple[bool, str]]:
        """Copy into ``new`` (filled from the command line, not serving yet).

        Returns the log lines: (True for a warning, text), one per channel
        whose admin state was kept or dropped.
        """
        old, cfg = self.old, self.cfg
        digest = new.q[H_TABLE_DIGEST]
        self.same = digest != 0 and old.q[H_TABLE_DIGEST] == digest
        self.links = []
        lines: list[tuple[bool, str]] = []
        oq, nq = old.q, new.q
        ngroups = max(0, min(old.ngroups, MAXGROUPS))
        # What the command line asked per position, to tell admin changes from it.
        asked = {}
        for g, group in enumerate(cfg.groups):
            for c, ch in enumerate(group.channels):
                asked[(g, c)] = (ch.address, ch.port, ch.maxc)
        for g in range(ngroups):
            nch = max(0, min(old.nchannels(g), MAXCHANNELS))
            if self.same:
                while new.ngroups <= g:
                    new.add_group(RR)
                kind = old.group_type(g)
                if kind in (RR, HASH) and kind != new.group_type(g):
                    new.set_group_type(g, kind)
                    lines.append((False, f"reload: group {g} keeps type {TYPE_NAMES[kind]}"))
            elif g < len(cfg.groups) and old.group_type(g) != cfg.groups[g].kind \
                    and old.group_type(g) in (RR, HASH):
                lines.append((True, f"reload: group {g} type {TYPE_NAMES[old.group_type(g)]} dropped:"
                                    f" the command line makes it {TYPE_NAMES[cfg.groups[g].kind]}"))
            for c in range(nch):
                b = slot(g, c, 0)
                address, port = old.address(g, c), oq[b + C_PORT]
                status, maxc = _status(oq[b + C_STATUS]), oq[b + C_MAXC]
                want = asked.get((g, c))
                changed_by_admin = want is None or want != (address, port, maxc) or status != ENABLED
                if self.same:
                    if c >= new.nchannels(g):
                        ok = valid_address(address) and valid_port(port)
                        new.add_channel(g, address if ok else "0.0.0.0", port if ok else 0)
                    elif (address, port) != (new.address(g, c), nq[slot(g, c, C_PORT)]) and \
                            valid_address(address) and valid_port(port):
                        new.set_address(g, c, address, port)
                    self._copy(g, c, g, c, new)
                    if changed_by_admin:
                        lines.append((False, f"reload: kept {_describe(new, g, c)}"
                                             f"{'' if want is not None else ' (added at run time)'}"))
                elif want is not None and (want[0], want[1]) == (address, port):
                    self._copy(g, c, g, c, new)
                    if changed_by_admin:
                        lines.append((False, f"reload: kept {_describe(new, g, c)}"))
                elif changed_by_admin:
                    lines.append((True, f"reload: dropped {_describe(old, g, c)}: the command line"
                                        " no longer has it there; it starts as the command line says"))
        if old.monitor == MON_DISABLED and new.monitor == MON_ENABLED:
            new.set_monitor(MON_DISABLED)
            lines.append((False, "reload: monitoring stays disabled (monitor enable turns it on)"))
        new.bump_generation()
        return lines

    def _copy(self, og: int, oc: int, ng: int, nc: int, new: SharedState) -> None:
        oq, nq = self.old.q, new.q
        ob, nb = slot(og, oc, 0), slot(ng, nc, 0)
        status = _status(oq[ob + C_STATUS])
        if not (valid_address(new.address(ng, nc)) and valid_port(nq[nb + C_PORT])):
            status = HARD_DISABLED
        nq[nb + C_STATUS] = status
        maxc = oq[ob + C_MAXC]
        if 0 <= maxc <= MAX_MAXC:
            nq[nb + C_MAXC] = maxc
        nq[nb + C_CHANGED] = oq[ob + C_CHANGED]
        counts = self._counts(og, oc)
        for (_field, base), value in zip(CARRIED, counts):
            nq[nb + base] = -value
        self.links.append(Link(og, oc, ng, nc, counts))

    def fold(self, new: SharedState) -> None:
        """Add what the old master counted after the copy (call once it exited)."""
        nq = new.q
        for link in self.links:
            now = self._counts(link.old_g, link.old_c)
            nb = slot(link.new_g, link.new_c, 0)
            for (_field, base), before, after in zip(CARRIED, link.counts, now):
                if after > before:
                    nq[nb + base] = max(-MAX_COUNT, nq[nb + base] - (after - before))
            link.counts = now

    def close(self) -> None:
        self.old.close()
