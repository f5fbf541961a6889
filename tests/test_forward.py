"""forward.Link on real loopback TCP sockets, driven by the gevent hub.

Each test builds client <-> [proxy link] <-> server out of two connected
TCP pairs.  The link gets the proxy-side ends (plain non-blocking sockets,
as the server hands them over); the test plays the client and the server
application with gevent sockets, so every blocking call runs the hub and
with it the link's watcher callbacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import resource
import socket

import gevent
import gevent.socket as gsocket
import pytest
from gevent import get_hub

from conftest import seeded_data, tcp_pair
from gbalance.proxy.watchers import Watchers
from gbalance.proxy import bulkmode
from gbalance.proxy.forward import (CHUNK, COPY_CHUNK, COPY_ROUNDS, F_GETPIPE_SZ, HAVE_SPLICE, PIPE_SIZE,
                                    SPLICE_ROUNDS, Link)
from gbalance.proxy.urgent import UrgentRelay

SENT, RCVD, C = 0, 1, 2
LIMIT = 20  # seconds any single test may spend waiting


def test_this_platform_splices():
    """The splice tests below assume Linux, where the forwarder must splice."""
    assert HAVE_SPLICE


class Rig:
    """A client, a server and one Link between them."""

    def __init__(self, dump=None, splice: bool | None = None, urgent: UrgentRelay | None = None,
                 watchers: Watchers | None = None):
        self.q = memoryview(bytearray(8 * 4)).cast("q")
        self.q[C] = 1                       # the connect counted the connection
        client_app, self.client_end = tcp_pair()
        self.server_end, server_app = tcp_pair()
        for s in (self.client_end, self.server_end):
            s.setblocking(False)
            if urgent is not None:
                urgent.own(s)       # as the server does at accept and connect
        self.client = gsocket.socket(fileno=client_app.detach())
        self.server = gsocket.socket(fileno=server_app.detach())
        self.closed: list[Link] = []

        def on_close(link: Link) -> None:
            self.closed.append(link)
            if urgent is not None:
                urgent.links.pop(link, None)

        self.link = Link(get_hub().loop, self.client_end, self.server_end, self.q, SENT, RCVD, C,
                         on_close=on_close, dump=dump, urgent=urgent, watchers=watchers)
        if splice is not None:
            self.link.splice = splice
        if urgent is not None:
            urgent.links[self.link] = 0.0      # as the server records its open links
        self.link.start()

    def wait_closed(self, timeout: float = 5.0) -> None:
        with gevent.Timeout(timeout):
            while not self.link.closed:
                gevent.sleep(0.005)

    def teardown(self) -> None:
        self.link.close()
        self.client.close()
        self.server.close()


@pytest.fixture
def rigs():
    made: list[Rig] = []
    pool = Watchers(get_hub().loop)      # as a server's connector keeps one

    def make(**kw) -> Rig:
        rig = Rig(watchers=pool, **kw)
        made.append(rig)
        return rig

    with gevent.Timeout(LIMIT):
        yield make
    for rig in made:
        rig.teardown()


def recv_exactly(s, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def recv_all(s) -> bytes:
    buf = bytearray()
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk


def ways(monkeypatch, way: str) -> bool | None:
    """Set a bulk flow's way for a test: "copy" (no splicing), "splice" (a
    window too long to end: it stays on the splice it starts with) or
    "switching" (windows of a few ms: the ways take turns all through the
    transfer).  The ``splice`` argument for the rig."""
    if way == "splice":
        monkeypatch.setattr(bulkmode, "WINDOW", 3600.0)
    elif way == "switching":
        monkeypatch.setattr(bulkmode, "WINDOW", 0.002)
        monkeypatch.setattr(bulkmode, "HOLD", 0.004)
        monkeypatch.setattr(bulkmode, "STALE", 10_000)
    return False if way == "copy" else None


def both_ways_whole(rig: "Rig", up: bytes, down: bytes) -> None:
    """Send ``up`` and ``down`` through the link at once; both arrive whole,
    in order, and are counted."""
    got: dict[str, bytes] = {}

    def read(name, sock, n):
        got[name] = recv_exactly(sock, n)

    jobs = [gevent.spawn(rig.client.sendall, up), gevent.spawn(rig.server.sendall, down),
            gevent.spawn(read, "up", rig.server, len(up)),
            gevent.spawn(read, "down", rig.client, len(down))]
    gevent.joinall(jobs, raise_error=True)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    assert (rig.q[SENT], rig.q[RCVD]) == (len(up), len(down))


def payload(size: int, seed: int) -> bytes:
    """Non-repeating test data (a short repeated pattern could hide reordering)."""
    return seeded_data(size, seed, repeat=64)


# -- copy path --------------------------------------------------------------------------

def test_copy_path_both_ways_and_counters(rigs):
    rig = rigs()
    rig.client.sendall(b"hello")
    assert recv_exactly(rig.server, 5) == b"hello"
    rig.server.sendall(b"world!")
    assert recv_exactly(rig.client, 6) == b"world!"
    for _ in range(50):
        rig.client.sendall(b"x" * 100)
        assert recv_exactly(rig.server, 100) == b"x" * 100
    assert (rig.q[SENT], rig.q[RCVD], rig.q[C]) == (5 + 5000, 6, 1)
    assert rig.link.up.pipe_r == -1 and rig.link.down.pipe_r == -1  # small reads never splice
    assert not rig.link.closed


def test_copy_path_bulk_when_splice_is_off(rigs):
    rig = rigs(splice=False)
    data = payload(3 << 20, 1)
    sender = gevent.spawn(rig.client.sendall, data)
    assert recv_exactly(rig.server, len(data)) == data
    sender.get()
    assert rig.q[SENT] == len(data)
    assert rig.link.up.pipe_r == -1
    # Bulk without a pipe: the copy way, several reads per wake-up.
    assert rig.link.up.bulk is not None and rig.link.up.bulk.copy and not rig.link.up.bulk.trial


def test_dump_sees_every_chunk_and_client_eof(rigs):
    chunks: list[str] = []
    rig = rigs(dump=chunks.append)
    assert rig.link.splice is False            # -p never splices
    rig.client.sendall(b"ping\\\n")
    assert recv_exactly(rig.server, 6) == b"ping\\\n"
    rig.server.sendall(b"\x00pong")
    assert recv_exactly(rig.client, 5) == b"\x00pong"
    rig.client.shutdown(socket.SHUT_WR)
    assert rig.server.recv(10) == b""
    gevent.sleep(0.05)
    assert chunks == ["-> 6\nping\\\\\\0A\n\n", "-< 5\n\\00pong\n", "-> 0\n\n"]


# -- splice path -------------------------------------------------------------------------

def test_splice_path_large_transfers_both_ways(rigs):
    rig = rigs()
    up, down = payload(12 << 20, 2), payload(9 << 20, 3) + b"tail"
    both_ways_whole(rig, up, down)
    # Bulk reads filled the 64 KB buffer, so both directions moved to splice.
    assert rig.link.up.pipe_r >= 0 and rig.link.down.pipe_r >= 0
    # Small messages still pass after the switch.
    rig.client.sendall(b"after")
    assert recv_exactly(rig.server, 5) == b"after"
    assert rig.q[SENT] == len(up) + 5


def one_wake_up(rig: Rig, direction: str, piece: int, rounds: int, seed: int) -> int:
    """Warm a flow into bulk, queue more than ``rounds`` pieces of ``piece``
    bytes at its source without letting the loop run, call its read callback
    once and return what that one wake-up moved; then check the stream whole."""
    sender, receiver = (rig.client, rig.server) if direction == "up" else (rig.server, rig.client)
    src_end = rig.client_end if direction == "up" else rig.server_end
    dst_end = rig.server_end if direction == "up" else rig.client_end
    for s in (src_end, receiver):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    dst_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    warm = payload(1 << 20, seed)
    job = gevent.spawn(sender.sendall, warm)
    assert recv_exactly(receiver, len(warm)) == warm
    job.get()
    flow = getattr(rig.link, direction)
    assert flow.bulk is not None and flow.rw.active
    data = payload(rounds * piece + 8 * piece, seed + 1)
    queued = 0
    while queued < len(data):        # no yield: the loop does not run the flow meanwhile
        try:
            queued += sender.send(data[queued:queued + piece], socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    assert queued > 4 * piece
    idx = SENT if direction == "up" else RCVD
    before = rig.q[idx]
    (flow.on_read_copy if flow.bulk.copy else flow.on_read_splice)()      # one wake-up
    moved = rig.q[idx] - before
    rest = gevent.spawn(sender.sendall, data[queued:])
    assert hashlib.sha256(recv_exactly(receiver, len(data))).digest() == hashlib.sha256(data).digest()
    rest.get()
    return moved


@pytest.mark.parametrize("direction", ["up", "down"])
def test_one_wake_up_splices_several_pipefuls_but_a_bounded_number(rigs, monkeypatch, direction):
    """A splicing flow moves what its source holds in one callback, up to
    SPLICE_ROUNDS pipefuls (not one pipeful per trip through the loop), and
    the stream stays whole."""
    ways(monkeypatch, "splice")
    rig = rigs()
    moved = one_wake_up(rig, direction, PIPE_SIZE, SPLICE_ROUNDS, 11)
    assert not getattr(rig.link, direction).bulk.copy
    assert 2 * PIPE_SIZE < moved <= SPLICE_ROUNDS * PIPE_SIZE


@pytest.mark.parametrize("direction", ["up", "down"])
def test_one_wake_up_copies_several_pieces_but_a_bounded_number(rigs, direction):
    """The copy way moves what its source holds in one callback, up to
    COPY_ROUNDS pieces of COPY_CHUNK, and the stream stays whole."""
    rig = rigs(splice=False)
    moved = one_wake_up(rig, direction, COPY_CHUNK, COPY_ROUNDS, 13)
    assert getattr(rig.link, direction).bulk.copy
    assert 2 * COPY_CHUNK < moved <= COPY_ROUNDS * COPY_CHUNK


def test_bulk_flows_that_change_ways_all_the_time_lose_nothing(rigs, monkeypatch):
    """Both directions at once, the ways taking turns every few ms: every
    byte arrives, in order, and each flow really used both ways."""
    ways(monkeypatch, "switching")
    rig = rigs()
    up, down = payload(24 << 20, 15), payload(16 << 20, 16) + b"tail"
    both_ways_whole(rig, up, down)
    for flow in (rig.link.up, rig.link.down):
        assert flow.bulk is not None and flow.bulk.switches >= 3, flow.bulk.switches
    rig.client.sendall(b"after")
    assert recv_exactly(rig.server, 5) == b"after"


def test_splice_closes_its_pipe(rigs):
    rig = rigs()
    data = payload(2 << 20, 4)
    sender = gevent.spawn(rig.client.sendall, data)
    assert recv_exactly(rig.server, len(data)) == data
    sender.get()
    pipe_r, pipe_w = rig.link.up.pipe_r, rig.link.up.pipe_w
    assert pipe_r >= 0
    rig.link.close()
    for fd in (pipe_r, pipe_w):
        with pytest.raises(OSError):
            os.fstat(fd)


# -- half-close --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [7, 3 << 20], ids=["copy", "bulk"])
def test_half_close_from_client(rigs, size):
    """Request, shutdown(SHUT_WR), then the answer still arrives (the C programs lose it)."""
    rig = rigs()
    request = payload(size, 5)
    sender = gevent.spawn(rig.client.sendall, request)
    assert recv_exactly(rig.server, size) == request
    sender.get()
    rig.client.shutdown(socket.SHUT_WR)
    assert rig.server.recv(100) == b""          # EOF passed on
    assert not rig.link.closed and rig.q[C] == 1
    answer = payload(2 << 20, 6)
    rig.server.sendall(answer)
    rig.server.shutdown(socket.SHUT_WR)
    assert recv_all(rig.client) == answer
    rig.wait_closed()
    assert rig.closed == [rig.link]
    assert (rig.q[SENT], rig.q[RCVD], rig.q[C]) == (size, len(answer), 0)
    assert rig.client_end.fileno() == -1 and rig.server_end.fileno() == -1


def test_half_close_from_server(rigs):
    rig = rigs()
    rig.server.sendall(b"banner\n")
    rig.server.shutdown(socket.SHUT_WR)
    assert recv_all(rig.client) == b"banner\n"
    rig.client.sendall(b"still talking")
    assert recv_exactly(rig.server, 13) == b"still talking"
    rig.client.close()
    assert rig.server.recv(10) == b""
    rig.wait_closed()
    assert (rig.q[SENT], rig.q[RCVD], rig.q[C]) == (13, 7, 0)


def test_close_counts_once(rigs):
    rig = rigs()
    rig.link.close()
    rig.link.close()
    rig.link.abort()
    assert rig.q[C] == 0 and rig.closed == [rig.link]


# -- a reply queued with its end ---------------------------------------------------------

TCP_CLOSE_WAIT = 8


def segments_in(sock) -> int:
    """Segments ``sock`` has received (Linux ``tcpi_segs_in``)."""
    return int.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)[140:144], "little")


def ended_backend_link(send) -> tuple:
    """A link whose backend already did ``send(server_app)`` and closed, with
    its end in (CLOSE_WAIT) before the link reads anything.

    Returns (link, client application socket, q); nothing runs the link's
    watchers until the test starts it.
    """
    q = memoryview(bytearray(8 * 4)).cast("q")
    q[C] = 1
    client_app, client_end = tcp_pair()
    server_end, server_app = tcp_pair()
    for s in (client_end, server_end):
        s.setblocking(False)
    send(server_app)
    server_app.close()
    with gevent.Timeout(5):
        while server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_CLOSE_WAIT:
            gevent.sleep(0.005)
    link = Link(get_hub().loop, client_end, server_end, q, SENT, RCVD, C)
    return link, client_app, q


def test_a_reply_queued_with_its_end_goes_on_with_it_in_one_segment():
    """A backend that answered and closed (HTTP/1.0, "Connection: close"):
    the link's first read takes the reply and the end together, and the
    client gets both in one segment; no second read, no second segment."""
    link, client_app, q = ended_backend_link(lambda s: s.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello"))
    try:
        before = segments_in(client_app)
        link.down.on_read()
        assert link.down.done, "the end was left for another read"
        client_app.settimeout(5)
        assert recv_all(client_app) == b"HTTP/1.0 200 OK\r\n\r\nhello"
        assert segments_in(client_app) - before == 1, "reply and end came in separate segments"
        assert q[RCVD] == 24 and not link.closed          # the client may still talk
    finally:
        link.close()
        client_app.close()


@pytest.mark.parametrize("urgent_at", [100, 0], ids=["mid-reply", "first-byte"])
def test_a_reply_with_an_urgent_byte_before_its_end_loses_nothing(urgent_at):
    """Reads stop at an urgent mark, so the first read is short of the end:
    the link must not take that for the whole reply (the rest would be lost)."""
    def send(s):
        if urgent_at:
            s.sendall(b"a" * urgent_at)
        s.send(b"!", socket.MSG_OOB)
        s.sendall(b"b" * 10)

    link, client_app, q = ended_backend_link(send)
    try:
        link.start()
        client_app.settimeout(5)
        got = gsocket.socket(fileno=client_app.detach())
        assert recv_all(got) == b"a" * urgent_at + b"b" * 10
        got.close()
    finally:
        link.close()


def test_a_reply_longer_than_one_read_with_its_end_queued_arrives_whole():
    """More than one read's worth queued before the end: every byte arrives."""
    data = payload(CHUNK + 17, 7)         # (fits in the socket buffers: the end gets in)
    link, client_app, q = ended_backend_link(lambda s: s.sendall(data))
    try:
        link.start()
        got = gsocket.socket(fileno=client_app.detach())
        assert recv_all(got) == data
        got.close()
        assert q[RCVD] == len(data)
    finally:
        link.close()


