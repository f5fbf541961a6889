#!/usr/bin/env python3
"""Per short connection, by mode: the serving processes' instructions, and the collector's runs.

Instructions (default): ``balance -f`` runs under ``valgrind
--tool=callgrind --trace-children=yes`` in each mode (``now``: no -w,
``w1``: -w 1, ``w2``: -w 2, whose two workers are summed), with a one-shot
backend (read a request, write 100 bytes, close) and a client keeping
``--conc`` connections in flight.  After ``--warm`` connections the serving
processes' counters are zeroed (callgrind_control -z), ``--n`` connections
run, the counters are dumped: user-space instructions per connection, which
other load on the machine does not change.  Modes are interleaved per round.

``--gc``: no valgrind; the proxy (no -w) runs with a gc.callbacks hook and
reports collections per generation and the collector's CPU time per
connection, over ``--n`` short connections and over ``--n`` held ones, with
and without the start-up freeze (gbalance.system.heap), counted from when it serves.

Usage: bench/modecost.py [--n N] [--conc C] [--rounds R] [--modes now,w1,w2] [--gc]
Not part of make bench (valgrind takes minutes); prints its figures.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv/bin/python")
REPLY = b"HTTP/1.0 200 OK\r\nContent-Length: 62\r\n\r\n" + b"x" * 62


def backend() -> int:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)

    def serve() -> None:
        sel = selectors.DefaultSelector()
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is ls:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        continue
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                else:
                    c = key.fileobj
                    try:
                        data = c.recv(4096)
                    except BlockingIOError:
                        continue
                    sel.unregister(c)
                    if data:
                        try:
                            c.send(REPLY)
                        except OSError:
                            pass
                    c.close()
    threading.Thread(target=serve, daemon=True).start()
    return ls.getsockname()[1]


def client(port: int, n: int, conc: int) -> None:
    """n connections, conc in flight: connect, send a request, read to EOF."""
    sel = selectors.DefaultSelector()
    started = done = 0
    req = b"GET / HTTP/1.0\r\n\r\n"

    def launch() -> None:
        nonlocal started
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.sendall(req)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, [0])
        started += 1

    while started < min(conc, n):
        launch()
    while done < n:
        for key, _ in sel.select(30):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                key.data[0] += len(data)
                continue
            if key.data[0] != len(REPLY):
                raise SystemExit(f"short reply {key.data[0]}")
            sel.unregister(s)
            s.close()
            done += 1
            if started < n:
                launch()


NOFREEZE = ("import sys\nimport gbalance.system.heap as heap\nheap.freeze_startup = lambda: 0\n"
            "from gbalance.cli import main\nsys.argv[0] = 'balance'\nsys.exit(main())\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listen(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("proxy did not listen")


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def one(mode: str, n: int, conc: int, warm: int, bport: int, out: Path, extra: list[str]) -> dict:
    port = free_port()
    state = tempfile.mkdtemp(prefix="leanstate")
    args = {"w1": ["-w", "1"], "w2": ["-w", "2"]}.get(mode, [])
    # nf: no -w with the start-up freeze turned off (what it was before gbalance.system.heap)
    run = ["-c", NOFREEZE] if mode == "nf" else ["-m", "gbalance"]
    env = dict(os.environ, BALANCE_STATE_DIR=state)
    tag = f"{mode}-{time.monotonic_ns()}"
    cmd = ["valgrind", "--tool=callgrind", "--trace-children=yes", *extra,
           f"--callgrind-out-file={out}/cg.{tag}.%p", PY, *run, "-f", *args,
           str(port), f"127.0.0.1:{bport}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listen(port)
        client(port, warm, conc)
        # with -w 1 the master serves itself; with -w N its workers do
        serving = children(proc.pid) or [proc.pid]
        for pid in serving:
            subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        client(port, n, conc)
        ir = 0
        dumps = []
        for pid in serving:
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
            files = sorted(glob.glob(f"{out}/cg.{tag}.{pid}.*"))
            if not files:
                raise SystemExit("no dump")
            dumps.append(files[-1])
            for line in Path(files[-1]).read_text().splitlines():
                m = re.match(r"totals: (\d+)", line)
                if m:
                    ir += int(m.group(1))
        return {"mode": mode, "ir_per_conn": ir / n, "dump": " ".join(dumps)}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: Run in the proxy's interpreter (``python -c``): counts the collector's
#: runs per generation and their CPU time, written as JSON at exit.
GC_WRAPPER = """
import atexit, gc, json, os, sys, time
stats = {"collections": [0, 0, 0], "collected": 0, "cpu_ns": 0}
began = [0]
def watch(phase, info):
    if phase == "start":
        began[0] = time.thread_time_ns()
    else:
        stats["collections"][info["generation"]] += 1
        stats["collected"] += info["collected"]
        stats["cpu_ns"] += time.thread_time_ns() - began[0]
