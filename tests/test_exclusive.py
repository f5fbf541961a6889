"""gbalance.system.exclusive: the listener registered with EPOLLEXCLUSIVE in
libev's own epoll set, read back from the kernel (/proc/self/fdinfo)."""

from __future__ import annotations

import select
import socket
import time

import gevent
import pytest

from gbalance.system import exclusive as ex


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.setblocking(False)
    yield s
    s.close()


def test_parse_fdinfo_of_a_real_epoll_set(listener):
    other = socket.socket()
    ep = select.epoll()
    try:
        ep.register(listener.fileno(), select.EPOLLIN)
        ep.register(other.fileno(), select.EPOLLOUT)
        got = ex.registered(ep.fileno())
        assert set(got) == {listener.fileno(), other.fileno()}
        assert got[listener.fileno()][0] & 0xFFFF == ex.EPOLLIN | 0x18     # (ERR|HUP always)
        assert got[other.fileno()][0] & select.EPOLLOUT
        assert got[listener.fileno()][1] & 0xFFFFFFFF == listener.fileno()  # python's data: the fd
        assert ex.epoll_fds().count(ep.fileno()) == 1
    finally:
        ep.close()
        other.close()


def test_parse_fdinfo_skips_garbage():
    assert ex.parse_fdinfo("") == {}
    assert ex.parse_fdinfo("pos:\t0\nflags:\t02\nmnt_id:\t15\n") == {}
    assert ex.parse_fdinfo("tfd: x events: 19 data: 5\ntfd: 5 events: zz data: 5\n"
                           "tfd: 6 events: 19\ntfd: -1 events: 19 data: 1\n\x00\xff") == {}
    assert ex.parse_fdinfo("tfd:        7 events:       19 data: 500000007  pos:0 ino:1 sdev:8\n") \
        == {7: (0x19, 0x500000007)}
    assert ex.registered(10 ** 6) == {}                  # no such descriptor


def test_make_exclusive_keeps_the_data_and_sets_the_flag(listener):
    ep = select.epoll()
    fd = listener.fileno()
    data = fd | (7 << 32)                                # as libev registers: fd | generation << 32
    try:
        assert ex._ctl_call(ep.fileno(), ex.EPOLL_CTL_ADD, fd, ex.EPOLLIN, data) == 0
        assert not ex.registered(ep.fileno())[fd][0] & ex.EPOLLEXCLUSIVE
        assert ex.make_exclusive(ep.fileno(), fd) == ""
        events, got = ex.registered(ep.fileno())[fd]
        assert events & ex.EPOLLEXCLUSIVE and events & ex.EPOLLIN
        assert got == data
        assert ex.make_exclusive(ep.fileno(), fd) == ""  # already: left as is
        # The entry still reports a waiting client.
        with socket.create_connection(listener.getsockname()):
            assert [f for f, _ in ep.poll(5)] == [fd]
    finally:
        ep.close()


def test_make_exclusive_leaves_what_it_does_not_expect(listener):
    ep = select.epoll()
    fd = listener.fileno()
    try:
        assert "not in epoll set" in ex.make_exclusive(ep.fileno(), fd)
        ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
        before = ex.registered(ep.fileno())[fd]
        assert "unexpected events" in ex.make_exclusive(ep.fileno(), fd)
        assert ex.registered(ep.fileno())[fd] == before
    finally:
        ep.close()


def _loop_entry(fd: int) -> tuple[int, int]:
    ep = ex.find_loop_epoll(fd)
    assert ep >= 0
    return ex.registered(ep)[fd]