# -- back-pressure ---------------------------------------------------------------------------

@pytest.mark.parametrize("way", ["copy", "splice", "switching"])
def test_back_pressure_stops_reading_and_holds_little(rigs, monkeypatch, way):
    """A server that does not read: the link stops reading the client and
    holds at most one chunk (copy) or one pipe (splice), never the stream,
    whichever way the bulk flow is on when it stalls."""
    rig = rigs(splice=ways(monkeypatch, way))
    splice = way != "copy"
    # Fixed receive buffers (no autotuning) so the kernel cannot soak up the stream.
    for s in (rig.client_end, rig.server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    data = payload(24 << 20, 7)
    sender = gevent.spawn(rig.client.sendall, data)
    gevent.sleep(0.3)
    passed = rig.q[SENT]
    gevent.sleep(0.2)
    assert rig.q[SENT] == passed                # the link stopped taking data
    assert not sender.ready()                   # so the client is throttled
    flow = rig.link.up
    assert not flow.rw.active                   # not reading the client any more
    if way == "splice":
        assert flow.pending is None
    if flow.pending is None:
        assert 0 < flow.fill <= PIPE_SIZE
        # A stalled reader pins at most one small pipe in the kernel, not a megabyte.
        assert fcntl.fcntl(flow.pipe_w, F_GETPIPE_SZ) <= 256 << 10
        assert flow.ww is not None and flow.ww.active
    else:
        assert flow.pending is not None and len(flow.pending) <= CHUNK
        assert flow.ww is not None and flow.ww.active
    assert splice == (flow.pipe_r >= 0)
    held = rig.q[SENT]
    assert held < len(data)
    assert recv_exactly(rig.server, len(data)) == data
    sender.get()
    assert rig.q[SENT] == len(data)
    assert flow.rw.active and not flow.ww.active  # reading again once drained


def test_no_pipe_left_falls_back_to_copying(rigs):
    """pipe2 failing (out of descriptors) keeps the link on the copy path: no error, no retry per chunk."""
    rig = rigs()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, hard))
    try:
        with contextlib.suppress(OSError):
            while True:                           # use every descriptor number left
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        data = payload(4 << 20, 11)
        sender = gevent.spawn(rig.client.sendall, data)
        assert recv_exactly(rig.server, len(data)) == data
        sender.get()
        assert rig.link.up.pipe_r < 0 and not rig.link.splice
        assert not rig.link.closed
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- errors -------------------------------------------------------------------------------

