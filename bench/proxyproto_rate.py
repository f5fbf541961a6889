"""What ``-P`` costs per connection: short connections with and without a PROXY header.

    .venv/bin/python bench/proxyproto_rate.py [--count 2000] [--rounds 3]

One greeter backend (bench/servers.py: greets, drains, closes on EOF, so a
PROXY header is simply read and ignored) on the load core, one gbalance
master per mode on the proxy core, and a client loop on the load core that
opens ``count`` connections one after another (connect, read the greeting,
close).  The modes run interleaved, ``rounds`` times, each on a fresh
master after a warm-up; reported are the median rate and the median proxy
CPU time of the master (all threads, from /proc schedstat) per connection.
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

from lib import LOAD_CPU, GBalance, cpus_available, print_rate_report, start_greeter, stop, stop_all  # noqa: E402
from measure import settle_timewait  # noqa: E402

MODES = {"no -P": [], "-P v1": ["-P", "v1"], "-P v2": ["-P", "v2"]}
WARMUP = 200


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of one process, in ns precision (/proc schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def loop(port: int, count: int) -> float:
    """Open ``count`` short connections through the proxy; return the seconds taken."""
    start = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            if not s.recv(16):
                raise SystemExit("a connection was closed without the greeting")
    return time.perf_counter() - start


def run(count: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    results: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in MODES}
    if cpus_available():
        os.sched_setaffinity(0, {LOAD_CPU})
    greeter, backend = start_greeter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                for mode, args in MODES.items():
                    settle_timewait()
                    with GBalance(Path(tmp), backend, args=args) as proxy:
                        loop(proxy.port, WARMUP)
                        before = cpu_seconds(proxy.pid)
                        took = loop(proxy.port, count)
                        used = cpu_seconds(proxy.pid) - before
                    rates, cpus = results[mode]
                    rates.append(count / took)
                    cpus.append(used / count * 1e6)
    finally:
        stop(greeter)
        stop_all()
    return results


def micro(n: int = 200_000) -> dict[str, float]:
    """Nanoseconds per call of the per-connection work -P adds, on real sockets."""
    import timeit

    from gbalance.proxy.proxyproto import Version, header_maker, send_header

    out: dict[str, float] = {}
    for bind in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as lsock:
            lsock.bind((bind, 0))
            lsock.listen(1)
            client = socket.create_connection(("127.0.0.1", lsock.getsockname()[1]))
            conn, peer = lsock.accept()
            for version in Version:
                make = header_maker(version, lsock)
                where = "wildcard" if bind == "0.0.0.0" else "bound"
                out[f"build {version.value}, {where} listener"] = \
                    min(timeit.repeat(lambda: make(conn, peer), number=n, repeat=3)) / n * 1e9
            header = make(conn, peer)
            client.setblocking(False)
            conn.setblocking(False)

            def one() -> None:
                send_header(conn, header)
                client.recv(4096)
            out["send_header + receiver recv (syscall pair)"] = \
                min(timeit.repeat(one, number=n // 4, repeat=3)) / (n // 4) * 1e9
            client.close()
            conn.close()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if cpus_available():
        os.sched_setaffinity(0, {LOAD_CPU})
    print_rate_report(micro(), run(args.count, args.rounds), args.count, args.rounds, 45, 8)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
