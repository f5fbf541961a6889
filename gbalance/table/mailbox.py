"""Requests from a control shell to its master, through the state file.

A shell never writes the table: the master makes every change it asks for
(the writers table in :mod:`gbalance.table.state` lists the few slots serving
workers write on connect results).  A shell (``-i``/``-c``) of the
master's own user asks for a change by writing one request into the header
of the state file and waiting for the master's answer:

1. take the change lock (byte 1 of the owner-only lock file), so requests
   of several shells never mix;
2. set ``H_REQ_SEQ`` to -1, write the operation and its arguments
   (``H_REQ_OP``, ``H_REQ_G``, ``H_REQ_C``, ``H_REQ_A``, ``H_REQ_B`` and the
   request address field), then write the new sequence number to
   ``H_REQ_SEQ`` last;
3. wait (bounded) until the master has copied that number to ``H_ACK_SEQ``;
   ``H_ACK_RESULT`` (a :class:`~gbalance.table.channels.Result`) and
   ``H_ACK_VALUE`` are the answer.

The master polls the mailbox on a cheap loop timer (every
:data:`POLL_INTERVAL` seconds), re-reads the sequence number after the
arguments (a request being rewritten is left for the next tick), checks every
argument, applies the change through :class:`~gbalance.table.channels.Channels`
and acknowledges.  A request is applied at most once.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from gbalance.table.channels import Channels, Result
from gbalance.table.files import StateError
from gbalance.table.layout import (H_ACK_RESULT, H_ACK_SEQ, H_ACK_VALUE, H_REQ_A, H_REQ_B, H_REQ_C, H_REQ_G,
                                   H_REQ_OP, H_REQ_SEQ)
from gbalance.table.state import SharedState

#: How often the master looks for a request.
POLL_INTERVAL = 0.05
#: How long a shell waits for the master's answer.
REQUEST_TIMEOUT = 5.0


class Op(enum.IntEnum):
    """What a shell may ask the master to do."""

    ENABLE = 1      # g, c
    DISABLE = 2     # g, c
    CREATE = 3      # g, address, a=port
    ASSIGN = 4      # g, c, address, a=port
    MAXC = 5        # g, c, a=maxc
    RESET = 6       # g, c
    GROUP_TYPE = 7  # g, a=RR|HASH
    MONITOR = 8     # a=1 enable, 0 disable
    KILL = 9        # stop the master


@dataclass(frozen=True)
class Reply:
    """The master's answer: a result code and, for ``create``, the new channel's index."""

    result: Result
    value: int = 0


class NoAnswer(StateError):
    """The master did not answer a request in time (it hangs or just exited)."""


def ask(state: SharedState, op: Op, g: int = 0, c: int = 0, a: int = 0, b: int = 0,
        address: str = "", timeout: float = REQUEST_TIMEOUT,
        alive: Callable[[], bool] | None = None) -> Reply:
    """Post one request and wait for its answer.

    Raises ``PermissionError`` when this process may only read the table,
    :class:`NoAnswer` when the master does not answer within ``timeout``
    seconds (or stops running: ``alive`` is asked while waiting).
    """
    q = state.q
    with state.change():
        seq = max(q[H_REQ_SEQ], q[H_ACK_SEQ], 0) + 1
        q[H_REQ_SEQ] = -1
        q[H_REQ_OP] = int(op)
        q[H_REQ_G] = g
        q[H_REQ_C] = c
        q[H_REQ_A] = a
        q[H_REQ_B] = b
        state.set_request_address(address)
        q[H_REQ_SEQ] = seq
        deadline = time.monotonic() + timeout
        delay = 0.001
        while q[H_ACK_SEQ] != seq:
            if time.monotonic() >= deadline:
                raise NoAnswer(f"the master did not answer within {timeout:g} seconds")
            if alive is not None and not alive():
                raise NoAnswer("the master exited before it answered")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        try:
            result = Result(q[H_ACK_RESULT])
        except ValueError:
            result = Result.BAD_REQUEST
        return Reply(result, q[H_ACK_VALUE])


class Mailbox:
    """The master's side: apply pending requests from its loop."""

    def __init__(self, state: SharedState, channels: Channels,
                 on_kill: Callable[[], None] | None = None):
        self.state = state
        self.q = state.q
        self.channels = channels
        self.on_kill = on_kill
        self.applied = 0
        self._timer: Any = None     # a gevent loop timer (gevent has no stubs)

    def start(self, loop: Any, interval: float = POLL_INTERVAL) -> None:
        """Poll every ``interval`` seconds on ``loop`` (a gevent loop timer, no greenlet)."""
        if self._timer is None:
            self._timer = loop.timer(interval, interval)
            self._timer.start(self.poll)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def poll(self) -> bool:
        """Apply the pending request, if any; True if one was answered."""
        q = self.q
        seq = q[H_REQ_SEQ]
        if seq <= 0 or seq == q[H_ACK_SEQ]:
            return False
        op, g, c, a, b = q[H_REQ_OP], q[H_REQ_G], q[H_REQ_C], q[H_REQ_A], q[H_REQ_B]
        address = self.state.request_address()
        if q[H_REQ_SEQ] != seq:       # being rewritten: next tick
            return False
        kill = False
        try:
            reply = self.apply(op, g, c, a, b, address)
        except Exception:             # a bug must not stop the master; answer anyway
            reply = Reply(Result.BAD_REQUEST)
        else:
            kill = op == Op.KILL and self.on_kill is not None
        q[H_ACK_RESULT] = int(reply.result)
        q[H_ACK_VALUE] = reply.value
        q[H_ACK_SEQ] = seq
        self.applied += 1
        if kill and self.on_kill is not None:
            self.on_kill()
        return True

    def apply(self, op: int, g: int, c: int, a: int, b: int, address: str) -> Reply:
        """Check and apply one request (numbers as read from the file: anything)."""
        ch = self.channels
        if op == Op.ENABLE:
            return Reply(ch.enable(g, c))
        if op == Op.DISABLE:
            return Reply(ch.disable(g, c))
        if op == Op.CREATE:
            result, index = ch.create(g, address, a)
            return Reply(result, index)
        if op == Op.ASSIGN:
            return Reply(ch.assign(g, c, address, a))
        if op == Op.MAXC:
            return Reply(ch.set_maxc(g, c, a))
        if op == Op.RESET:
            return Reply(ch.reset(g, c))
        if op == Op.GROUP_TYPE:
            return Reply(ch.set_group_type(g, a))
        if op == Op.MONITOR:
            return Reply(ch.set_monitor(bool(a)))
        if op == Op.KILL:
            return Reply(Result.OK if self.on_kill is not None else Result.BAD_REQUEST)
        return Reply(Result.BAD_REQUEST)