def test_listener_in_a_gevent_loop_is_exclusive_again_after_each_restart(listener):
    loop = gevent.get_hub().loop
    if loop.backend != "epoll":
        pytest.fail(f"gevent's loop runs on {loop.backend}, not epoll")
    fd = listener.fileno()
    accepted = []

    def on_read():
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            pass

    watcher = loop.io(fd, 1)
    hook = ex.ExclusiveListener(loop, fd)
    try:
        watcher.start(on_read)
        hook()
        gevent.sleep(0.05)
        events, data = _loop_entry(fd)
        assert events & ex.EPOLLEXCLUSIVE and data & 0xFFFFFFFF == fd
        with socket.create_connection(listener.getsockname()):
            deadline = time.monotonic() + 5
            while not accepted and time.monotonic() < deadline:
                gevent.sleep(0.01)
            assert len(accepted) == 1
        # Stopped while a client waits: libev drops the entry; restarted, it
        # adds a plain one, which the hook makes exclusive again.
        ep = ex.find_loop_epoll(fd)
        watcher.stop()
        with socket.create_connection(listener.getsockname()):
            gevent.sleep(0.05)
            assert fd not in ex.registered(ep)
            watcher.start(on_read)
            hook()
            deadline = time.monotonic() + 5
            while len(accepted) < 2 and time.monotonic() < deadline:
                gevent.sleep(0.01)
            assert len(accepted) == 2
        gevent.sleep(0.05)
        assert _loop_entry(fd)[0] & ex.EPOLLEXCLUSIVE
        assert hook.told is False                        # never fell back
    finally:
        watcher.stop()
        for s in accepted:
            s.close()


@pytest.fixture
def crowd():
    """An epoll set watching 3,000 descriptors (about 250 KB of fdinfo, as a
    worker holding 1,500 connections), plus a list to register more in."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4000:
        pytest.skip(f"the descriptor limit ({hard}) is below the 3,000 this test holds")
    if soft != resource.RLIM_INFINITY and soft < 4000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4000, hard) if hard != resource.RLIM_INFINITY else 4000, hard))
    pairs = [socket.socketpair() for _ in range(1500)]
    ep = select.epoll()
    for a, b in pairs:
        ep.register(a.fileno(), select.EPOLLIN)
        ep.register(b.fileno(), select.EPOLLIN)
    yield ep
    ep.close()
    for a, b in pairs:
        a.close()
        b.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_registration_far_into_a_large_epoll_set_is_found(listener, crowd):
    # The kernel lists the entries in its own order, not by descriptor: the
    # listener's line can be anywhere in the text, well past its first 64 KB.
    fd = listener.fileno()
    data = fd | (9 << 32)
    assert ex._ctl_call(crowd.fileno(), ex.EPOLL_CTL_ADD, fd, ex.EPOLLIN, data) == 0
    assert len(ex._fdinfo(crowd.fileno())) > 3 * 65536
    assert len(ex.registered(crowd.fileno())) == 3001
    assert ex.entry(crowd.fileno(), fd) == (ex.EPOLLIN | 0x18, data)
    assert ex.entry(crowd.fileno(), 10 ** 6) is None
    assert ex.make_exclusive(crowd.fileno(), fd) == ""
    assert ex.entry(crowd.fileno(), fd) == (ex.EPOLLIN | ex.EPOLLEXCLUSIVE | 0x18, data)


def test_withdraw_takes_the_listener_out_of_a_large_loop_set(listener, crowd):
    """A worker holding many connections stands by: its listener leaves the
    loop's epoll set (whose fdinfo is far longer than one read) at the next
    turn, so no client's wake-up goes to it."""
    loop = gevent.get_hub().loop
    fd = listener.fileno()
    keep = [socket.socketpair() for _ in range(1500)]
    watchers = [loop.io(a.fileno(), 1) for a, _ in keep] + [loop.io(b.fileno(), 1) for _, b in keep]
    watcher = loop.io(fd, 1)
    hook = ex.ExclusiveListener(loop, fd)
    try:
        for w in watchers:
            w.start(lambda: None)
        watcher.start(lambda: None)
        hook()
        gevent.sleep(0.05)
        ep = ex.find_loop_epoll(fd)
        assert ep >= 0 and len(ex._fdinfo(ep)) > 3 * 65536
        assert ex.entry(ep, fd)[0] & ex.EPOLLEXCLUSIVE
        watcher.stop()
        hook.withdraw(lambda: not watcher.active)
        gevent.sleep(0.05)
        assert ex.entry(ep, fd) is None
        # Back: registered (exclusively) again.
        watcher.start(lambda: None)
        hook()
        gevent.sleep(0.05)
        assert ex.entry(ep, fd)[0] & ex.EPOLLEXCLUSIVE
        # Closing for good: out at once.
        hook.withdraw_now()
        assert ex.entry(ep, fd) is None
    finally:
        watcher.stop()
        for w in watchers:
            w.stop()
        for a, b in keep:
            a.close()
            b.close()