def reset(sock) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_server_reset_closes_both(rigs):
    rig = rigs()
    rig.client.sendall(b"abc")
    assert recv_exactly(rig.server, 3) == b"abc"
    reset(rig.server)
    with contextlib.suppress(ConnectionResetError):
        assert rig.client.recv(10) == b""
    rig.wait_closed()
    assert rig.closed == [rig.link] and rig.q[C] == 0
    assert rig.client_end.fileno() == -1 and rig.server_end.fileno() == -1


def test_client_reset_mid_transfer_closes_both(rigs):
    rig = rigs()
    streamer = gevent.spawn(rig.server.sendall, payload(32 << 20, 8))
    assert len(recv_exactly(rig.client, 1 << 20)) == 1 << 20
    reset(rig.client)
    rig.wait_closed()
    with gevent.Timeout(5), pytest.raises(OSError):
        streamer.get()                           # the server learns it too
    assert rig.closed == [rig.link] and rig.q[C] == 0
    assert 1 << 20 <= rig.q[RCVD] < 32 << 20


def test_error_in_one_link_leaves_others_alone(rigs):
    a, b = rigs(), rigs()
    reset(a.server)
    a.wait_closed()
    b.client.sendall(b"fine")
    assert recv_exactly(b.server, 4) == b"fine"
    assert not b.link.closed and b.q[C] == 1


