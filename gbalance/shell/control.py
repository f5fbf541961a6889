"""Talking to the master: find its state file, ask for changes, stop it.

A shell finds the master by port and bind address (its state file), checks
that the master is alive without trusting anything another user could
fake (see :meth:`gbalance.table.state.SharedState.master_alive`), and asks for
every change through the mailbox (:mod:`gbalance.table.mailbox`): a shell never
writes the table, the master makes the change.  ``kill`` is a request as
well, so a shell never signals a process at all.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import time

from gbalance.config import ShellConfig
from gbalance.errors import EX_NOPERM, EX_UNAVAILABLE, BalanceError
from gbalance.table.mailbox import REQUEST_TIMEOUT, NoAnswer, Op, Reply, ask
from gbalance.table.files import StateError, UnsafeState, state_dir, state_path
from gbalance.table.layout import H_START_TICKS
from gbalance.table.liveness import master_process_alive
from gbalance.table.state import SharedState

#: How long ``kill`` waits for the master to exit.
KILL_WAIT = 10.0
#: How long ``kill`` then waits for a draining master to finish its connections.
KILL_DRAIN_WAIT = 2.0
#: At most this many state files of other addresses are opened to name them.
MAX_OTHERS = 16


class MasterGone(Exception):
    """The master stopped while the session ran."""


def where(cfg: ShellConfig) -> str:
    return f"port {cfg.port}" + (f" address {cfg.bind}" if cfg.bind else "")


def no_master(cfg: ShellConfig) -> str:
    return f"no master process on {where(cfg)}"


def other_addresses(port: int, bind: str | None, directory: str | None = None) -> list[str]:
    """The -b keys (``any`` = without -b) of live masters on ``port`` other than ``bind``.

    Read from the names of the state files in the state directory, each
    confirmed by mapping the file and asking whether its master runs; only
    names a master could have written (state_path's characters) and regular
    files are looked at, at most :data:`MAX_OTHERS` of them.  Only a hint
    for a message: nothing is done with what it finds.
    """
    directory = directory or state_dir()
    mine = os.path.basename(state_path(port, bind, directory))
    name_re = re.compile(rf"balance\.{port}\.([A-Za-z0-9.:_-]{{1,255}})")
    found: list[str] = []
    try:
        entries = sorted(e.name for e in os.scandir(directory)
                         if name_re.fullmatch(e.name) and e.name != mine
                         and not e.name.endswith((".ctl", ".tmp"))
                         and e.is_file(follow_symlinks=False))
    except OSError:
        return found
    for name in entries[:MAX_OTHERS]:
        path = os.path.join(directory, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            state = SharedState.attach(path)
        except (OSError, StateError):
            continue
        try:
            matched = name_re.fullmatch(name)
            if matched is not None and state.master_alive():
                found.append(matched.group(1))
        finally:
            state.close()
    return found


def elsewhere(cfg: ShellConfig) -> str:
    """``; port P has a master with -b ADDR`` when masters run on other addresses, else ``""``."""
    keys = other_addresses(cfg.port, cfg.bind)
    if not keys:
        return ""
    words = ["without -b" if key == "any" else f"with -b {key}" for key in keys]
    return f"; port {cfg.port} has {'a master' if len(words) == 1 else 'masters'} {', '.join(words)}"


def open_master(cfg: ShellConfig) -> SharedState:
    """Map the state file of the live master for ``cfg``, or raise BalanceError."""
    path = state_path(cfg.port, cfg.bind)
    if cfg.debug:
        sys.stderr.write(f"state file {path}\n")
    try:
        state = SharedState.attach(path)
    except UnsafeState as exc:
        raise BalanceError(str(exc), EX_NOPERM)
    except StateError as exc:
        if exc.errno == errno.ENOENT:
            raise BalanceError(f"{no_master(cfg)} (no state file {path}){elsewhere(cfg)}",
                               EX_UNAVAILABLE)
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise BalanceError(f"permission denied: cannot read {path}", EX_NOPERM)
        raise BalanceError(f"{no_master(cfg)} ({exc})", EX_UNAVAILABLE)
    if not state.master_alive():
        pid = state.pid
        state.close()
        raise BalanceError(f"{no_master(cfg)} (stale state file {path}, pid {pid} is gone)"
                           f"{elsewhere(cfg)}", EX_UNAVAILABLE)
    return state


class Control:
    """One shell's line to one master."""

    def __init__(self, state: SharedState, timeout: float = REQUEST_TIMEOUT):
        self.state = state
        self.timeout = timeout
        self.draining = 0     # pid of a master that was killed and still drains

    def alive(self) -> bool:
        return self.state.master_alive()

    def request(self, op: Op, g: int = 0, c: int = 0, a: int = 0, address: str = "") -> Reply:
        """Ask the master for one change and return its answer.

        Raises ``PermissionError`` for a user who may only read,
        :class:`MasterGone` if the master exits meanwhile and
        :class:`NoAnswer` if it does not answer in time.
        """
        try:
            return ask(self.state, op, g, c, a, address=address, timeout=self.timeout,
                       alive=self.alive)
        except NoAnswer:
            if not self.alive():
                raise MasterGone()
            raise

    def kill(self, wait: float = KILL_WAIT) -> None:
        """Ask the master to shut down and wait (bounded) until its process has exited."""
        state = self.state
        pid, ticks = state.pid, state.q[H_START_TICKS]
        self.request(Op.KILL)
        deadline = time.monotonic() + wait
        # The master stops accepting and gives up its state file at once,
        # then lets its open connections finish (up to its -g grace period).
        while state.master_alive():
            if time.monotonic() > deadline:
                raise NoAnswer(f"master process {pid} did not shut down within {wait:g} seconds")
            time.sleep(0.01)
        drained = time.monotonic() + min(wait, KILL_DRAIN_WAIT)
        while master_process_alive(pid, ticks):
            if time.monotonic() > drained:
                self.draining = pid
                return
            time.sleep(0.01)
