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

Beside them, TCP segments per connection: the deltas of the kernel's
TcpOutSegs and TcpInSegs counters (/proc/net/snmp) over the same run divided
by the requests.  These count the whole network namespace, so a direct
connection (no proxy, 10 segments a request when nothing else talks on the
machine) is measured beside the proxies as the reference, and each run
records the CPU other processes used meanwhile (lib.Disturbance).  As a
part of make bench it runs in a network namespace of its own when it can
(``unshare -n``): there the counters see its own traffic only.

As the ``syscalls`` part of ``make bench`` (bench/run.py) it runs once per
contender (direct, gbalance, gbalance -w 1, HAProxy) with 32 connections.
Run alone it also takes the contenders of workers.py (``gbalance-w2``,
``haproxy-t2``...: pinned as there, -w 1 to CPU 0, -w 2 to CPUs 0-1).
``failed_accept4`` counts the accept4 calls that found nothing (EAGAIN:
another worker took the connection, or the queue was empty).

Usage: bench/syscalls.py [--seconds S] [--conns 32,50] [--who direct,gbalance,gbalance-w1,haproxy]
Writes bench/results/syscalls.json (or --json PATH) and prints a line per run.
Without perf tracepoint access it says so and counts segments only.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import (PROCS, PYTHON, ROOT, BenchError, Disturbance, Workdir, process_tree, raise_fd_limit, start_nginx,
                 stop, stop_all, tree_cpu_seconds)
from lib import _START_CPUS as START_CPUS
from lib import wrk as _lib_wrk
from conncost import make as conncost_make
from measure import settle_timewait
from workers import CONFIGS as WORKER_CONFIGS, make as workers_make

#: The part of make bench: contenders, connections, seconds per run.
WHO = ("direct", "gbalance", "gbalance-w1", "haproxy")
CONNS = 32
#: Counts do not depend on how many TIME_WAIT sockets are left from earlier
#: runs, so the part waits less for them than the timed parts do.
SETTLE_LIMIT, SETTLE_MAX_WAIT = 40_000, 20.0

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
    """Requests one ``wrk -t1 -c<conns>`` run with ``Connection: close`` completed."""
    return _lib_wrk(url, seconds, conns)[1]


