"""Backend connects: staggered failover with -m, plain -t timing without, client hang-up."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from conftest import free_port, tcp_pair
from monhelp import HARD_DISABLED, SOFT_DISABLED, Table, timed_tag, wait_for

from gbalance.table.layout import C_C, C_SUSPECT


def start_table(balance, port: int, *args: str) -> tuple:
    proc = balance.start(*args, port=port)
    return proc, Table(balance.state_dir, port)


def test_stagger_serves_first_client_quickly_and_marks_primary_suspect(balance, backends, hanging):
    primary, backup = hanging(), backends("BACKUP")
    port = free_port()
    # No connect check: only the race itself can notice the hanging primary.
    proc, t = start_table(balance, port, "-t", "5", "-m", "command=true:interval=60",
                          str(port), primary.spec, "!", backup.spec)
    try:
        tag, first = timed_tag(port)
        assert tag == "BACKUP"
        assert first < 2.5     # the stagger delay, not -t 5 (exact timing: test_race_stagger_*)
        assert t.get(0, 0, C_SUSPECT) == 1
        rest = [timed_tag(port) for _ in range(5)]
        assert [r[0] for r in rest] == ["BACKUP"] * 5
        assert max(r[1] for r in rest) < 2.5   # the suspect primary is skipped, no -t wait
        wait_for(lambda: t.get(0, 0, C_C) == 0, 1.0)   # the losing connect was closed
    finally:
        t.close()
    _, err = proc.stop()
    assert f"group 0 channel 0 127.0.0.1:{primary.port} suspect: connect still pending" in err


def stagger_column(balance, port: int) -> list[str]:
    """The stagger delay of each channel as ``health`` prints it."""
    import subprocess

    from conftest import BALANCE

    env = dict(os.environ, BALANCE_STATE_DIR=str(balance.state_dir))
    out = subprocess.run(BALANCE + ["-c", "health", str(port)], env=env,
                         capture_output=True, text=True, timeout=10).stdout
    rows = [line.split() for line in out.splitlines()]
    return [r[8] for r in rows if len(r) > 8 and r[0].isdigit()]


def test_stagger_setting_is_the_ceiling_and_backoff_climbs_to_it(balance, backends, hanging):
    """``stagger=`` bounds the delay: an unmeasured channel starts at 20 ms (or
    the ceiling when lower), and each staggered connect doubles the hung
    channel's delay up to the ceiling."""
    primary, backup = hanging(), backends("BACKUP")
    port = free_port()
    balance.start("-t", "5", "-m", "command=true:interval=60:stagger=0.01",
                  str(port), primary.spec, "!", backup.spec, port=port)
    assert stagger_column(balance, port) == ["10.0ms", "10.0ms"]
    port2 = free_port()
    balance.start("-t", "5", "-m", "command=true:interval=60:stagger=0.05:nodisable",
                  str(port2), primary.spec, "!", backup.spec, port=port2)
    assert stagger_column(balance, port2) == ["20.0ms", "20.0ms"]
    tag, first = timed_tag(port2, timeout=2)
    assert tag == "BACKUP" and first < 2.5
    assert stagger_column(balance, port2)[0] == "40.0ms"     # backed off once


def test_stagger_zero_keeps_connects_sequential(balance, backends, hanging):
    primary, backup = hanging(), backends("BACKUP")
    port = free_port()
    proc, t = start_table(balance, port, "-t", "1", "-m", "command=true:interval=60:stagger=0",
                          str(port), primary.spec, "!", backup.spec)
    try:
        tag, took = timed_tag(port, timeout=5)
        assert tag == "BACKUP" and took >= 0.9     # waited out -t 1 (exact: test_race_timeout_*)
        assert t.status(0, 0) == SOFT_DISABLED   # passive detection of the timeout
    finally:
        t.close()
    _, err = proc.stop()
    assert "soft-disabled: connect timeout" in err