gc.callbacks.append(watch)
def zero(*_):
    stats.update(collections=[0, 0, 0], collected=0, cpu_ns=0)
import signal
signal.signal(signal.SIGUSR2, zero)
def report():
    stats["frozen"] = gc.get_freeze_count()
    stats["tracked"] = len(gc.get_objects())
    with open(os.environ["MODECOST_GC_OUT"], "w") as f:
        json.dump(stats, f)
atexit.register(report)
if os.environ.get("MODECOST_NOFREEZE"):
    import gbalance.system.heap as heap
    heap.freeze_startup = lambda: 0
sys.argv[0] = "balance"
from gbalance.cli import main
sys.exit(main())
"""


def hold(port: int, n: int) -> list[socket.socket]:
    """Open n client connections (each sends a byte) and keep them."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"x")
        held.append(s)
    return held


def gcrun(n: int, conc: int, bport: int, held: bool, freeze: bool) -> dict:
    """A native run (no -w) under GC_WRAPPER: the collector's runs over n short
    connections (or n held ones), counted from when it serves (SIGUSR2 zeroes)."""
    import json
    port = free_port()
    state = tempfile.mkdtemp(prefix="modecost")
    path = f"{state}/gc.json"
    env = dict(os.environ, BALANCE_STATE_DIR=state, MODECOST_GC_OUT=path)
    if not freeze:
        env["MODECOST_NOFREEZE"] = "1"
    proc = subprocess.Popen([PY, "-c", GC_WRAPPER, "-f", str(port), f"127.0.0.1:{bport}"], env=env,
                            stderr=subprocess.DEVNULL)
    kept = []
    try:
        wait_listen(port)
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR2)
        time.sleep(1.5)                 # gevent runs Python signal handlers within a second
        if held:
            kept = hold(port, n)
            time.sleep(1.0)
        else:
            client(port, n, conc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        for s in kept:
            s.close()
    with open(path) as f:
        b = json.load(f)
    return {"connections": n, "held": held, "freeze": freeze, "frozen": b["frozen"], "tracked": b["tracked"],
            "collections": b["collections"], "cpu_us": b["cpu_ns"] / 1e3}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--conc", type=int, default=32)
    ap.add_argument("--warm", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="now,w1")
    ap.add_argument("--out", default="/tmp/modecost")
    ap.add_argument("--gc", action="store_true", help="count collections instead (native, no -w)")
    args, extra = ap.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bport = backend()
    if args.gc:
        for held in (False, True):
            for freeze in (True, False):
                r = gcrun(args.n, args.conc, bport, held, freeze)
                g = r["collections"]
                print(f"{'held' if held else 'short'} x{args.n} freeze={freeze}: collections gen0/1/2 "
                      f"{g[0]}/{g[1]}/{g[2]} ({sum(g) / args.n:.4f} per connection), "
                      f"{r['cpu_us'] / args.n:.3f} us CPU in the collector per connection; "
                      f"{r['tracked']} objects tracked at exit, {r['frozen']} frozen", flush=True)
        return 0
    modes = args.modes.split(",")
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            res = one(mode, args.n, args.conc, args.warm, bport, out, extra)
            print(f"round {r + 1} {mode:4} {res['ir_per_conn']:,.0f} Ir/conn  {res['dump']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
