"""BalanceServer in-process: its own accept loop (gbalance.proxy.server._do_read)."""

from __future__ import annotations

import errno
import socket

import pytest
from conftest import OneShotBackend, free_port, green_read_until, inprocess_server


class FailingOnce:
    """Wraps the listening socket: its first ``_accept`` raises ``error``, then
    every call goes to the real socket (as does everything else)."""

    def __init__(self, real, error: OSError):
        self._real = real
        self._error = error
        self.calls = 0

    def _accept(self):
        self.calls += 1
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._real._accept()

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_unexpected_accept_error_logs_one_line_and_accepting_resumes(tmp_path, monkeypatch, backends, capfd):
    """An accept error that is neither "try again", nor out of descriptors, nor
    about one client (here EBADF, once) logs exactly one line
    "accept failed (...); pausing new connections", prints no traceback, does
    not close the server, and accepting resumes: the waiting client is served."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    be = backends("OK")
    port = free_port()
    with inprocess_server(["-f", str(port), be.spec], tmp_path / "state") as (master, server):
        wrapper = FailingOnce(server.socket, OSError(errno.EBADF, "Bad file descriptor"))
        server.socket = wrapper
        capfd.readouterr()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert green_read_until(client, b"\n") == b"OK\n"
        assert wrapper.calls >= 2                   # the failed accept, then the good one
        assert not server.paused and not server.closed
        # A second client is accepted at once, with no further error.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            assert green_read_until(second, b"\n") == b"OK\n"
    out, err = capfd.readouterr()
    text = out + err
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "accept failed" in line]
    assert lines == ["balance: accept failed (Bad file descriptor); pausing new connections"], text
    assert "pausing new connections" not in text.replace(lines[0], "", 1), text


# -- the per-source limit's bookkeeping and reports (-l) -----------------------------------

def test_source_keys_count_ipv4_by_address_and_ipv6_by_64():
    from gbalance.proxy.server import source_key, source_name

    assert source_key("10.0.0.1") == "10.0.0.1" != source_key("10.0.0.2")
    assert source_key("::ffff:10.0.0.1") == "::ffff:10.0.0.1"
    a = source_key("2001:db8:1:2::5")
    assert a == source_key("2001:db8:1:2:ffff::1") == source_key("2001:db8:1:2::5%eth0")
    assert a != source_key("2001:db8:1:3::5")
    assert source_name(a, "2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert source_name("10.0.0.1", "10.0.0.1") == "10.0.0.1"


def _from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def test_per_source_refusals_are_counted_and_reported_once_per_period(tmp_path, monkeypatch, backends, capfd):
    """-l 2: a third connection from 127.0.0.2 is reset and logged; more in
    the same period are only counted, and reported in one line when the
    period is over; a period without any forgets the source (the next
    refusal is logged at once again).  Another address is not affected,
    and a source's count goes down as its connections end."""
    import gevent

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    be = backends("OK")
    port = free_port()
    with inprocess_server(["-f", "-l", "2", str(port), be.spec], tmp_path / "state") as (master, server):
        server.report_every = 0.4
        capfd.readouterr()
        kept = [_from("127.0.0.2", port) for _ in range(2)]
        gevent.sleep(0.2)
        assert len(server.links) == 2 and server.sources == {"127.0.0.2": 2}
        over = [_from("127.0.0.2", port) for _ in range(3)]
        other = _from("127.0.0.3", port)
        gevent.sleep(0.2)
        assert len(server.links) == 3 and server.refused_total == 3
        assert server.sources == {"127.0.0.2": 2, "127.0.0.3": 1}
        first = capfd.readouterr().err.splitlines()
        assert first == ["balance: 127.0.0.2 has 2 connections open, the per-source limit (-l): its new"
                         " connections are reset (reported at most every 0.4 seconds)"]
        gevent.sleep(0.5)
        report = capfd.readouterr().err.splitlines()
        assert len(report) == 1 and report[0].startswith(
            "balance: 127.0.0.2: 2 more connections reset over the per-source limit of 2 (-l) in"), report
        assert report[0].endswith("(3 from all sources since start)"), report
        gevent.sleep(0.6)
        assert capfd.readouterr().err == "" and server.refused == {} and server._reporter is None
        kept[0].close()
        gevent.sleep(0.2)
        assert server.sources == {"127.0.0.2": 1, "127.0.0.3": 1}
        again = _from("127.0.0.2", port)
        late = _from("127.0.0.2", port)
        gevent.sleep(0.2)
        assert server.refused_total == 4
        assert "127.0.0.2 has 2 connections open" in capfd.readouterr().err
        for s in kept + over + [other, again, late]:
            s.close()
        gevent.sleep(0.2)
        assert server.sources == {}


