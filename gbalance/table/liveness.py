"""Is the master that wrote a state file still running?  Decided from /proc.

Liveness is decided by the lock file for the owner (:meth:`SharedState.master_alive
<gbalance.table.state.SharedState.master_alive>`), and by pid plus process
start time plus command line for everybody else (here), so no other user
can make a dead master look alive.
"""

from __future__ import annotations

import os


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time after boot, clock ticks); None if gone.

    A zombie counts as gone: it has exited.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_balance_process(pid: int) -> bool:
    """True if ``pid``'s command line names a balance program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(b"balance" in os.path.basename(arg) for arg in argv[:3])


def master_process_alive(pid: int, start_ticks: int) -> bool:
    """True if ``pid`` is the very balance master that recorded ``start_ticks``.

    Decided from /proc alone, so no other process can fake it; never true
    for pid 0 or 1 (never a master we may signal or trust).
    """
    if pid <= 1:
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and ticks == start_ticks and is_balance_process(pid)
