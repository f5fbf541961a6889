"""What ``-A`` costs per connection: short connections with and without reading a PROXY header.

    .venv/bin/python bench/frontdoor_rate.py [--count 2000] [--rounds 3]

As bench/proxyproto_rate.py: one greeter backend on the load core, one
gbalance master per mode on the proxy core, a client loop on the load core
opening ``count`` connections one after another (connect, send the header a
front tier would send, read the greeting, close).  Without ``-A`` the client
sends nothing.  Modes run interleaved, ``rounds`` times, each on a fresh
master after a warm-up; reported are the median rate and the median proxy
CPU time (all threads, /proc schedstat) per connection, and the parser's
own cost per header.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import LOAD_CPU, BenchError, GBalance, cpus_available, print_rate_report, start_greeter, stop, stop_all  # noqa: E402
from measure import settle_timewait  # noqa: E402
from proxyproto_rate import cpu_seconds  # noqa: E402

from gbalance.proxy.proxyproto import parse_header, v1_header, v2_header  # noqa: E402

V1 = v1_header("192.0.2.10", "127.0.0.1", 40000, 80)
V2 = v2_header("192.0.2.10", "127.0.0.1", 40000, 80)
MODES = {   # name: (balance options, what the client sends first)
    "no -A": ([], b""),
    "-A any, v1": (["-A", "any"], V1),
    "-A any, v2": (["-A", "any"], V2),
    "-A nets, v2": (["-A", "127.0.0.0/8,10.0.0.0/8"], V2),
}
WARMUP = 200


def loop(port: int, count: int, first: bytes) -> float:
    start = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            if first:
                s.sendall(first)
            if not s.recv(16):
                raise SystemExit("a connection was closed without the greeting")
    return time.perf_counter() - start


def one_run(tmp: Path, backend: int, args: list[str], first: bytes, count: int) -> tuple[float, float]:
    """(seconds, proxy CPU seconds) for ``count`` connections on a fresh master;
    a start that lost its port to another process is tried again."""
    for attempt in range(3):
        try:
            with GBalance(tmp, backend, args=args) as proxy:
                loop(proxy.port, WARMUP, first)
                before = cpu_seconds(proxy.pid)
                took = loop(proxy.port, count, first)
                return took, cpu_seconds(proxy.pid) - before
        except BenchError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def run(count: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    results: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in MODES}
    greeter, backend = start_greeter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                for mode, (args, first) in MODES.items():
                    settle_timewait(max_wait=5.0)   # bounded: a shared machine may never settle
                    took, used = one_run(Path(tmp), backend, args, first, count)
                    rates, cpus = results[mode]
                    rates.append(count / took)
                    cpus.append(used / count * 1e6)
    finally:
        stop(greeter)
        stop_all()
    return results


def micro(n: int = 200_000, conns: int = 2000) -> dict[str, float]:
    """Nanoseconds per header parsed, and per connection through the whole
    reader (socket object, peek, parse, take, hand on) with the header
    already queued, as a front tier's usually is at accept."""
    import timeit

    from gevent import get_hub

    from gbalance.proxy.frontdoor import FrontDoor, parse_frontdoor
    from gbalance.log import Log

    out = {}
    for name, header in (("parse v1", V1 + b"GET /"), ("parse v2", V2 + b"GET /")):
        out[name] = min(timeit.repeat(lambda: parse_header(header), number=n, repeat=3)) / n * 1e9
    handed = []
    for name, header, spec in (("reader v1", V1, "any"), ("reader v2", V2, "any"),
                               ("reader v2, nets", V2, "127.0.0.0/8,10.0.0.0/8")):
        door = FrontDoor(get_hub().loop, socket.AF_INET, parse_frontdoor(spec), Log(foreground=True))
        accept = door.wrap(lambda fd, addr: handed.append(fd))
        best = float("inf")
        for _ in range(3):
            with socket.create_server(("127.0.0.1", 0), backlog=conns) as lsock:
                port = lsock.getsockname()[1]
                clients, accepted = [], []
                for _ in range(conns):
                    c = socket.create_connection(("127.0.0.1", port))
                    c.sendall(header)
                    clients.append(c)
                    s, addr = lsock.accept()
                    accepted.append((s.detach(), addr))
                t0 = time.perf_counter()
                for fd, addr in accepted:
                    accept(fd, addr)
                took = time.perf_counter() - t0
                best = min(best, took / conns * 1e9)
                assert len(handed) == conns, "a connection was not handed on"
                for fd in handed:
                    os.close(fd)
                handed.clear()
                for c in clients:
                    c.close()
        out[name] = best
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if cpus_available():
        os.sched_setaffinity(0, {LOAD_CPU})
    print_rate_report(micro(), run(args.count, args.rounds), args.count, args.rounds, 16, 18)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