def test_without_monitoring_timing_is_exactly_t(balance, backends, hanging):
    primary, backup = hanging(), backends("BACKUP")
    port = free_port()
    proc = balance.start("-d", "-t", "1", str(port), primary.spec, "!", backup.spec, port=port)
    time.sleep(0.1)
    for _ in range(2):                          # every connection waits, as balance does
        tag, took = timed_tag(port, timeout=5)
        assert tag == "BACKUP" and took >= 0.9
    _, err = proc.stop()
    assert "timeout group 0 channel 0" in err
    assert "suspect" not in err


def test_failover_benchmark_shape_no_client_waits(balance, backends, hanging):
    """The issue's scenario, shortened: -t 5 -m connect:interval=1, a client every 100 ms."""
    primary, backup = hanging(), backends("BACKUP")
    port = free_port()
    balance.start("-t", "5", "-m", "connect:interval=1", str(port), primary.spec, "!", backup.spec,
                  port=port)
    results = []
    for _ in range(30):
        results.append(timed_tag(port, timeout=1.0))
        time.sleep(0.1)
    # Each client got BACKUP within timed_tag's 1 s, far under -t 5: no
    # client waited for the hanging primary (exact timing: test_race_*).
    failed = [r for r in results if r[0] != "BACKUP"]
    assert failed == []


def test_all_soft_disabled_are_still_tried_in_order(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    proc, t = start_table(balance, port, "-m", "connect:interval=60:noenable", str(port), a.spec, "!", b.spec)
    try:
        t.set_status(0, 0, SOFT_DISABLED)
        t.set_status(1, 0, SOFT_DISABLED)
        assert [timed_tag(port)[0] for _ in range(3)] == ["A"] * 3
        a.close()
        assert timed_tag(port)[0] == "B"
        t.set_status(0, 0, HARD_DISABLED)
        t.set_status(1, 0, HARD_DISABLED)
        assert timed_tag(port)[0] is None       # hard-disabled: never a last resort
    finally:
        t.close()
    proc.stop()


def test_client_hangup_cancels_pending_connect(balance, hanging):
    primary = hanging()
    port = free_port()
    proc, t = start_table(balance, port, "-t", "5", str(port), primary.spec)
    try:
        wait_for(lambda: t.get(0, 0, C_C) == 0, 1.0)   # wait_port's probe was cancelled too
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        wait_for(lambda: t.get(0, 0, C_C) == 1, 1.0)   # its connect is pending
        s.close()
        took = wait_for(lambda: t.get(0, 0, C_C) == 0, 1.0)
        assert took < 0.5                               # not the 5 s of -t
    finally:
        t.close()
    proc.stop()


def test_client_hangup_cancels_pending_connects_with_stagger(balance, hanging):
    one, two = hanging(), hanging()
    port = free_port()
    proc, t = start_table(balance, port, "-t", "5", "-m", "command=true:interval=60",
                          str(port), one.spec, "!", two.spec)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        wait_for(lambda: t.get(0, 0, C_C) == 1 and t.get(1, 0, C_C) == 1, 1.5)   # both racing
        s.close()
        wait_for(lambda: t.get(0, 0, C_C) == 0 and t.get(1, 0, C_C) == 0, 0.5)
    finally:
        t.close()
    proc.stop()


def test_client_that_sent_data_still_gets_its_answer(balance, backends):
    b = backends("B", mode="echo")
    port = free_port()
    balance.start("-m", "connect:interval=60", str(port), b.spec, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"ping\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
    assert data == b"ping\n"


class RecordingHooks:
    """Hooks that remember what the race reported."""

    def __init__(self):
        self.events: list[tuple] = []

    def attempt(self, g, c): self.events.append(("attempt", g, c))
    def success(self, g, c): self.events.append(("success", g, c))
    def failure(self, g, c, reason): self.events.append(("failure", g, c, reason))
    def cancel(self, g, c): self.events.append(("cancel", g, c))
    def suspect(self, g, c): self.events.append(("suspect", g, c))
    def staggered(self, g, c): self.events.append(("staggered", g, c))
    def measured(self, g, c, delay): self.events.append(("measured", g, c))


def test_race_gives_back_attempts_when_routing_raises(hanging):
    """In-process: an error mid-race (here from the candidate list) leaks no attempt."""
    import gevent
    import pytest

    from gbalance.proxy.connect import Connector

    primary = hanging()
    hooks = RecordingHooks()
    conn = Connector(gevent.get_hub().loop, lambda g, c: (socket.AF_INET, (primary.host, primary.port)),
                     hooks, timeout=5, stagger=0.05)

    def candidates():
        yield 0, 0
        raise RuntimeError("table changed under us")

    client, peer = socket.socketpair()
    client.setblocking(False)
    try:
        with pytest.raises(RuntimeError):
            gevent.spawn(conn.race, client, candidates()).get(timeout=2)
    finally:
        client.close()
        peer.close()
    assert hooks.events == [("attempt", 0, 0), ("suspect", 0, 0), ("staggered", 0, 0), ("cancel", 0, 0)]


class DyingListener:
    """A backend that greets (``PRIMARY``) until :meth:`die`, then hangs every connect.

    Dying stops accepting, shrinks the backlog to 0 and fills the accept
    queue, so further SYNs are dropped: a machine that just went down.
    """

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.02)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        self.down = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.down.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"PRIMARY\n")

    def die(self) -> None:
        self.down.set()
        self.thread.join(2)
        self.sock.listen(0)
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(f)
        time.sleep(0.05)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", self.port))
            raise AssertionError("the dying listener still accepts connects")
        except (socket.timeout, OSError):
            pass
        finally:
            probe.close()

    def close(self) -> None:
        self.down.set()
        for f in self.fillers:
            f.close()
        self.sock.close()