# -- one wake-up of the listener: how many accepts, how many fail -----------------------------

class CountingAccepts:
    """Wraps the listening socket: counts ``_accept`` calls and the EAGAINs among them."""

    def __init__(self, real):
        self._real = real
        self.accepted = 0
        self.eagain = 0

    def _accept(self):
        try:
            got = self._real._accept()
        except BlockingIOError:
            self.eagain += 1
            raise
        self.accepted += 1
        return got

    def __getattr__(self, name):
        return getattr(self._real, name)


def _queue_clients(port: int, n: int) -> list:
    """``n`` clients whose connections wait in the listen backlog (not accepted yet)."""
    import time
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    time.sleep(0.05)     # the handshakes' last ACKs are in: all n are in the accept queue
    return clients


def test_a_wakeup_accepts_the_whole_queue_and_a_single_client_costs_no_failed_accept(tmp_path, backends):
    """Called once, the accept loop takes every client waiting (a batch ends
    with one EAGAIN, as accept-until-EAGAIN does); a wake-up that finds a
    single client right after a batch still tries one more accept (it cannot
    know yet that the load has eased), and the next single client costs no
    failed accept at all on Linux (the listener's TCP_INFO said the queue was
    empty).  Every client is proxied."""
    import sys
    be = backends("OK")
    port = free_port()
    with inprocess_server(["-f", str(port), be.spec], tmp_path / "state") as (master, server):
        if sys.platform.startswith("linux"):
            assert server._queued is not None
        counting = CountingAccepts(server.socket)
        server.stop_accepting()                 # the test calls the loop itself
        server.socket = counting
        try:
            batch = _queue_clients(port, 5)
            server._do_read()
            assert (counting.accepted, counting.eagain) == (5, 1)
            for c in batch:
                assert green_read_until(c, b"\n") == b"OK\n"
                c.close()
            one = _queue_clients(port, 1)
            server._do_read()
            assert (counting.accepted, counting.eagain) == (6, 2)
            assert green_read_until(one[0], b"\n") == b"OK\n"
            one[0].close()
            again = _queue_clients(port, 1)
            server._do_read()
            expected = 2 if sys.platform.startswith("linux") else 3
            assert (counting.accepted, counting.eagain) == (7, expected)
            assert green_read_until(again[0], b"\n") == b"OK\n"
            again[0].close()
        finally:
            server.socket = counting._real


# -- what each held link costs -----------------------------------------------------------------

def test_links_share_their_channels_counter_indexes_and_one_close_callback(tmp_path, backends):
    """Per held link the server makes no int, bound method or relay entry of
    its own: links of one channel share its counter indexes (also past the
    small ints Python caches), all links share one on_close, and the urgent
    relay looks through the server's own dict of links."""
    bes = [backends(f"B{i}") for i in range(8)]
    port = free_port()
    with inprocess_server(["-f", str(port), *[b.spec for b in bes]], tmp_path / "state") as (master, server):
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
        try:
            tags = {green_read_until(c, b"\n") for c in clients}
            assert tags == {f"B{i}\n".encode() for i in range(8)}
            links = list(server.links)
            assert len(links) == 16
            by_channel: dict = {}
            for link in links:
                by_channel.setdefault(link.c_idx, []).append(link)
            assert len(by_channel) == 8 and max(by_channel) > 256
            for a, b in by_channel.values():
                assert a.up.idx is b.up.idx and a.down.idx is b.down.idx and a.c_idx is b.c_idx
            assert all(link.on_close is links[0].on_close for link in links)
            assert server.urgent.links is server.links and not hasattr(server.urgent, "outside")
        finally:
            for c in clients:
                c.close()