# -- urgent data ------------------------------------------------------------------------------

def test_urgent_byte_is_relayed(rigs):
    relay = UrgentRelay(get_hub().loop)
    rig = rigs(urgent=relay)
    rig.client.sendall(b"before")
    assert recv_exactly(rig.server, 6) == b"before"
    rig.client.send(b"!", socket.MSG_OOB)
    with gevent.Timeout(5):
        while True:
            try:
                byte = rig.server.recv(1, socket.MSG_OOB)
                break
            except (BlockingIOError, OSError):
                gevent.sleep(0.01)
    assert byte == b"!"
    rig.link.close()
    assert relay.peers == {}


@pytest.mark.parametrize("way", ["copy", "splice", "switching"])
def test_urgent_byte_in_bulk_keeps_the_stream_whole(rigs, monkeypatch, way):
    """Bulk, one urgent byte, more bulk, half-close: every way passes the mark,
    relays the urgent byte once and loses no normal byte."""
    import select
    import threading

    relay = UrgentRelay(get_hub().loop)
    rig = rigs(urgent=relay, splice=ways(monkeypatch, way))
    splice = way != "copy"
    first, second = payload(512 << 10, 21), payload(256 << 10, 22)
    plain = socket.socket(fileno=os.dup(rig.server.fileno()))   # a real thread reads it
    plain.setblocking(True)
    got, urgent = bytearray(), bytearray()

    def reader():
        poller = select.poll()
        poller.register(plain, select.POLLIN | select.POLLPRI)
        while True:
            ev = poller.poll(LIMIT * 1000)[0][1]
            if ev & select.POLLPRI:
                with contextlib.suppress(OSError):
                    urgent.extend(plain.recv(1, socket.MSG_OOB))
            if ev & ~select.POLLPRI:
                chunk = plain.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    rig.client.sendall(first)
    rig.client.send(b"!", socket.MSG_OOB)
    rig.client.sendall(second)
    rig.client.shutdown(socket.SHUT_WR)
    while t.is_alive():
        gevent.sleep(0.01)
    plain.close()
    assert bytes(got) == first + second
    assert bytes(urgent) == b"!"
    assert splice == (rig.link.up.pipe_r >= 0)


