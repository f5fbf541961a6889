"""Helpers for the monitoring and connect tests: read and change a master's table.

Tests look at the master's shared state file directly (the same file the
control shell maps), so they observe states and counters without going
through the proxy and without depending on the shell's output format.
Changes an admin can make go through the master's request mailbox, as the
shell's do; a soft-disable (what only ``-a`` or monitoring do) is written
straight into the table, standing in for the master.
"""

from __future__ import annotations

import socket
import time

from conftest import read_line
from collections.abc import Callable

from gbalance.table.mailbox import Op, ask
from gbalance.table.files import state_path
from gbalance.table.layout import (C_C, C_FAILS, C_PASSES, C_STATUS, C_SUSPECT, ENABLED, HARD_DISABLED,
                                   MON_DISABLED, MON_ENABLED, SOFT_DISABLED, slot)
from gbalance.table.state import SharedState

__all__ = ["Table", "wait_for", "timed_tag", "Op", "ENABLED", "SOFT_DISABLED", "HARD_DISABLED",
           "MON_ENABLED", "MON_DISABLED"]


class Table:
    """The state file of the master on ``port`` (no -b), mapped writable."""

    def __init__(self, state_dir, port: int):
        self.state = SharedState.attach(state_path(port, None, str(state_dir)))
        self.q = self.state.q

    def close(self) -> None:
        self.q = None
        self.state.close()

    def snapshot(self, g: int, c: int) -> dict[str, int]:
        """Status and monitoring counters of one channel."""
        return {name: self.q[slot(g, c, f)] for name, f in
                (("status", C_STATUS), ("fails", C_FAILS), ("passes", C_PASSES),
                 ("suspect", C_SUSPECT), ("c", C_C))}

    def status(self, g: int, c: int) -> int:
        return self.q[slot(g, c, C_STATUS)]

    def get(self, g: int, c: int, field: int) -> int:
        return self.q[slot(g, c, field)]

    def set_status(self, g: int, c: int, status: int) -> None:
        """What the shell's ``disable``/``enable`` do (a soft-disable: what ``-a`` does)."""
        if status == SOFT_DISABLED:
            self.state.set_status(g, c, status)
            return
        ask(self.state, Op.ENABLE if status == ENABLED else Op.DISABLE, g, c)

    def set_monitor(self, value: int) -> None:
        """What the shell's ``monitor enable|disable`` do."""
        ask(self.state, Op.MONITOR, a=1 if value == MON_ENABLED else 0)

    def request(self, op: Op, g: int = 0, c: int = 0, a: int = 0, address: str = "") -> int:
        """Any other shell request; the master's index value (``create``)."""
        return ask(self.state, op, g, c, a, address=address).value


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
    """Poll ``pred`` until it holds; return the seconds waited or raise AssertionError."""
    start = time.monotonic()
    while True:
        if pred():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


def timed_tag(port: int, timeout: float = 1.0) -> tuple[str | None, float]:
    """Connect through the proxy with a client timeout; (tag or None, seconds to first byte)."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(max(0.01, timeout - (time.monotonic() - start)))
            tag = read_line(s)
    except OSError:
        return None, time.monotonic() - start
    return (tag or None), time.monotonic() - start