# -- Python calls per short connection ---------------------------------------------------------

#: Python function calls in gbalance's own modules per short connection
#: (client speaks first, backend answers and closes), pure build.  Measured
#: 2026-12-05: 45.2 before the per-connection helpers were written out
#: (_all_read, Flow.stop, urgent add_link/remove_link, _end, _send_early,
#: Attempt.stop, _recycle, early_room, channels.usable, clear_suspect,
#: Watchers.io and recycle_io for a link's read watchers), 29.4 after.
#: A compiled module's functions report no calls, so there it counts fewer.
PY_CALL_BUDGET = 31



def test_a_short_connection_makes_few_python_calls(tmp_path):
    """The per-connection path (accept, race, link, both ends) is held to
    PY_CALL_BUDGET calls of Python functions in gbalance's modules, counted
    with sys.setprofile over 20 connections after 5 to fill the pools."""
    import sys
    import gevent

    backend = OneShotBackend()
    port = free_port()

    def one() -> None:
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert green_read_until(c, b"\n") == b"a" * 99 + b"\n"
        finally:
            c.close()
        for _ in range(100):
            gevent.sleep(0.01)
            if not server.links and not server.pending:
                return
        raise AssertionError("the link did not close after the client did")

    calls: dict = {}

    def profile(frame, event, arg) -> None:
        if event == "call":
            name = frame.f_code.co_filename
            if "/gbalance/" in name:
                key = (name.rsplit("/gbalance/", 1)[1], frame.f_code.co_name)
                calls[key] = calls.get(key, 0) + 1

    try:
        with inprocess_server(["-f", str(port), f"127.0.0.1:{backend.port}"], tmp_path / "state") as (_, server):
            for _ in range(5):
                one()
            n = 20
            for _ in range(n):
                sys.setprofile(profile)
                try:
                    one()
                finally:
                    sys.setprofile(None)
    finally:
        backend.sock.close()
    per = sum(calls.values()) / n
    top = ", ".join(f"{f}:{c} {k / n:g}" for (f, c), k in sorted(calls.items(), key=lambda kv: -kv[1])[:12])
    assert per <= PY_CALL_BUDGET, f"{per:.1f} Python calls per short connection (budget {PY_CALL_BUDGET}): {top}"


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_accepted_clients_carry_the_address_socket_accept_gives(tmp_path, v6):
    """The client address each accept hands on (routing, -l, PROXY headers,
    logs) is exactly socket.accept's: (host, port) for IPv4 with octets of
    one to three digits, (host, port, flowinfo, scope_id) for IPv6.  The
    compiled build makes this accept itself (csys.pxd gbc_accept)."""
    import gevent

    backend = OneShotBackend()
    port = free_port()
    seen: list = []
    argv = (["-6", "-b", "::1"] if v6 else []) + ["-f", str(port), f"127.0.0.1:{backend.port}"]
    with inprocess_server(argv, tmp_path / "state") as (_, server):
        original = server.handle_client

        def record(fd: int, address: tuple) -> None:
            seen.append(address)
            original(fd, address)

        server.handle_client = record
        sources = ["::1"] if v6 else ["127.0.0.1", "127.10.200.3", "127.100.20.9", "127.255.9.99"]
        expected = []
        for source in sources:
            c = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET)
            c.bind((source, 0))
            c.setblocking(False)
            c.connect_ex(("::1" if v6 else "127.0.0.1", port))
            expected.append((source, c.getsockname()[1], 0, 0) if v6 else (source, c.getsockname()[1]))
            for _ in range(500):
                gevent.sleep(0.01)
                if len(seen) == len(expected):
                    break
            c.close()
        assert seen == expected
        assert all(type(a[0]) is str and type(a[1]) is int for a in seen)
