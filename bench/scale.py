"""Issue 21's scale rows: idle proxied connections held at 1k, ~10k and 100k.

For each row, N idle proxied connections are opened through the proxy and
held (clients in several holder processes, each from its own loopback
source addresses 127.0.<h>.x, to several greeter backends on their own
ports, so no side runs out of ephemeral ports or of its 20,000 fds). Then:

* **KB/conn**: extra PSS of the proxy's process tree per held connection;
* **CPU µs per opened conn**: utime+stime of the proxy's tree while the N
  were opened, divided by N;
* **new p99**: 300 connections opened one after another (connect until the
  backend's greeting came through) while the N are held;
* **storm**: 20,000 non-blocking connects at once on top of the N held,
  each waiting for its greeting: how many were refused or lost (no
  greeting within 60 s), their p99, and the peak of the listener's accept
  queue (``ss``, Recv-Q) sampled meanwhile;
* **show**: ``balance -c show`` asked while the N are held must count
  exactly N open connections (gbalance only).

gbalance runs ``-w 1`` up to what one process holds (and HAProxy beside it
where one process can follow) and ``-w 16`` for 10,000 and 100,000.  The
bench raises ``net.core.somaxconn`` for the run (put back afterwards): the
product only asks for the largest backlog, the kernel cuts it to the sysctl.
``python3 scale.py hold|storm ...`` is the client side, run by the bench.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
GREETING = b"hello\n"
STORM = 20000
PROBES = 300
STORM_DEADLINE = 60.0       # s: a storm connection not greeted by then counts as lost
PER_HOLDER = 9000            # client sockets per holder process (fd limit 20,000)
GREETERS = 8                 # backend processes (and ports)
SOMAXCONN = 65535
# (label, proxy config, held): gbalance -w 1 up to one process's reach.
ROWS = (("1k", "gbalance-w1", 1000), ("1k", "haproxy", 1000),
        ("4.75k", "gbalance-w1", 4750), ("4.75k", "haproxy", 4750),
        ("9k", "gbalance-w1", 9000),
        ("10k", "gbalance-w16", 10000), ("100k", "gbalance-w16", 100000))


def _raise_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- client side (separate processes) --------------------------------------------

def hold(port: int, count: int, net: int) -> int:
    """Open ``count`` greeted connections from 127.<net>.x.y, say so, hold until stdin closes."""
    _raise_fds()
    held = []
    for i in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((f"127.{net}.{1 + (i // 250) % 250}.{1 + i % 250}", 0))
        s.settimeout(15)
        s.connect(("127.0.0.1", port))
        if s.recv(16) != GREETING:
            print("lost", flush=True)
            return 1
        held.append(s)
    print("held", flush=True)
    sys.stdin.read()
    return 0


def storm(port: int, count: int, net: int) -> int:
    """``count`` non-blocking connects at once; print JSON {latencies, refused, lost}."""
    _raise_fds()
    sel = selectors.DefaultSelector()
    start = {}
    t0 = time.monotonic()
    for i in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((f"127.{net}.{1 + (i // 250) % 250}.{1 + i % 250}", 0))
        start[s] = time.monotonic()
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_READ)
    lat, refused = [], 0
    deadline = t0 + STORM_DEADLINE
    while start and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            try:
                data = s.recv(16)
            except BlockingIOError:
                continue
            except OSError:
                data = None
            if data == GREETING:
                lat.append(time.monotonic() - start[s])
            else:
                refused += 1
            sel.unregister(s)
            del start[s]
            s.close()
    print(json.dumps({"lat": lat, "refused": refused, "lost": len(start)}), flush=True)
    return 0


# -- the bench side ---------------------------------------------------------------

def _sysctl(name: str, value: int | None = None) -> int | None:
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        if value is not None:
            with open(path, "w") as f:
                f.write(str(value))
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def _greeted(port: int) -> float:
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        if s.recv(16) != GREETING:
            raise OSError("no greeting")
    return time.monotonic() - t


def _queue_peak(port: int, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        r = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
        for line in r.stdout.splitlines():
            try:
                out.append(int(line.split()[1]))
            except (IndexError, ValueError):
                pass
        time.sleep(0.02)


def _show_open(port: int, state: Path) -> int | None:
    """Open connections in ``balance -c show`` (the sum of the channels' current column)."""
    from lib import PYTHON
    env = dict(os.environ, BALANCE_STATE_DIR=str(state))
    r = subprocess.run([PYTHON, "-m", "gbalance", "-c", "show", str(port)], capture_output=True, text=True,
                       timeout=30, env=env)
    if r.returncode != 0:
        return None
    total = 0
    for line in r.stdout.splitlines():
        m = re.match(r"\s*\d+\s+\S+\s+\d+\s+\S+\s+\S+\s+\d+\s+(\d+)\s", line)
        if m:
            total += int(m.group(1))
    return total


def low_port() -> int:
    """A free port below the ephemeral range (wildcard-bindable).

    After a storm tens of thousands of ephemeral ports sit in TIME_WAIT on
    127.x addresses; a proxy given one of them as its port (balance binds
    the wildcard address) fails with "Address already in use".
    """
    import random
    low = 20000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = min(low, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return port
            except OSError:
                continue
    raise OSError("no free port below the ephemeral range")


def _start_proxy(name: str, work: Path, greeters: list[int]):
    from lib import BenchError, GBalance, HAProxy
    from workers import Workers
    if name == "haproxy":
        proxy = HAProxy(work, greeters[0])
    else:
        n = int(name.rsplit("w", 1)[1])
        proxy = Workers(work, greeters[0], n, {0}) if n > 1 else GBalance(work, greeters[0])
        proxy.channels = [f"127.0.0.1:{p}" for p in greeters]
        if n == 1:
            proxy.args = ["-w", "1"]
    for attempt in range(3):    # a free port may be taken by a client's ephemeral port meanwhile
        try:
            proxy.start()
            return proxy
        except BenchError:
            if attempt == 2:
                raise
    return proxy


def one_row(name: str, held_n: int, work: Path, greeters: list[int], log) -> dict:
    from lib import LOAD_CPU, PROCS, PYTHON, pin, stop
    from workers import tree_cpu_seconds
    from lib import pss_kb
    row: dict = {"proxy": name, "held": held_n}
    proxy = _start_proxy(name, work, greeters)
    holders: list = []
    try:
        for _ in range(20):
            _greeted(proxy.port)
        time.sleep(0.3)
        mem0, cpu0 = pss_kb(proxy.pid), tree_cpu_seconds(proxy.pid)
        t0 = time.monotonic()
        left, net = held_n, 10
        while left > 0:
            k = min(PER_HOLDER, left)
            holders.append(subprocess.Popen([*pin(LOAD_CPU), PYTHON, __file__, "hold", str(proxy.port), str(k),
                                             str(net)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            PROCS[holders[-1].pid] = holders[-1]      # killed by stop_all() if the bench dies
            left -= k
            net += 1
        for h in holders:
            if h.stdout.readline().strip() != "held":
                raise OSError("a holder lost a connection")
        row["open_s"] = round(time.monotonic() - t0, 1)
        row["cpu_us_per_open"] = round((tree_cpu_seconds(proxy.pid) - cpu0) / held_n * 1e6, 1)
        time.sleep(0.5)
        row["kb_per_conn"] = round((pss_kb(proxy.pid) - mem0) / held_n, 2)
        if name != "haproxy":
            state = next(work.glob(f"state-{proxy.port}"))
            row["show_open"] = _show_open(proxy.port, state)
        row["new_p99_ms"] = round(_p99([_greeted(proxy.port) for _ in range(PROBES)]) * 1000, 2)
        stop_q, peaks = threading.Event(), []
        sampler = threading.Thread(target=_queue_peak, args=(proxy.port, stop_q, peaks), daemon=True)
        sampler.start()
        try:
            row.update(_storm(proxy.port, net))
        finally:
            stop_q.set()
            sampler.join(5)
        row["accept_queue_peak"] = max(peaks, default=0)
        if name != "haproxy":
            row["show_open_after"] = _show_open(proxy.port, state)
        log(f"scale: {name} held {held_n}: {row}")
    finally:
        for h in holders:
            try:
                h.stdin.close()
            except OSError:
                pass
            try:
                h.wait(20)
            except subprocess.TimeoutExpired:
                h.kill()
                h.wait()
            PROCS.pop(h.pid, None)
        stop(proxy.proc)
    return row


def _storm(port: int, net: int) -> dict:
    """The 20,000-connect storm in two processes on the load core: refused, lost, p99 ms."""
    from lib import LOAD_CPU, PROCS, PYTHON, pin, stop
    storms = [subprocess.Popen([*pin(LOAD_CPU), PYTHON, __file__, "storm", str(port), str(STORM // 2),
                                str(net + i)], stdout=subprocess.PIPE, text=True) for i in range(2)]
    for sp in storms:
        PROCS[sp.pid] = sp
    lat, refused, lost = [], 0, 0
    try:
        for sp in storms:
            out = json.loads(sp.stdout.read() or "{}")
            sp.wait(STORM_DEADLINE + 30)
            lat += out.get("lat", [])
            refused += out.get("refused", 0)
            lost += out.get("lost", STORM // 2)
    finally:
        for sp in storms:
            stop(sp)
    p99 = _p99(lat)
    return {"storm_refused": refused, "storm_lost": lost, "storm_p99_ms": round(p99 * 1000, 1) if p99 else None}


def direct_storm(port: int) -> dict:
    """The storm straight to one greeter: what the harness itself costs (no proxy)."""
    try:
        return _storm(port, 200)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}


def run(work, log, rows=ROWS) -> dict:
    """Every row, on fresh proxies; somaxconn raised for the run and put back."""
    from lib import LOAD_CPU, PYTHON, BenchError, start, stop, wait_listening
    old = _sysctl("net.core.somaxconn")
    old_syn = _sysctl("net.ipv4.tcp_max_syn_backlog")
    res: dict = {"somaxconn": _sysctl("net.core.somaxconn", SOMAXCONN), "rows": []}
    _sysctl("net.ipv4.tcp_max_syn_backlog", SOMAXCONN)
    greeters = []
    import lib
    saved_free_port, lib.free_port = lib.free_port, low_port   # for the proxies' own start()
    try:
        for _ in range(GREETERS):
            port = low_port()
            greeters.append((start([PYTHON, str(BENCH / "servers.py"), "greeter", str(port)], LOAD_CPU), port))
        for proc, port in greeters:
            wait_listening(port, proc)
        res["direct_storm"] = direct_storm(greeters[0][1])
        log(f"scale: direct storm to a greeter: {res['direct_storm']}")
        for label, name, n in rows:
            try:
                row = one_row(name, n, work.path, [p for _, p in greeters], log)
            except (OSError, ValueError, subprocess.SubprocessError, BenchError) as exc:
                row = {"proxy": name, "held": n, "error": str(exc)}
                log(f"scale: {name} held {n}: ERROR {exc}")
            row["label"] = label
            res["rows"].append(row)
    finally:
        lib.free_port = saved_free_port
        for proc, _ in greeters:
            stop(proc)
        if old is not None:
            _sysctl("net.core.somaxconn", old)
        if old_syn is not None:
            _sysctl("net.ipv4.tcp_max_syn_backlog", old_syn)
    return res


def report(res: dict) -> None:
    print(f"\nscale (idle proxied connections held; somaxconn {res.get('somaxconn')} for the run)")
    d = res.get("direct_storm", {})
    if d:
        print(f"direct storm to one greeter (no proxy, the harness's own cost): refused/lost "
              f"{d.get('storm_refused')}/{d.get('storm_lost')}, p99 {d.get('storm_p99_ms')} ms")
    print(f"{'held':>7} {'proxy':<14} {'KB/conn':>8} {'CPU µs/open':>11} {'new p99 ms':>10} "
          f"{'storm refused/lost':>18} {'storm p99 ms':>12} {'queue peak':>10} {'-c show':>9}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['held']:>7} {r['proxy']:<14} ERROR {r['error']}")
            continue
        show = r.get("show_open", "-")
        print(f"{r['held']:>7} {r['proxy']:<14} {r['kb_per_conn']:>8} {r['cpu_us_per_open']:>11} "
              f"{r['new_p99_ms']:>10} {str(r['storm_refused']) + '/' + str(r['storm_lost']):>18} "
              f"{str(r['storm_p99_ms']):>12} {r['accept_queue_peak']:>10} {str(show):>9}")


if __name__ == "__main__":
    mode, port_s, count_s, net_s = sys.argv[1:5]
    sys.exit((hold if mode == "hold" else storm)(int(port_s), int(count_s), int(net_s)))