# -- recycled watchers -------------------------------------------------------------------

def test_next_link_reuses_a_closed_links_watchers_on_its_own_sockets(rigs):
    """A closed link's I/O watchers go to the next link (no new watcher, no
    fcntl per connection), pointed at the new link's descriptors, and the
    old link no longer holds them."""
    first = rigs()
    first.client.sendall(b"one")
    assert recv_exactly(first.server, 3) == b"one"
    old = {id(first.link.up.rw), id(first.link.down.rw)}
    first.link.close()
    assert first.link.up.rw is None and first.link.down.rw is None
    second = rigs()
    link = second.link
    assert {id(link.up.rw), id(link.down.rw)} == old
    assert link.up.rw.fd == second.client_end.fileno()
    assert link.down.rw.fd == second.server_end.fileno()
    assert link.up.rw.events & 3 == 1 and link.down.rw.events & 3 == 1
    second.client.sendall(b"two")
    assert recv_exactly(second.server, 3) == b"two"
    second.server.sendall(b"back")
    assert recv_exactly(second.client, 4) == b"back"


# -- the urgent relay's lazy epoll set -----------------------------------------------------

@pytest.fixture
def relays():
    """Factory for UrgentRelays on the hub's loop, their watchers stopped after the test."""
    made: list[UrgentRelay] = []

    def make(calm: float) -> UrgentRelay:
        relay = UrgentRelay(get_hub().loop, calm=calm)
        assert relay.ep is not None, "this platform has no epoll/SIGURG"
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.watcher.stop()
        relay.sigurg.stop()
        relay.calm_timer.stop()
        relay.ep.close()