def test_adaptive_stagger_fails_over_fast_when_a_measured_channel_dies(balance, backends):
    """A primary measured fast on loopback hangs suddenly: the first client waits
    milliseconds (the adapted delay), not the configured 0.25 s ceiling, and the
    delay and the staggered connect show in ``health`` and ``metrics``."""
    import subprocess

    from conftest import BALANCE

    primary, backup = DyingListener(), backends("BACKUP")
    port = free_port()
    try:
        proc, t = start_table(balance, port, "-t", "5", "-m", "command=true:interval=60",
                              str(port), primary.spec, "!", backup.spec)
        try:
            for _ in range(30):
                tag, _took = timed_tag(port)
                assert tag == "PRIMARY"
            env = dict(os.environ, BALANCE_STATE_DIR=str(balance.state_dir))
            show = subprocess.run(BALANCE + ["-c", "health", str(port)], env=env,
                                  capture_output=True, text=True, timeout=10).stdout
            row = next(line.split() for line in show.splitlines() if line.split()[:2] == ["0", "0"])
            learned_ms = float(row[8].rstrip("ms"))
            assert learned_ms < 100, show            # adapted below the 250 ms ceiling
            primary.die()
            tag, first = timed_tag(port)
            assert tag == "BACKUP"
            assert first < 0.15, first               # ~ the learned delay, not 0.25 s
            assert t.get(0, 0, C_SUSPECT) == 1
            metrics = subprocess.run(BALANCE + ["-c", "metrics", str(port)], env=env,
                                     capture_output=True, text=True, timeout=10).stdout
            staggered = [line for line in metrics.splitlines()
                         if line.startswith("balance_channel_staggered_total{") and 'channel="0"' in line
                         and 'group="0"' in line]
            assert staggered and staggered[0].endswith(" 1"), metrics
            delay = [line for line in metrics.splitlines()
                     if line.startswith("balance_channel_stagger_seconds{") and 'group="1"' in line]
            assert delay and 0 < float(delay[0].split()[-1]) <= 0.25
        finally:
            t.close()
        _, err = proc.stop()
        assert "Traceback" not in err
    finally:
        primary.close()


