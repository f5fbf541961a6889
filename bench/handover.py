"""Latency while ``balance -r`` hands over, under wrk load (issue 17).

wrk (``Connection: close``, so every request is a new connection through the
proxy) fetches a 100-byte file from nginx through a foreground gbalance
master; every ``--every`` seconds a new master replaces the running one with
``balance -f -r``.  Prints wrk's latency percentiles, its socket errors, and
the same run without hand-overs as the baseline.  Loopback only; every
process is started here and stopped by its pid.

    .venv/bin/python bench/handover.py -w 2
    .venv/bin/python bench/handover.py -w 2 --code /tmp/old-gbalance-tree
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import PYTHON, ROOT, start_nginx, stop, stop_all, wait_listening, free_port  # noqa: E402


def wrk(url: str, seconds: int, connections: int) -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                             "-H", "Connection: close", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def summary(out: str) -> str:
    def grab(pattern: str) -> str:
        m = re.search(pattern, out)
        return m.group(1) if m else "?"
    p50, p90, p99 = (grab(rf"{n}%\s+(\S+)") for n in (50, 90, 99))
    peak = grab(r"Latency\s+\S+\s+\S+\s+(\S+)")
    rate = grab(r"Requests/sec:\s*(\S+)")
    errors = grab(r"Socket errors: (.+)") if "Socket errors" in out else "none"
    return f"p50 {p50}  p90 {p90}  p99 {p99}  max {peak}  req/s {rate}  socket errors: {errors}"


def run(args, handovers: bool, backend: int, state: str) -> str:
    env = dict(os.environ, BALANCE_STATE_DIR=state, PYTHONPATH=args.code)
    port = free_port()
    line = [*(["-w", str(args.workers)] if args.workers > 1 else []), "-b", "127.0.0.1", str(port),
            f"127.0.0.1:{backend}"]
    cmd = [PYTHON, "-m", "gbalance", "-f"]
    masters = [subprocess.Popen(cmd + line, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_listening(port, masters[0])
        time.sleep(1.0 if args.workers > 1 else 0.3)
        load = wrk(f"http://127.0.0.1:{port}/100b", args.seconds, args.connections)
        if handovers:
            time.sleep(args.every)
            deadline = time.monotonic() + args.seconds - args.every
            while time.monotonic() < deadline:
                masters.append(subprocess.Popen(cmd + ["-r"] + line, env=env, cwd="/",
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
                masters[-2].wait(30)
                time.sleep(args.every)
        out, _ = load.communicate(timeout=args.seconds + 30)
        return f"{len(masters) - 1} hand-overs: " + summary(out)
    finally:
        for m in masters:
            stop(m)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--workers", type=int, default=1)
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--every", type=float, default=1.5)
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--code", default=str(ROOT), help="directory holding the gbalance package to run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="gbal-handover-") as work:
        nginx, backend = start_nginx(Path(work))
        try:
            state = os.path.join(work, "state")
            print(f"-w {args.workers}, {args.connections} wrk connections, {args.seconds} s"
                  f" (code: {args.code})")
            print("  baseline:", run(args, False, backend, state))
            print("  reloads: ", run(args, True, backend, state))
        finally:
            stop(nginx)
            stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