def recv_urgent(sock, timeout: float = 5.0) -> bytes:
    """The urgent byte waiting on ``sock`` (polled with MSG_OOB until it comes)."""
    with gevent.Timeout(timeout):
        while True:
            try:
                return sock.recv(1, socket.MSG_OOB)
            except OSError:        # EINVAL/EAGAIN: not there yet
                gevent.sleep(0.005)


def fds(rig: Rig) -> set[int]:
    return {rig.client_end.fileno(), rig.server_end.fileno()}


def test_link_without_urgent_data_stays_out_of_the_urgent_set(rigs, relays):
    """A link started with no urgent data seen costs no epoll_ctl: its sockets
    are not in the relay's set and the relay keeps no entry for it (the
    server's record of open links is what an alert looks through)."""
    relay = relays(calm=30)
    rig = rigs(urgent=relay)
    assert relay.peers == {}
    assert not relay.alert and not hasattr(relay, "outside")
    rig.client.sendall(b"ping")
    assert recv_exactly(rig.server, 4) == b"ping"
    rig.server.sendall(b"pong")
    assert recv_exactly(rig.client, 4) == b"pong"
    assert relay.peers == {} and relay.signals == 0 and not relay.alert
    rig.link.close()
    assert relay.links == {} and relay.peers == {}


def test_sigurg_puts_open_links_and_new_ones_in_the_urgent_set(rigs, relays):
    """The client's urgent byte raises SIGURG: the relay goes on alert, puts the
    open link's sockets in its set, relays the byte (the backend reads it with
    MSG_OOB), and a link started during the alert joins the set at its start."""
    relay = relays(calm=30)
    first = rigs(urgent=relay)
    first.client.sendall(b"before")
    assert recv_exactly(first.server, 6) == b"before"
    first.client.send(b"!", socket.MSG_OOB)
    assert recv_urgent(first.server) == b"!"
    assert relay.signals >= 1
    assert relay.alert
    assert fds(first) <= set(relay.peers)
    assert relay.peers[first.client_end.fileno()][:2] == (first.client_end, first.server_end)
    first.client.sendall(b"after")
    assert recv_exactly(first.server, 5) == b"after"      # the stream goes on whole

    second = rigs(urgent=relay)                           # started during the alert
    assert fds(second) <= set(relay.peers)
    second.server.send(b"?", socket.MSG_OOB)              # and its urgent bytes pass too
    assert recv_urgent(second.client) == b"?"
    second.link.close()
    assert not fds(second) & set(relay.peers)