def test_settled_sees_a_finished_connect_the_loop_has_not_reported(hanging):
    """The check made before a staggered connect: a connected socket is settled,
    a hanging one is not."""
    from gbalance.proxy.connect import Attempt, _settled

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    hung = hanging()
    a = socket.socket()
    b = socket.socket()
    try:
        for s in (a, b):
            s.setblocking(False)
        b.connect_ex((hung.host, hung.port))
        a.connect_ex(srv.getsockname())
        pending = [Attempt(0, 0, b), Attempt(1, 0, a)]
        deadline = time.monotonic() + 2
        while _settled(pending) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _settled(pending) is pending[1]
        assert _settled(pending[:1]) is None
    finally:
        a.close()
        b.close()
        srv.close()


# -- races as callback state machines (in-process) ----------------------------------------

def _hanging_connector(listeners, timeout: float, stagger: float = 0.0):
    """A Connector whose channel ``(0, c)`` is ``listeners[c]``, with recording hooks."""
    import gevent

    from gbalance.proxy.connect import Connector

    hooks = RecordingHooks()
    conn = Connector(gevent.get_hub().loop,
                     lambda g, c: (socket.AF_INET, (listeners[c].host, listeners[c].port)),
                     hooks, timeout=timeout, stagger=stagger)
    return conn, hooks


def _timed_race(conn, candidates) -> tuple:
    """Run one blocking race for a fresh client; (result, seconds)."""
    import gevent

    client, peer = socket.socketpair()
    client.setblocking(False)
    try:
        t0 = time.monotonic()
        result = gevent.spawn(conn.race, client, iter(candidates)).get(timeout=10)
        return result, time.monotonic() - t0
    finally:
        client.close()
        peer.close()


def test_two_hanging_candidates_each_wait_the_full_timeout(hanging):
    """Two hanging channels, -t 0.3, no stagger: each connect waits its full
    0.3 s (>= 0.55 s in all) and each is reported as a timeout.

    Guards against a fired timeout timer going back to the pool: libev fires
    such a timer at once when it is started again, so the second connect
    would "time out" immediately (this happened).  A second race on the same
    connector checks the pool carries nothing bad over."""
    a, b = hanging(), hanging()
    conn, hooks = _hanging_connector([a, b], timeout=0.3)
    for _ in range(2):
        hooks.events.clear()
        result, took = _timed_race(conn, [(0, 0), (0, 1)])
        assert result is None
        assert took >= 0.55, f"two 0.3 s timeouts took {took:.3f} s"
        assert took < 3, took
        assert hooks.events == [("attempt", 0, 0), ("failure", 0, 0, "timeout"),
                                ("attempt", 0, 1), ("failure", 0, 1, "timeout")]


def test_a_cancelled_connect_does_not_shorten_the_next_connects_timeout(hanging):
    """A client that hangs up 0.2 s into a 0.3 s connect cancels it; the next
    client's connect to a hanging channel must still get the full 0.3 s -t
    timeout, not the 0.1 s the cancelled one had left."""
    import gevent

    from gbalance.proxy.connect import Race

    h = hanging()
    conn, hooks = _hanging_connector([h], timeout=0.3)
    client, peer = socket.socketpair()
    client.setblocking(False)
    ended = []
    conn.loop.update_now()         # HangingListener blocked the loop: its time is stale
    try:
        Race(conn, client, iter([(0, 0)]), lambda race, result, error: ended.append(result)).start()
        gevent.sleep(0.2)
        assert ended == []
        peer.close()                               # the client leaves: the connect is cancelled
        with gevent.Timeout(5):
            while not ended:
                gevent.sleep(0.005)
    finally:
        client.close()
        peer.close()
    assert ended == [None] and hooks.events[-1] == ("cancel", 0, 0)
    hooks.events.clear()
    result, took = _timed_race(conn, [(0, 0)])
    assert result is None and hooks.events == [("attempt", 0, 0), ("failure", 0, 0, "timeout")]
    assert took >= 0.28, f"the next 0.3 s connect timed out after {took:.3f} s"


