"""The garbage collector and a serving process (gbalance.system.heap).

Per-connection objects must be freed by reference counting (no cycles: a
stream of short connections then never starts a collection), and a serving
process freezes its start-up heap so that later collections skip it.
"""

from __future__ import annotations

import gc
import re
import socket
import struct
import subprocess
import sys

from conftest import ROOT, free_port, inprocess_server
from test_e2e_workers import start_workers


def _short(port: int, reset: bool = False) -> None:
    """One short client connection from inside the hub: send, half-close, read to EOF
    (``reset``: send, then close with a reset instead)."""
    from gevent import socket as gsocket

    try:
        s = gsocket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return
    try:
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.sendall(b"hello\n")
            return
        s.sendall(b"hello\n")
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    except OSError:
        pass
    finally:
        s.close()


def _cycles_left(port: int, rounds: int, **kw) -> list[str]:
    """Run ``rounds`` x 20 short connections with the collector off; the types
    of what a collection then finds unreachable (kept by DEBUG_SAVEALL).
    Nothing at all, not just nothing of the package's classes: a cycle
    through a closure, a bound method or an exception's traceback is made
    of builtin types."""
    import gevent

    for _ in range(20):                        # warm-up: first-use caches are not leaks
        _short(port, **kw)
    gevent.sleep(0.2)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(rounds):
            gevent.joinall([gevent.spawn(_short, port, **kw) for _ in range(20)], timeout=30)
        gevent.sleep(0.3)                      # the proxy closes its sides
        gc.collect()
        found = sorted({type(o).__qualname__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        del gc.garbage[:]
        gc.enable()
    return found


def test_short_connections_leave_no_cycles(tmp_path, backends, monkeypatch):
    """Proxied short connections, ended every usual way (client half-close,
    client reset, a dead first channel failed over), leave nothing of the
    package for the collector: their objects die by reference counting."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    be = backends("", mode="echo")
    dead = free_port()
    port = free_port()
    with inprocess_server(["-f", str(port), be.spec], tmp_path / "s1"):
        assert _cycles_left(port, 10) == []
        assert _cycles_left(port, 10, reset=True) == []
    port = free_port()
    with inprocess_server(["-f", str(port), f"127.0.0.1:{dead}", "!", be.spec], tmp_path / "s2"):
        assert _cycles_left(port, 10) == []


def test_a_cycle_would_be_found(tmp_path, backends, monkeypatch):
    """The check above finds a per-connection cycle when there is one."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    be = backends("", mode="echo")
    port = free_port()
    with inprocess_server(["-f", str(port), be.spec], tmp_path / "s") as (_, server):
        real = server.handle_client

        class Loop:                 # a tiny per-connection cycle, as a careless change might make
            pass

        def handle(*args):
            loop = Loop()
            loop.me = loop
            return real(*args)

        monkeypatch.setattr(server, "handle_client", handle)
        assert "test_a_cycle_would_be_found.<locals>.Loop" in _cycles_left(port, 2)


def test_freeze_startup_moves_the_heap_out_of_collections():
    """freeze_startup() collects, then freezes: the objects alive then are not
    tracked by later collections (a fresh interpreter: the test process's own
    heap stays as it is)."""
    code = ("import gc, sys\n"
            "from gbalance.system.heap import freeze_startup\n"
            "kept = [[i] for i in range(5000)]\n"
            "n = freeze_startup()\n"
            "assert n == gc.get_freeze_count() >= 5000, n\n"
            "tracked = {id(o) for o in gc.get_objects()}\n"
            "assert not any(id(x) in tracked for x in kept)\n"
            "late = [1]\n"
            "assert any(o is late for o in gc.get_objects())\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


def _frozen(err: str, prefix: str = "") -> list[int]:
    return [int(n) for n in re.findall(rf"^balance: {prefix}start-up heap frozen: (\d+) objects$", err, re.M)]


def test_serving_master_freezes_its_startup_heap(balance, backends):
    """The default mode (and -w 1: the same process serves): once it serves,
    the master has frozen its start-up heap (-d says how many objects)."""
    be = backends("OK")
    for extra in ([], ["-w", "1"]):
        port = free_port()
        proc = balance.start("-d", *extra, str(port), be.spec, port=port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            assert c.recv(10) == b"OK\n"
        _, err = proc.stop()
        counts = _frozen(err)
        assert len(counts) == 1 and counts[0] > 10_000, err     # gevent and the package at least


def test_each_worker_freezes_its_startup_heap(balance, backends):
    """-w 2: each worker freezes its own start-up heap as it starts to serve
    (before its loop runs, so before it can handle the stop), and the
    supervising master its own."""
    be = backends("OK")
    port = free_port()
    proc, _ = start_workers(balance, 2, "-d", str(port), be.spec, port=port)    # both accept
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.recv(10) == b"OK\n"
    _, err = proc.stop()
    for i in (0, 1):
        counts = _frozen(err, f"worker {i}: ")
        assert len(counts) == 1 and counts[0] > 10_000, err
    assert len(_frozen(err)) == 1, err