def test_alert_ends_after_calm_and_later_links_stay_out(rigs, relays):
    """With calm=0.3 s the alert ends about 0.3 s after the last SIGURG; a link
    started after that is not put in the set (the link already in it stays)."""
    relay = relays(calm=0.3)
    first = rigs(urgent=relay)
    first.client.send(b"!", socket.MSG_OOB)
    assert recv_urgent(first.server) == b"!"
    assert relay.alert
    t0 = get_hub().loop.now()
    with gevent.Timeout(3):
        while relay.alert:
            gevent.sleep(0.01)
    assert get_hub().loop.now() - t0 >= 0.2              # it lasted (about) calm
    later = rigs(urgent=relay)
    assert not fds(later) & set(relay.peers)
    assert later.link in relay.links                      # an alert would find it there
    assert fds(first) <= set(relay.peers)                 # already in: stays until closed


@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
def test_back_pressure_puts_the_unread_source_in_the_urgent_set(rigs, relays, splice):
    """A flow that stops reading its source because the destination is full puts
    that source in the set without any alert (so its errors are still seen);
    the other direction, still reading, stays out."""
    relay = relays(calm=30)
    rig = rigs(splice=splice, urgent=relay)
    for s in (rig.client_end, rig.server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    data = payload(24 << 20, 31)
    sender = gevent.spawn(rig.client.sendall, data)
    flow = rig.link.up
    with gevent.Timeout(10):
        while flow.rw.active:
            gevent.sleep(0.01)
    assert splice == (flow.pipe_r >= 0)
    assert relay.signals == 0 and not relay.alert
    entry = relay.peers.get(rig.client_end.fileno())
    assert entry == (rig.client_end, rig.server_end, rig.link)
    assert rig.server_end.fileno() not in relay.peers
    assert recv_exactly(rig.server, len(data)) == data
    sender.get()


def test_the_end_is_taken_from_tcp_info_only_on_plain_tcp(monkeypatch):
    """MPTCP sockets (mptcpize, or a BPF program choosing the protocol) report
    one subflow in TCP_INFO, which says nothing of the whole stream."""
    import gbalance.proxy.forward as forward

    assert forward._plain_tcp() and forward._PROBE_END    # this machine: plain TCP

    class MptcpSocket(socket.socket):
        def getsockopt(self, level, option, *args):
            if (level, option) == (socket.SOL_SOCKET, socket.SO_PROTOCOL):
                return 262                                # IPPROTO_MPTCP
            return super().getsockopt(level, option, *args)

    monkeypatch.setattr(forward.socket, "socket", MptcpSocket)
    assert forward._plain_tcp() is False


# -- -T: what a timed-out link holds, and how it ends -------------------------------------

def test_in_flight_is_false_on_a_quiet_link_and_true_under_back_pressure(rigs):
    """Quiet with every byte delivered: nothing in flight (a FIN may end it).
    A server that stops reading: bytes wait here or in the kernel's queues."""
    rig = rigs(splice=False)
    rig.client.sendall(b"ping")
    assert recv_exactly(rig.server, 4) == b"ping"
    rig.server.sendall(b"pong")
    assert recv_exactly(rig.client, 4) == b"pong"
    gevent.sleep(0.05)
    assert not rig.link.in_flight()
    rig.link.up.pending = b"held"           # a flow's rest counts
    assert rig.link.in_flight()
    rig.link.up.pending = None
    assert not rig.link.in_flight()


def test_in_flight_sees_bytes_sent_and_not_yet_acknowledged(rigs):
    """The client's receive window is full: bytes wait in the proxy-side
    socket's send queue (sent, not acknowledged), not at the client."""
    rig = rigs(splice=False)
    rig.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    rig.client_end.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(1000):
            rig.client_end.send(b"z" * 65536)
    assert rig.link.in_flight()


def test_in_flight_sees_bytes_not_yet_read_from_a_socket(rigs):
    rig = rigs(splice=False)
    rig.link.up.rw.stop()                   # the link does not read the client now
    rig.client.sendall(b"waiting")
    gevent.sleep(0.05)
    assert rig.link.in_flight()


def test_reset_ends_both_sides_with_a_reset(rigs):
    rig = rigs(splice=False)
    rig.client.sendall(b"x")
    assert recv_exactly(rig.server, 1) == b"x"
    rig.link.reset()
    assert rig.link.closed and rig.q[C] == 0 and rig.closed == [rig.link]
    for app in (rig.client, rig.server):
        with pytest.raises(ConnectionResetError):
            app.recv(10)


def test_a_slow_draining_destination_keeps_the_link_active(rigs):
    """Writes of held bytes count as activity for -T, not only reads."""
    rig = rigs(splice=False)
    rig.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    rig.server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
    sender = gevent.spawn(rig.client.sendall, payload(8 << 20, 3))
    gevent.sleep(0.3)
    flow = rig.link.up
    assert flow.pending is not None and flow.ww.active   # stalled on the server
    rig.link.active = False
    taken = 0                                # the server takes some (without running
    with contextlib.suppress(BlockingIOError):     # the hub): room to write
        while taken < 256 << 10:
            taken += len(os.read(rig.server.fileno(), 65536))
    assert taken
    held = len(flow.pending)
    flow.on_write()                          # what the write watcher calls
    assert flow.pending is None or len(flow.pending) < held
    assert rig.link.active
    sender.kill()


def test_the_pipe_budget_keeps_a_link_on_the_copy_path(rigs):
    """No pipe left in the process's budget (the descriptors are for
    connections): the link copies, every byte arrives, no pipe is made."""
    from gbalance.proxy import forward

    saved = forward.PIPES.limit
    forward.PIPES.limit = forward.PIPES.open
    try:
        rig = rigs()
        data = payload(4 << 20, 5)
        sender = gevent.spawn(rig.client.sendall, data)
        assert recv_exactly(rig.server, len(data)) == data
        sender.get()
        assert rig.link.up.pipe_r < 0 and not rig.link.splice
    finally:
        forward.PIPES.limit = saved


def test_the_pipe_budget_counts_pipes_open(rigs):
    from gbalance.proxy import forward

    before = forward.PIPES.open
    rig = rigs()
    data = payload(2 << 20, 6)
    sender = gevent.spawn(rig.client.sendall, data)
    assert recv_exactly(rig.server, len(data)) == data
    sender.get()
    assert rig.link.up.pipe_r >= 0 and forward.PIPES.open == before + 1
    rig.link.close()
    assert forward.PIPES.open == before


@pytest.mark.parametrize("platform", ["this", "portable"])
def test_set_owner_sets_the_owner_and_reports_a_refusal(monkeypatch, platform):
    """set_owner (F_SETOWN per proxied socket, so urgent data raises SIGURG):
    the fast C-library call here, and the portable fcntl.fcntl fallback."""
    import gbalance.proxy.urgent as urgent

    if platform == "portable":
        monkeypatch.setattr(urgent.sys, "platform", "other")
    set_owner = urgent._owner_setter()
    assert set_owner.__name__ == ("direct" if platform == "this" else "portable")
    with socket.socket() as s:
        assert fcntl.fcntl(s.fileno(), fcntl.F_GETOWN) == 0
        set_owner(s.fileno(), os.getpid())
        assert fcntl.fcntl(s.fileno(), fcntl.F_GETOWN) == os.getpid()
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        with pytest.raises(OSError):
            set_owner(r, os.getpid())      # a closed descriptor: EBADF


# -- memory per held link ------------------------------------------------------------------

def test_idle_link_reads_with_the_flow_itself_as_callback(rigs):
    """An idle link's read watchers call the flows themselves: no bound method
    object per flow (64 bytes each per held connection); the link still
    forwards both ways and after a write wait goes back to the same callback."""
    rig = rigs()
    up, down = rig.link.up, rig.link.down
    assert up.rw.callback is up and down.rw.callback is down
    rig.client.sendall(b"ping")
    assert recv_exactly(rig.server, 4) == b"ping"
    rig.server.sendall(b"pong")
    assert recv_exactly(rig.client, 4) == b"pong"
    assert up.rw.callback is up and down.rw.callback is down
    assert up.on_read == up.__call__
    # An idle (or small-talk) link pins no splice pipe and no write watcher.
    assert up.pipe_r == down.pipe_r == -1 and up.ww is None and down.ww is None