@pytest.mark.parametrize("outcome", ["connected", "refused", "timeout", "client-gone", "routing-error"])
def test_race_calls_done_exactly_once(hanging, outcome):
    """Whatever ends a race, ``done(race, result, error)`` is called once, with
    that race, and never again afterwards (not by a late timer or client event)."""
    import gevent

    from gbalance.proxy.connect import Connected, Connector, Race

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    if outcome == "connected":
        listener.listen(4)
        target = listener.getsockname()
    elif outcome == "refused":
        target = listener.getsockname()            # bound, not listening: refused
    else:
        h = hanging()
        target = (h.host, h.port)
    hooks = RecordingHooks()
    conn = Connector(gevent.get_hub().loop, lambda g, c: (socket.AF_INET, target), hooks, timeout=0.2)

    def candidates():
        yield 0, 0
        if outcome == "routing-error":
            raise RuntimeError("table changed under us")

    calls = []
    client, peer = socket.socketpair()
    client.setblocking(False)
    try:
        race = Race(conn, client, candidates() if outcome == "routing-error" else iter([(0, 0)]),
                    lambda *args: calls.append(args))
        conn.loop.update_now()     # HangingListener blocked the loop: its time is stale
        race.start()
        if outcome == "client-gone":
            gevent.sleep(0.05)
            peer.close()
        with gevent.Timeout(5):
            while not calls:
                gevent.sleep(0.005)
        gevent.sleep(0.35)                         # past the timeout: nothing more comes
        peer.close()
        gevent.sleep(0.02)
        assert len(calls) == 1, calls
        got_race, result, error = calls[0]
        assert got_race is race and race.over and race.pending == []
        if outcome == "connected":
            assert isinstance(result, Connected) and error is None
            result.sock.close()
        elif outcome == "routing-error":
            assert result is None and isinstance(error, RuntimeError)
        else:
            assert result is None and error is None
        expected = {"connected": ("success", 0, 0), "refused": ("failure", 0, 0, "refused"),
                    "timeout": ("failure", 0, 0, "timeout"), "client-gone": ("cancel", 0, 0),
                    "routing-error": ("failure", 0, 0, "timeout")}[outcome]
        assert expected in hooks.events, hooks.events
    finally:
        client.close()
        peer.close()
        listener.close()


def test_abandon_closes_pending_attempts_reports_cancel_and_never_calls_done(hanging):
    """``Race.abandon()`` (a stop at once): every pending attempt's socket is
    closed and reported as cancelled, and ``done`` is never called, not even
    when the timeouts would have run out or the client then leaves."""
    import gevent

    from gbalance.proxy.connect import Race

    a, b = hanging(), hanging()
    conn, hooks = _hanging_connector([a, b], timeout=0.3, stagger=0.05)
    calls = []
    client, peer = socket.socketpair()
    client.setblocking(False)
    try:
        race = Race(conn, client, iter([(0, 0), (0, 1)]), lambda *args: calls.append(args))
        conn.loop.update_now()     # HangingListener blocked the loop: its time is stale
        race.start()
        with gevent.Timeout(5):
            while len(race.pending) < 2:               # the stagger started the second
                gevent.sleep(0.005)
        socks = [att.sock for att in race.pending]
        hooks.events.clear()
        race.abandon()
        assert race.pending == [] and race.over
        assert all(s.fileno() == -1 for s in socks)
        assert sorted(hooks.events) == [("cancel", 0, 0), ("cancel", 0, 1)]
        race.abandon()                                 # a second time: nothing more
        assert len(hooks.events) == 2
        gevent.sleep(0.4)                              # past the 0.3 s timeouts
        peer.close()                                   # and the client leaves
        gevent.sleep(0.05)
        assert calls == []
        assert len(hooks.events) == 2, hooks.events
        assert client.fileno() != -1                   # the client is the caller's to close
    finally:
        client.close()
        peer.close()


# -- a client that spoke before its race began (in-process) ----------------------------------