def tcp_segments() -> tuple[int, int]:
    """(OutSegs, InSegs) of this network namespace, from /proc/net/snmp."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    counters = dict(zip(rows[0][1:], rows[1][1:]))
    return int(counters["OutSegs"]), int(counters["InSegs"])


def counted(pids: list[int], url: str, seconds: float, conns: int,
            segs: list | None = None) -> tuple[dict[str, int], int]:
    """Syscall counts of ``pids`` over one wrk run, and the requests it completed.

    When ``segs`` is a list, the TCP segment counters' deltas over the wrk
    run (out, in) are appended to it.
    """
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
        requests = _segments_of_wrk(url, seconds, conns, segs)
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


def _segments_of_wrk(url: str, seconds: float, conns: int, segs: list | None) -> int:
    s0 = tcp_segments()
    requests = wrk(url, seconds, conns)
    if segs is not None:
        s1 = tcp_segments()
        segs.extend((s1[0] - s0[0], s1[1] - s0[1]))
    return requests


def _exists(event: str) -> bool:
    return bool(os.path.exists("/sys/kernel/tracing/events/" + event.replace(":", "/")))


def make(name: str, work, nginx: int):
    if name in WORKER_CONFIGS:
        return workers_make(name, work.path, nginx)
    return conncost_make(name, work, nginx)


def one(name: str, work, nginx: int, seconds: float, conns: int, perf: bool = True,
        settle: tuple[int, float] | None = None) -> dict:
    """Counts per connection from one wrk run through a fresh ``name``.

    System calls only for a proxy and with ``perf``; TCP segments always.
    """
    with make(name, work, nginx) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/100b"
        if settle:
            settle_timewait(*settle)
        else:
            settle_timewait()
        wrk(url, 1.0, conns)                # warm-up
        pid = proxy.pid
        segs: list[int] = []
        dist = Disturbance(pid).start()
        cpu0 = tree_cpu_seconds(pid)
        if pid is not None and perf:
            counts, requests = counted(process_tree(pid), url, seconds, conns, segs)
        else:
            counts, requests = {}, _segments_of_wrk(url, seconds, conns, segs)
        cpu = tree_cpu_seconds(pid) - cpu0
        dist.stop()
    n = max(1, requests)
    per = {k: round(v / n, 3) for k, v in counts.items() if v or k == "failed_accept4"}
    waits = per.get("epoll_wait", 0) + per.get("epoll_pwait", 0)
    out = {"requests": requests, "rate": requests / seconds,
           "segments_out_per_conn": round(segs[0] / n, 2), "segments_in_per_conn": round(segs[1] / n, 2),
           **dist.result()}
    if pid is not None:
        out["cpu_us_per_conn"] = 1e6 * cpu / n
    if counts:
        out.update({"syscalls_per_conn": per, "wakeups_per_conn": waits,
                    "conns_per_wakeup": round(1 / waits, 2) if waits else None})
    return out


def line(key: str, res: dict) -> str:
    """One contender's counts on one line."""
    per = res.get("syscalls_per_conn", {})
    main_ = " ".join(f"{k} {v:g}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if k != "all")
    cpu = f"{res['cpu_us_per_conn']:6.1f} µs CPU/conn " if "cpu_us_per_conn" in res else " " * 20
    calls = (f"{per.get('all', 0):5.2f} syscalls/conn, {res['conns_per_wakeup']} conns/wake-up | {main_}"
             if per else "")
    flag = " DISTURBED" if res.get("disturbed") else ""
    return (f"{key:16} {res['rate']:8,.0f} conn/s {cpu}segments out/in {res['segments_out_per_conn']:5.2f}/"
            f"{res['segments_in_per_conn']:5.2f}{flag}  {calls}")


def run(work, nginx: int, seconds: float, log) -> dict:
    """The ``syscalls`` part of make bench: one run per contender, 32 connections.

    In a network namespace of its own when one can be made (``unshare -n``,
    with its own nginx): its segment counters then count the bench's
    traffic only, and no TIME_WAIT socket of the earlier parts is there.
    Otherwise here, beside whatever else talks on the machine.
    """
    t0 = time.monotonic()
    out = _in_own_netns(seconds, log)
    if out is None:
        out = _run_here(work, nginx, seconds, log)
        out["own_netns"] = False
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def _run_here(work, nginx: int, seconds: float, log) -> dict:
    perf = perf_works()
    if not perf:
        log("syscalls: perf cannot count syscall tracepoints here: TCP segments only")
    out: dict = {"connections": CONNS, "seconds": seconds, "perf": perf, "runs": {}, "errors": []}
    for name in WHO:
        try:
            res = one(name, work, nginx, seconds, CONNS, perf, (SETTLE_LIMIT, SETTLE_MAX_WAIT))
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            out["errors"].append(f"syscalls {name}: {exc}")
            log(f"syscalls {name}: ERROR {exc}")
            continue
        out["runs"][name] = res
        log("syscalls " + line(name, res))
    return out


def _in_own_netns(seconds: float, log) -> dict | None:
    """The part run by this script in a new network namespace; None if none can be made."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    probe = subprocess.run(["unshare", "-n", "--", "ip", "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        log("syscalls: no network namespace of its own (unshare -n failed): counting beside other traffic")
        return None
    with tempfile.TemporaryDirectory(prefix="gbalance-syscalls-") as tmp:
        path = os.path.join(tmp, "part.json")
        cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
               PYTHON, str(Path(__file__).resolve()), "--part", "--seconds", str(seconds), "--json", path]
        # The script pins its proxies and load itself, so it starts with every
        # CPU this bench started with (run.py has since pinned itself to one).
        cpus = ",".join(str(c) for c in sorted(START_CPUS))
        proc = subprocess.Popen(["taskset", "-c", cpus] + cmd, stdout=sys.stderr, stderr=sys.stderr,
                                stdin=subprocess.DEVNULL)
        PROCS[proc.pid] = proc
        try:
            proc.wait(120 + 60 * len(WHO) * (seconds + 25))
        except subprocess.TimeoutExpired:
            log("syscalls: the run in its own network namespace did not finish")
        finally:
            stop(proc, grace=15.0)
        try:
            with open(path) as f:
                out = json.load(f)
        except (OSError, ValueError):
            raise BenchError(f"syscalls: the run in its own network namespace left no result"
                             f" (exit {proc.returncode})") from None
    out["own_netns"] = True
    return out


def report(res: dict) -> None:
    """The per-connection counts on stdout, gbalance beside HAProxy."""
    runs = res["runs"]
    print()
    where = ("a network namespace of the bench's own" if res.get("own_netns")
             else "the whole machine's network namespace")
    print(f"Per short connection (issue 21): wrk -t1 -c{res['connections']} Connection: close, one "
          f"{res['seconds']:g} s run each; system calls of the proxy's process tree (perf syscall "
          f"tracepoints), TCP segments counted in {where} (TcpOutSegs/InSegs; the direct row is the reference)")
    names = [n for n in WHO if n in runs]
    head = f"{'per connection':24}" + "".join(f"{n:>14}" for n in names)
    print(head)
    print("-" * len(head))

    def row(label: str, get) -> None:
        cells = []
        for n in names:
            v = get(runs[n])
            cells.append(f"{'-' if v is None else format(v, '.2f'):>14}")
        print(f"{label:24}" + "".join(cells))

    row("TCP segments out", lambda r: r["segments_out_per_conn"])
    row("TCP segments in", lambda r: r["segments_in_per_conn"])
    row("CPU us", lambda r: r.get("cpu_us_per_conn"))
    if res.get("perf"):
        row("system calls", lambda r: r.get("syscalls_per_conn", {}).get("all"))
        row("epoll waits (wake-ups)", lambda r: r.get("wakeups_per_conn"))
        shown = sorted({k for n in names for k in runs[n].get("syscalls_per_conn", {}) if k != "all"},
                       key=lambda k: -max(runs[n].get("syscalls_per_conn", {}).get(k, 0) for n in names))
        for k in shown:
            row(f"  {k}", lambda r, k=k: r["syscalls_per_conn"].get(k, 0.0) if "syscalls_per_conn" in r else None)
    else:
        print("(system calls not counted: perf has no access to syscall tracepoints here)")
    if not res.get("own_netns") and any(runs[n].get("disturbed") for n in names):
        print("(some runs were disturbed by other load: the segment counts may include other processes' traffic)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", default="32,50")
    ap.add_argument("--who", default=",".join(WHO))
    ap.add_argument("--json")
    ap.add_argument("--part", action="store_true",
                    help="run the make bench part (its contenders, 32 connections) and write its result")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop_all() below still runs
    if args.part:
        return _part_main(args)
    perf = perf_works()
    if not perf:
        print("perf cannot count syscall tracepoints here: TCP segments only", file=sys.stderr)
    out: dict = {}
    work = Workdir()
    try:
        proc, nginx = start_nginx(work.path)
        for conns in [int(c) for c in args.conns.split(",")]:
            for name in args.who.split(","):
                res = one(name, work, nginx, args.seconds, conns, perf)
                out[f"{name} c{conns}"] = res
                print(line(f"{name} c{conns}", res), flush=True)
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


def _part_main(args) -> int:
    """``--part``: what run() does, here (run() starts this in a network namespace of its own)."""
    raise_fd_limit()
    work = Workdir()
    try:
        proc, nginx = start_nginx(work.path)
        out = _run_here(work, nginx, args.seconds, lambda msg: print(msg, file=sys.stderr, flush=True))
        stop(proc)
    except BenchError as exc:
        print(f"syscalls: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all()
        work.close()
    with open(args.json, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
