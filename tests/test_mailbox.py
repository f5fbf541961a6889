"""gbalance.table.mailbox: a shell's request, the master's answer, over a real state file.

The master's side runs in a thread of the test process here (the protocol
only needs the shared mapping); ``test_control.py`` runs it against real
master processes.
"""

from __future__ import annotations

import threading
import time

import pytest

from gbalance.table import layout as L
from gbalance.table import state as S
from gbalance.table.channels import Channels, Result
from gbalance.table.mailbox import Mailbox, NoAnswer, Op, ask


def new_table(tmp_path, *ports: int) -> S.SharedState:
    """A new state file whose group 0 has a channel to 127.0.0.1 for each of ``ports``."""
    state = S.SharedState.create(str(tmp_path / "balance.8080.any"))
    ch = Channels(state)
    ch.add_group()
    for port in ports:
        ch.add_channel(0, "127.0.0.1", port)
    return state


@pytest.fixture
def st(tmp_path):
    state = new_table(tmp_path, 8001)
    yield state
    state.close()


class Poller:
    """The master's polling, in a thread."""

    def __init__(self, state: S.SharedState, **kw):
        self.box = Mailbox(state, Channels(state), **kw)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.box.poll()
            time.sleep(0.001)

    def close(self) -> None:
        self.stop.set()
        self.t.join(5)


@pytest.fixture
def master(st):
    p = Poller(st)
    yield p
    p.close()


def test_request_is_applied_and_acknowledged(st, master):
    other = S.SharedState.attach(st.path)
    try:
        assert ask(other, Op.DISABLE, 0, 0).result == Result.OK
        assert st.channel(0, 0).status == L.HARD_DISABLED
        assert ask(other, Op.DISABLE, 0, 0).result == Result.ALREADY
        reply = ask(other, Op.CREATE, 0, 0, 9000, address="::1")
        assert (reply.result, reply.value) == (Result.OK, 1)
        assert (st.address(0, 1), st.get(0, 1, L.C_PORT)) == ("::1", 9000)
        assert other.q[L.H_REQ_SEQ] == other.q[L.H_ACK_SEQ] == master.box.applied == 3
    finally:
        other.close()


def test_master_checks_every_argument(st, master):
    assert ask(st, Op.ENABLE, 5, 0).result == Result.NO_CHANNEL
    assert ask(st, Op.ENABLE, -3, 2**40).result == Result.NO_CHANNEL
    assert ask(st, Op.CREATE, 0, 0, 80, address="1.2.3.4; touch x").result == Result.INVALID_ADDRESS
    assert ask(st, Op.CREATE, 0, 0, 99999, address="1.2.3.4").result == Result.OUT_OF_RANGE
    assert ask(st, Op.MAXC, 0, 0, -5).result == Result.OUT_OF_RANGE
    assert ask(st, Op.GROUP_TYPE, 40, 0, 1).result == Result.OUT_OF_RANGE
    assert ask(st, 77, 0, 0).result == Result.BAD_REQUEST
    assert ask(st, Op.KILL).result == Result.BAD_REQUEST          # no kill handler here
    assert st.nchannels(0) == 1 and st.ngroups == 1


def test_no_master_means_no_answer_in_bounded_time(st):
    start = time.monotonic()
    with pytest.raises(NoAnswer, match="did not answer within 0.2 seconds"):
        ask(st, Op.RESET, 0, 0, timeout=0.2)
    assert time.monotonic() - start < 1
    with pytest.raises(NoAnswer, match="exited"):
        ask(st, Op.RESET, 0, 0, alive=lambda: False)
    # The unanswered requests are superseded, never applied late.
    p = Poller(st)
    try:
        st.put(0, 0, L.C_TOTALC, 5)
        assert ask(st, Op.DISABLE, 0, 0).result == Result.OK
        assert st.get(0, 0, L.C_TOTALC) == 5
    finally:
        p.close()


def test_half_written_request_waits_for_the_next_tick(st):
    box = Mailbox(st, Channels(st))
    q = st.q
    q[L.H_REQ_SEQ] = -1                      # a shell is writing the arguments
    q[L.H_REQ_OP] = Op.DISABLE
    assert not box.poll()
    q[L.H_REQ_SEQ] = 1
    assert box.poll() and q[L.H_ACK_SEQ] == 1 and st.channel(0, 0).status == L.HARD_DISABLED
    assert not box.poll()                    # answered once


def test_kill_is_acknowledged_before_the_master_stops(st):
    calls = []
    p = Poller(st, on_kill=lambda: calls.append(st.q[L.H_ACK_SEQ]))
    try:
        assert ask(st, Op.KILL).result == Result.OK
        assert calls == [st.q[L.H_REQ_SEQ]]
    finally:
        p.close()


def test_read_only_session_may_not_ask(st, master):
    import os
    fd = os.open(st.path, os.O_RDONLY)
    ro = S.SharedState(st.path, fd, False)
    try:
        with pytest.raises(PermissionError):
            ask(ro, Op.DISABLE, 0, 0)
    finally:
        ro.close()


def test_sessions_take_turns(st, master):
    """Many sessions at once: every request is answered with its own result."""
    results: list[Result] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        other = S.SharedState.attach(st.path)
        try:
            for _ in range(20):
                r = ask(other, Op.MAXC, 0, 0, i)
                with lock:
                    results.append(r.result)
        finally:
            other.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [Result.OK] * 80 and master.box.applied == 80
