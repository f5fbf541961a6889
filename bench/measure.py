"""The three throughput figures: connection rate, bulk throughput, idle memory.

Each function takes a started proxy (or the direct "proxy") and returns one
number, or raises :class:`BenchError` with a one-line reason.
"""

from __future__ import annotations

import re
import socket
import time

from lib import BenchError, Proxy, iperf3_stream, pss_kb, wrk

WRK_CONNECTIONS = 50
IDLE_CONNECTIONS = 1000
# Every short connection leaves a TIME_WAIT socket for 60 s; past about
# 100,000 of them the kernel's port search slows every connect (a proxy
# pays twice: two legs per request), so each run waits for them to drain.
TIMEWAIT_SETTLE = 10_000
TIMEWAIT_MAX_WAIT = 65.0


def timewait_count() -> int:
    """Sockets in TIME_WAIT, from /proc/net/sockstat (IPv4 and IPv6)."""
    total = 0
    for name in ("/proc/net/sockstat", "/proc/net/sockstat6"):
        try:
            with open(name) as f:
                m = re.search(r"\btw (\d+)", f.read())
        except OSError:
            continue
        if m:
            total += int(m.group(1))
    return total


def settle_timewait(limit: int = TIMEWAIT_SETTLE, max_wait: float = TIMEWAIT_MAX_WAIT) -> None:
    """Wait (bounded) until earlier runs' TIME_WAIT sockets have mostly expired."""
    deadline = time.monotonic() + max_wait
    while timewait_count() > limit and time.monotonic() < deadline:
        time.sleep(0.5)


def conn_rate(proxy: Proxy, seconds: float, warmup: float = 1.0) -> float:
    """Requests (= connections) per second with ``Connection: close``.

    A short warm-up run first, so one-time costs (imports, first buffers)
    are not part of the figure.
    """
    url = f"http://127.0.0.1:{proxy.port}/100b"
    settle_timewait()
    if warmup > 0:
        _wrk(url, warmup)
    return _wrk(url, seconds)


def _wrk(url: str, seconds: float) -> float:
    return wrk_run(url, seconds)[0]


def wrk_run(url: str, seconds: float) -> tuple[float, int]:
    """One wrk run with ``Connection: close``: (requests per second, requests completed)."""
    return wrk(url, seconds, WRK_CONNECTIONS)


def bulk_gbits(proxy: Proxy, seconds: float) -> float:
    """iperf3 single-stream throughput (client to server), Gbit/s."""
    return iperf3_stream(proxy.port, seconds)[0]


def idle_kb_per_conn(proxy: Proxy, count: int = IDLE_CONNECTIONS) -> float:
    """Extra PSS of the proxy's process tree per idle proxied connection, kB.

    Each connection is counted once the backend's greeting has come back
    through the proxy, so both legs exist.  A few connections are made and
    closed first, so lazily created state is in the "before" figure.
    """
    if proxy.pid is None:
        raise BenchError("no proxy process")
    for _ in range(20):
        s = _greeted(proxy.port)
        s.close()
    time.sleep(0.3)
    before = pss_kb(proxy.pid)
    held = []
    try:
        for _ in range(count):
            held.append(_greeted(proxy.port))
        time.sleep(0.5)
        with_conns = pss_kb(proxy.pid)
    finally:
        for s in held:
            s.close()
    return (with_conns - before) / count


def _greeted(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        if not s.recv(16):
            raise BenchError("the proxy closed an idle connection at once")
    except (OSError, BenchError):
        s.close()
        raise
    return s