def _spoken_client(data: bytes, close: bool = False):
    """A proxy-side client socket whose peer has already sent ``data`` (and
    closed, with ``close``), as the server finds it at accept."""
    client, peer = socket.socketpair()
    client.setblocking(False)
    if data:
        peer.sendall(data)
    if close:
        peer.close()
    return client, peer


def _live_listener() -> socket.socket:
    """A loopback backend that accepts (its connections are read by the test)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    return listener


def _accept_and_read(listener, n: int) -> bytes:
    listener.settimeout(5)
    s, _ = listener.accept()
    with s:
        s.settimeout(5)
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            assert chunk, buf
            buf += chunk
        return buf


def test_a_client_that_spoke_first_is_connected_and_sent_within_start():
    """Its bytes go with the connect: a backend on this host has completed
    the handshake inside connect(), so the race ends before ``start``
    returns, with no watcher and no loop turn, and the bytes count as sent."""
    import gevent

    from gbalance.proxy.connect import Connected, Connector, Race

    listener = _live_listener()
    hooks = RecordingHooks()
    conn = Connector(gevent.get_hub().loop, lambda g, c: (socket.AF_INET, listener.getsockname()), hooks,
                     timeout=5)
    client, peer = _spoken_client(b"GET / HTTP/1.0\r\n\r\n")
    calls = []
    try:
        Race(conn, client, iter([(0, 0)]), lambda *args: calls.append(args)).start(talking=True)
        assert len(calls) == 1, "the race waited for the loop"
        _, result, error = calls[0]
        assert error is None and isinstance(result, Connected)
        assert result.early == b"GET / HTTP/1.0\r\n\r\n" and result.sent == len(result.early)
        assert result.client_watcher is None and result.server_watcher is None
        assert hooks.events == [("attempt", 0, 0), ("success", 0, 0)]
        assert _accept_and_read(listener, 18) == b"GET / HTTP/1.0\r\n\r\n"
        result.sock.close()
    finally:
        client.close()
        peer.close()
        listener.close()


@pytest.mark.parametrize("how", ["closed", "reset"])
def test_a_client_gone_before_its_race_began_is_cancelled_as_during_it(hanging, how):
    """Closed or reset before the proxy looked: the attempt is counted and
    cancelled at once (its count given back), as when a client leaves
    during the connect."""
    import gevent

    from gbalance.proxy.connect import Race

    h = hanging()
    conn, hooks = _hanging_connector([h], timeout=5)
    client, peer = socket.socketpair()
    client.setblocking(False)
    if how == "reset":
        client.close()
        peer, client = tcp_pair()
        client.setblocking(False)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    time.sleep(0.05)
    calls = []
    conn.loop.update_now()         # HangingListener blocked the loop: its time is stale
    try:
        Race(conn, client, iter([(0, 0)]), lambda *args: calls.append(args)).start(talking=True)
        # At once: a reset is reported by one read only, so a race left to
        # the client watch could link the client and pass a clean end on.
        assert [(result, error) for _, result, error in calls] == [(None, None)]
        assert hooks.events == [("attempt", 0, 0), ("cancel", 0, 0)]
        gevent.sleep(0.05)
        assert len(calls) == 1
    finally:
        client.close()


def test_a_spoken_client_waits_for_a_backend_still_connecting_then_fails_over(hanging):
    """A backend that has not answered the SYN yet (send says EAGAIN): the
    connect is waited for with its -t as ever, and the next channel gets the
    bytes, once."""
    import gevent

    from gbalance.proxy.connect import Connected, Race

    h = hanging()
    listener = _live_listener()
    live = type("L", (), {"host": "127.0.0.1", "port": listener.getsockname()[1]})
    conn, hooks = _hanging_connector([h, live], timeout=0.2)
    client, peer = _spoken_client(b"hello")
    calls = []
    conn.loop.update_now()         # HangingListener blocked the loop: its time is stale
    try:
        Race(conn, client, iter([(0, 0), (0, 1)]), lambda *args: calls.append(args)).start(talking=True)
        assert calls == []                             # the first is still connecting
        with gevent.Timeout(5):
            while not calls:
                gevent.sleep(0.005)
        _, result, error = calls[0]
        assert error is None and isinstance(result, Connected) and result.channel == 1
        assert result.sent == 5
        assert hooks.events == [("attempt", 0, 0), ("failure", 0, 0, "timeout"),
                                ("attempt", 0, 1), ("success", 0, 1)]
        assert _accept_and_read(listener, 5) == b"hello"
        result.sock.close()
    finally:
        client.close()
        peer.close()
        listener.close()


def test_a_spoken_client_skips_a_refusing_backend_at_once():
    """Refused (the first send reports it): the next channel, in the same call."""
    import gevent

    from gbalance.proxy.connect import Connected, Connector, Race

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))                      # bound, not listening: refused
    listener = _live_listener()
    targets = [closed.getsockname(), listener.getsockname()]
    hooks = RecordingHooks()
    conn = Connector(gevent.get_hub().loop, lambda g, c: (socket.AF_INET, targets[c]), hooks, timeout=5)
    client, peer = _spoken_client(b"hi")
    calls = []
    try:
        Race(conn, client, iter([(0, 0), (0, 1)]), lambda *args: calls.append(args)).start(talking=True)
        assert len(calls) == 1
        _, result, error = calls[0]
        assert isinstance(result, Connected) and result.channel == 1 and result.sent == 2
        assert hooks.events == [("attempt", 0, 0), ("failure", 0, 0, "refused"),
                                ("attempt", 0, 1), ("success", 0, 1)]
        assert _accept_and_read(listener, 2) == b"hi"
        result.sock.close()
    finally:
        client.close()
        peer.close()
        listener.close()
        closed.close()


# -- the cap on early bytes held by all pending connects ------------------------------------

def test_early_bytes_of_all_races_stay_under_the_cap_and_none_is_dropped(hanging):
    """Four clients send 2,000 bytes each while their connects hang; the
    process may hold 3,000 early bytes in all: the first race takes 2,000,
    the second 1,000, the others none.  What is not taken stays in the
    client's socket (for the link to read), so once the backend answers each
    client's bytes are all there, in order; the count goes back to 0."""
    import gevent

    from gbalance.proxy.connect import Race

    h = hanging()
    conn, hooks = _hanging_connector([h], timeout=10)
    conn.early_cap = 3000
    conn.loop.update_now()         # HangingListener blocked the loop: its time is stale
    data = [bytes([65 + i]) * 1000 + bytes([97 + i]) * 1000 for i in range(4)]
    pairs = [_spoken_client(d) for d in data]
    calls: list = []
    races = []
    try:
        for client, _ in pairs:
            race = Race(conn, client, iter([(0, 0)]), lambda *args: calls.append(args))
            races.append(race)
            race.start(talking=True)
            gevent.sleep(0.02)
        assert calls == []
        assert [len(r.early or b"") for r in races] == [2000, 1000, 0, 0]
        assert conn.early_held == 3000
        for _, peer in pairs:               # more bytes come: none is taken now
            peer.sendall(b"!")
        gevent.sleep(0.1)
        assert conn.early_held == 3000
        h.sock.listen(64)                  # the backend answers (at the SYN's retransmission)
        with gevent.Timeout(8):
            while len(calls) < 4:
                gevent.sleep(0.01)
        assert conn.early_held == 0
        for (race, result, error), (client, _), sent in zip(sorted(calls, key=lambda c: races.index(c[0])),
                                                             pairs, data):
            assert error is None and result is not None
            rest = b""
            while len(result.early) + len(rest) < len(sent) + 1:
                rest += client.recv(4096)
            assert result.early + rest == sent + b"!"
            result.sock.close()
    finally:
        for client, peer in pairs:
            client.close()
            peer.close()

