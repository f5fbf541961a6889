"""Talking to the master: find its state file, ask for changes, stop it.

A shell finds the master by port and bind address (its state file), checks
that the master is alive without trusting anything another user could
fake (see :meth:`gbalance.state.SharedState.master_alive`), and asks for
every change through the mailbox (:mod:`gbalance.mailbox`): the master is
the only writer of its table.  ``kill`` is a request as well, so a shell
never signals a process at all.
"""

from __future__ import annotations

import errno
import sys
import time

from gbalance.config import ShellConfig
from gbalance.errors import EX_NOPERM, EX_UNAVAILABLE, BalanceError
from gbalance.mailbox import REQUEST_TIMEOUT, NoAnswer, Op, Reply, ask
from gbalance.state import (H_START_TICKS, SharedState, StateError, UnsafeState,
                            master_process_alive, state_path)

#: How long ``kill`` waits for the master to exit.
KILL_WAIT = 10.0


class MasterGone(Exception):
    """The master stopped while the session ran."""


def where(cfg: ShellConfig) -> str:
    return f"port {cfg.port}" + (f" address {cfg.bind}" if cfg.bind else "")


def no_master(cfg: ShellConfig) -> str:
    return f"no master process on {where(cfg)}"


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
            raise BalanceError(f"{no_master(cfg)} (no state file {path})", EX_UNAVAILABLE)
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise BalanceError(f"permission denied: cannot read {path}", EX_NOPERM)
        raise BalanceError(f"{no_master(cfg)} ({exc})", EX_UNAVAILABLE)
    if not state.master_alive():
        pid = state.pid
        state.close()
        raise BalanceError(f"{no_master(cfg)} (stale state file {path}, pid {pid} is gone)",
                           EX_UNAVAILABLE)
    return state


class Control:
    """One shell's line to one master."""

    def __init__(self, state: SharedState, timeout: float = REQUEST_TIMEOUT):
        self.state = state
        self.timeout = timeout

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
        while state.master_alive() or master_process_alive(pid, ticks):
            if time.monotonic() > deadline:
                raise NoAnswer(f"master process {pid} did not shut down within {wait:g} seconds")
            time.sleep(0.01)
