#!/usr/bin/env python3
"""System calls and wake-ups per short connection, gbalance against HAProxy.

Under each harness's load shape (``wrk -t1 -cN -H 'Connection: close'``
fetching a 100-byte file from nginx: N = 32 as in conncost.py, N = 50 as in
workers.py) the kernel's own syscall tracepoints are counted for the
proxy's process tree with ``perf stat`` (in-kernel counters, so the proxy
runs at nearly its normal speed and batches as it would unobserved; strace
would slow it down and change how many connections each wake-up finds).
Reported per connection: every system call, the main ones by name, and the
epoll waits (wake-ups).  The CPU per connection (utime+stime from /proc) of
the same run is reported beside them.

The contenders of workers.py (``gbalance-w2``, ``haproxy-t2``...: pinned as
there, -w 1 to CPU 0, -w 2 to CPUs 0-1) may be named too; ``failed_accept4``
counts the accept4 calls that found nothing (EAGAIN: another worker took the
connection, or the queue was empty).

Usage: bench/syscalls.py [--seconds S] [--conns 32,50] [--who gbalance,gbalance-w1,haproxy]
Writes bench/results/syscalls.json (or --json PATH) and prints a line per run.
Needs perf with tracepoint access; says so and exits 2 when it has none.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import subprocess
import sys
import time

from lib import LOAD_CPU, ROOT, BenchError, Workdir, pin, process_tree, start_nginx, stop, stop_all
from conncost import make as conncost_make
from measure import settle_timewait
from workers import CONFIGS as WORKER_CONFIGS, make as workers_make, tree_cpu_seconds

#: The system calls named in the report (the rest are in "other").
NAMES = ("accept4", "accept", "socket", "connect", "getsockname", "getpeername", "getsockopt", "setsockopt",
         "fcntl", "ioctl", "epoll_wait", "epoll_pwait", "epoll_ctl", "poll", "ppoll", "read", "recvfrom",
         "write", "sendto", "shutdown", "close", "splice", "pipe2", "clock_gettime", "gettimeofday")


def perf_works() -> bool:
    try:
        res = subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0 and "raw_syscalls:sys_enter" in res.stderr and "<not" not in res.stderr


def wrk(url: str, seconds: float, conns: int) -> int:
    cmd = pin(LOAD_CPU) + ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "-H", "Connection: close", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise BenchError(f"wrk printed no count: {out.strip()[-200:]!r}")
    return int(m.group(1))


def counted(pids: list[int], url: str, seconds: float, conns: int) -> tuple[dict[str, int], int]:
    """Syscall counts of ``pids`` over one wrk run, and the requests it completed."""
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{n}" for n in NAMES]
    events = [e for e in events if e == "raw_syscalls:sys_enter" or _exists(e)]
    cmd = ["perf", "stat", "-x,", "--no-big-num", "-p", ",".join(map(str, pids))]
    for e in events:
        cmd += ["-e", e]
    if _exists("syscalls:sys_exit_accept4"):
        cmd += ["-e", "syscalls:sys_exit_accept4", "--filter", f"ret == -{errno.EAGAIN}"]
    perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)                         # perf attached
    try:
        requests = wrk(url, seconds, conns)
    finally:
        perf.send_signal(2)                 # SIGINT: print the counts and exit
        _, err = perf.communicate(timeout=30)
    counts: dict[str, int] = {}
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].isdigit():
            event = parts[2].split(":")[-1]
            name = "failed_accept4" if event == "sys_exit_accept4" else event.replace("sys_enter_", "")
            counts[name.replace("sys_enter", "all")] = int(parts[0])
    return counts, requests


def _exists(event: str) -> bool:
    return bool(os.path.exists("/sys/kernel/tracing/events/" + event.replace(":", "/")))


def make(name: str, work, nginx: int):
    if name in WORKER_CONFIGS:
        return workers_make(name, work.path, nginx)
    return conncost_make(name, work, nginx)


def one(name: str, work, nginx: int, seconds: float, conns: int) -> dict:
    with make(name, work, nginx) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/100b"
        settle_timewait()
        wrk(url, 1.0, conns)                # warm-up
        pids = process_tree(proxy.pid)
        cpu0 = tree_cpu_seconds(proxy.pid)
        counts, requests = counted(pids, url, seconds, conns)
        cpu = tree_cpu_seconds(proxy.pid) - cpu0
    per = {k: round(v / max(1, requests), 3) for k, v in counts.items() if v or k == "failed_accept4"}
    waits = per.get("epoll_wait", 0) + per.get("epoll_pwait", 0)
    return {"requests": requests, "rate": requests / seconds, "cpu_us_per_conn": 1e6 * cpu / max(1, requests),
            "syscalls_per_conn": per, "wakeups_per_conn": waits,
            "conns_per_wakeup": round(1 / waits, 2) if waits else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", default="32,50")
    ap.add_argument("--who", default="gbalance,gbalance-w1,haproxy")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not perf_works():
        print("perf cannot count syscall tracepoints here", file=sys.stderr)
        return 2
    out: dict = {}
    work = Workdir()
    try:
        proc, nginx = start_nginx(work.path)
        for conns in [int(c) for c in args.conns.split(",")]:
            for name in args.who.split(","):
                res = one(name, work, nginx, args.seconds, conns)
                out[f"{name} c{conns}"] = res
                per = res["syscalls_per_conn"]
                main_ = " ".join(f"{k} {v:g}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if k != "all")
                print(f"{name:12} c{conns}: {res['rate']:8,.0f} conn/s {res['cpu_us_per_conn']:6.1f} µs CPU/conn "
                      f"{per.get('all', 0):5.2f} syscalls/conn, {res['conns_per_wakeup']} conns/wake-up | {main_}",
                      flush=True)
        stop(proc)
    except BenchError as exc:
        print(f"syscalls: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all()
        work.close()
    path = args.json or str(ROOT / "bench" / "results" / "syscalls.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