def test_with_abort_unused_a_client_gone_before_its_race_opens_no_connect(hanging):
    """-P: a client already gone when its race starts costs the backend nothing
    (no connection that would end in a reset)."""
    from gbalance.proxy.connect import Race

    h = hanging()
    conn, hooks = _hanging_connector([h], timeout=5)
    conn.abort_unused = True
    client, peer = socket.socketpair()
    client.setblocking(False)
    peer.close()
    calls = []
    try:
        Race(conn, client, iter([(0, 0)]), lambda *args: calls.append(args)).start(talking=True)
        assert [(result, error) for _, result, error in calls] == [(None, None)]
        assert hooks.events == []
    finally:
        client.close()


# -- the race's timing on a fake clock (no sleeps, no wall-clock bounds) -----


def fake_race(hanging, stagger: float, timeout: float = 1.0):
    """A race on a :class:`FakeLoop`: channel 0 hangs, channel 1 listens."""
    from fakeloop import FakeLoop

    from gbalance.proxy.connect import Connector, Race

    primary = hanging()
    backup = socket.socket()
    backup.bind(("127.0.0.1", 0))
    backup.listen(8)
    targets = [(primary.host, primary.port), backup.getsockname()]
    loop, hooks, results = FakeLoop(), RecordingHooks(), []
    conn = Connector(loop, lambda g, c: (socket.AF_INET, targets[c]), hooks,
                     timeout=timeout, stagger=stagger)
    a, b = socket.socketpair()
    race = Race(conn, a, iter([(0, 0), (0, 1)]), lambda r, res, err: results.append((res, err)))
    return loop, hooks, results, race, [backup, a, b]


def finish_on_backup(loop, race, results):
    """Channel 1's connect completes: let the loop say so if it is pending."""
    if not results:
        (att,) = [p for p in race.pending if p.c == 1]
        loop.fire_io(att.sock.fileno())
    (res, err), = results
    assert err is None and res.channel == 1
    res.sock.close()


def test_race_timeout_is_exactly_t_then_the_next_candidate(hanging):
    from gbalance.proxy.connect import FailReason

    loop, hooks, results, race, keep = fake_race(hanging, stagger=0.0, timeout=1.0)
    race.start()
    loop.advance(0.999)
    assert hooks.events == [("attempt", 0, 0)] and results == []
    loop.advance(0.001)
    assert hooks.events[:3] == [("attempt", 0, 0), ("failure", 0, 0, "timeout"), ("attempt", 0, 1)]
    assert hooks.events[1][3] is FailReason.TIMEOUT
    finish_on_backup(loop, race, results)
    assert hooks.events[3:] == [("success", 0, 1)]
    for s in keep:
        s.close()


def test_race_stagger_starts_the_next_candidate_at_the_delay(hanging):
    loop, hooks, results, race, keep = fake_race(hanging, stagger=0.05, timeout=1.0)
    race.start()
    loop.advance(0.049)
    assert hooks.events == [("attempt", 0, 0)] and results == []
    loop.advance(0.001)
    assert hooks.events[:4] == [("attempt", 0, 0), ("suspect", 0, 0), ("staggered", 0, 0),
                                ("attempt", 0, 1)]
    finish_on_backup(loop, race, results)
    # The winner is the backup; the hanging primary is closed and given back,
    # and its -t timer never fires afterwards.
    assert hooks.events[-2:] == [("cancel", 0, 0), ("success", 0, 1)]
    n = len(hooks.events)
    loop.advance(5.0)
    assert len(hooks.events) == n and not race.pending
    for s in keep:
        s.close()


def test_race_without_stagger_never_runs_two_connects(hanging):
    """Stagger 0: however long the primary hangs short of -t, nothing else starts."""
    loop, hooks, results, race, keep = fake_race(hanging, stagger=0.0, timeout=5.0)
    race.start()
    for _ in range(49):
        loop.advance(0.1)
    assert hooks.events == [("attempt", 0, 0)] and len(race.pending) == 1
    race.abandon()
    assert hooks.events == [("attempt", 0, 0), ("cancel", 0, 0)]
    for s in keep:
        s.close()
