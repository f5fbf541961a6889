#!/usr/bin/env python3
"""`make bench`: gbalance against a direct connection and HAProxy, plus failover.

From one run it measures, for a direct connection, gbalance and HAProxy
(Debian's, ``mode tcp``, one thread, no splice):

* connections per second: wrk with ``Connection: close`` against nginx
  serving a 100-byte file;
* bulk throughput: one iperf3 stream;
* memory per idle proxied connection: PSS of the proxy's process tree
  before and with 1,000 idle connections held through it.

The proxy runs on CPU 0, everything else (this script, wrk, iperf3, nginx,
the greeter backend) on CPU 1, so the proxy is what is measured.  Runs are
interleaved (each round measures every proxy once, in rotating order) and
medians are compared with issue 2's targets.  Then the failover benchmark
of issue 5 (see failover.py) and profiles of gbalance under the
short-connection load: py-spy's Python frames (pure build only) and perf's
native samples folded into kernel, interpreter, C library, gbalance's
compiled modules and gevent (see profiling.py).  Results: printed, and bench/results/latest.json
(a run of some parts, ``--only``, writes latest-PART....json instead).

Then issue 11's worker figures (see workers.py): CPU per connection and
rate for gbalance -w 1 / -w 2 against HAProxy with 1 / 2 threads, the
spread over 2 workers, and memory per idle connection and per worker.

Then issue 21's independent-harness rows (see conncost.py): wrk with one
thread and 32 connections, CPU per short connection and conn/s for gbalance
(no -w and -w 1) against HAProxy and a direct connection, and CPU per
keep-alive request.

Then issue 21's per-connection counts (see syscalls.py): system calls
and TCP segments per short connection, gbalance (no -w and -w 1) against
HAProxy, a direct connection as the segments' reference.

Then issue 21's scale rows (see scale.py): KB, CPU per opened connection,
new-connection p99 and a 20,000-connect storm with 1k to 100k idle
connections held, gbalance -w 1 / -w 16 beside HAProxy where it can follow.

In the workers and conncost rows rounds go forward and backward in turn,
the two sides of each ratio run next to each other, and every ratio is
printed with the lowest and highest of the rounds' own ratios; a rate
ratio is the median of those, a CPU ratio the ratio of the medians
(lib.paired_ratio says why).

Then issue 21's real-client rows (see clients.py): redis-benchmark, pgbench
and wrk through a direct connection, gbalance and HAProxy, each checked byte
for byte.

Usage: bench/run.py [--only conn,bulk,mem,workers,conncost,syscalls,failover,profile,scale,clients] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bulk  # noqa: E402
import clients  # noqa: E402
import conncost  # noqa: E402
import failover  # noqa: E402
import measure  # noqa: E402
import profiling  # noqa: E402
import scale  # noqa: E402
import syscalls  # noqa: E402
import workers  # noqa: E402
from lib import (BENCH, LOAD_CPU, PROXIES, BenchError, Workdir, cpus_available, haproxy_version,  # noqa: E402
                 median, raise_fd_limit, start_greeter, start_iperf3, start_nginx, stop, stop_all)

PARTS = ("conn", "bulk", "mem", "workers", "conncost", "syscalls", "failover", "profile", "scale", "clients")
TOOLS = ("haproxy", "wrk", "iperf3", "nginx", "taskset")

# Issue 2: gbalance / HAProxy ratios (or kB) to reach, and the C balance's figures.
TARGETS = {"conn": (">=", 0.35, 0.27), "bulk": (">=", 0.5, 0.42), "mem": ("<=", 20.0, 32.0)}
# performance-facts.md, for the "does HAProxy here match the notes" check.
NOTES = {"direct": {"conn": (9400, 9800), "bulk": (16, 16)},
         "haproxy": {"conn": (7500, 8900), "bulk": (8.3, 8.3), "mem": (3.3, 3.3)}}
LABELS = {"conn": "conn/s (Connection: close)", "bulk": "bulk Gbit/s (1 stream)", "mem": "KB per idle connection"}


def _loadavg() -> float:
    """One-minute load average: other work on the machine skews every figure."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu_sample() -> tuple[float, float, float]:
    """(machine busy seconds, machine total seconds, seconds used by us and reaped children)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    t = os.times()
    return (sum(fields) - idle) / hz, sum(fields) / hz, t.user + t.system + t.children_user + t.children_system


def _foreign_cpu(start: tuple[float, float, float]) -> float | None:
    """Share of the machine's CPU time used by processes other than ours."""
    end = _cpu_sample()
    total = end[1] - start[1]
    if total <= 0:
        return None
    return max(0.0, 100.0 * ((end[0] - start[0]) - (end[2] - start[2])) / total)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_tools() -> None:
    """Install the Debian packages (bench/deps.sh) if any tool is missing."""
    if all(shutil.which(t) for t in TOOLS):
        return
    res = subprocess.run(["sh", str(BENCH / "deps.sh")])
    missing = [t for t in TOOLS if not shutil.which(t)]
    if res.returncode != 0 or missing:
        raise BenchError(f"missing tools: {' '.join(missing)} (see bench/deps.sh)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="gbalance benchmark (issue 2 and issue 5)")
    p.add_argument("--only", default=",".join(PARTS),
                   help="comma-separated parts to run: " + ",".join(PARTS))
    p.add_argument("--runs", type=int, default=3, help="rounds of conn/bulk/mem (default 3)")
    p.add_argument("--seconds", type=float, default=3, help="length of one wrk or iperf3 run")
    p.add_argument("--failover-seconds", type=float, default=30)
    p.add_argument("--profile-seconds", type=float, default=10)
    p.add_argument("--output", default=None,
                   help="where the JSON goes (default bench/results/latest.json for the whole run,"
                        " latest-PART[-PART...].json for --only, so a part never replaces a whole run)")
    args = p.parse_args(argv)
    args.parts = [x for x in args.only.split(",") if x]
    bad = [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"unknown part(s): {', '.join(bad)}")
    if args.output is None:
        args.output = str(BENCH / "results" / default_output(args.parts))
    return args


def default_output(parts: list[str]) -> str:
    """latest.json for every part, latest-<parts>.json for a selection."""
    if set(parts) >= set(PARTS):
        return "latest.json"
    return "latest-" + "-".join(p for p in PARTS if p in parts) + ".json"


# -- conn / bulk / mem -----------------------------------------------------------

def measure_one(part: str, name: str, work: Workdir, backends: dict, seconds: float) -> float | None:
    """One figure for one proxy, on a freshly started proxy instance."""
    if part == "mem" and name == "direct":
        return None
    with PROXIES[name](work.path, backends[part]) as proxy:
        if part == "conn":
            return measure.conn_rate(proxy, seconds)
        if part == "bulk":
            return measure.bulk_gbits(proxy, seconds)
        return measure.idle_kb_per_conn(proxy)


def throughput(args: argparse.Namespace, work: Workdir, backends: dict, result: dict) -> None:
    parts = [p for p in ("conn", "bulk", "mem") if p in args.parts]
    names = list(PROXIES)
    raw = {p: {n: [] for n in names} for p in parts}
    errors = result.setdefault("errors", [])
    for r in range(args.runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for part in parts:
            for name in order:
                if part == "mem" and name == "direct":
                    continue
                try:
                    value = measure_one(part, name, work, backends, args.seconds)
                except (BenchError, OSError) as exc:
                    errors.append(f"round {r + 1} {part} {name}: {exc}")
                    log(f"  {part} {name}: ERROR {exc}")
                    value = None
                raw[part][name].append(value)
                if value is not None:
                    log(f"round {r + 1}/{args.runs} {part:4} {name:8} {value:,.2f}")
    result["raw"] = raw
    med = {p: {n: median(raw[p][n]) for n in names} for p in parts}
    result["medians"] = med
    result["ratios"] = {p: {"gbalance/haproxy": _ratio(med[p]["gbalance"], med[p]["haproxy"]),
                            "gbalance/direct": _ratio(med[p]["gbalance"], med[p]["direct"])} for p in parts}
    result["targets"] = {}
    for p in parts:
        op, target, c_balance = TARGETS[p]
        value = med[p]["gbalance"] if p == "mem" else result["ratios"][p]["gbalance/haproxy"]
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        result["targets"][p] = {"figure": value, "target": f"{op} {target}", "c_balance": c_balance, "met": ok}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def print_table(result: dict) -> None:
    med, ratios, targets = result.get("medians", {}), result.get("ratios", {}), result.get("targets", {})
    if not med:
        return
    print()
    print(f"Medians of {result['runs']} interleaved runs (proxy on CPU 0, load and backends on CPU 1)")
    head = f"{'figure':28}{'direct':>10}{'gbalance':>10}{'haproxy':>10}{'gb/hap':>8}{'gb/dir':>8}  target (C balance)  met"
    print(head)
    print("-" * len(head))
    for p in med:
        m, r, t = med[p], ratios[p], targets[p]
        unit = " KB" if p == "mem" else " x HAProxy"
        verdict = {True: "YES", False: "NO", None: "?"}[t["met"]]
        print(f"{LABELS[p]:28}{_fmt(m['direct']):>10}{_fmt(m['gbalance']):>10}{_fmt(m['haproxy']):>10}"
              f"{_fmt(r['gbalance/haproxy']):>8}{_fmt(r['gbalance/direct']):>8}"
              f"  {t['target']}{unit} ({t['c_balance']:g})  {verdict}")
    print()
    print("HAProxy and direct here vs performance-facts.md:")
    for name, figs in NOTES.items():
        for p, (lo, hi) in figs.items():
            if p in med and med[p].get(name) is not None:
                span = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
                print(f"  {name:8} {LABELS[p]:28} here {_fmt(med[p][name]):>8}   notes {span}")


def print_failover(fo: dict) -> None:
    print()
    print(f"Failover: primary connects hang, live backup in group 1; a client every "
          f"{fo['period_s'] * 1000:.0f} ms, {fo['client_timeout_s']:g} s timeout, {fo['seconds']:g} s")
    head = (f"{'scenario':40}{'failed':>12}{'median ms':>11}{'p99 ms':>9}{'max ms':>9}"
            f"{'staggered':>10}{'suspect':>8}")
    print(head)
    print("-" * len(head))
    rows = (("direct to the backup", "direct"), ("balance -t 5 -m connect:interval=1", "gbalance_m"),
            ("balance -t 5 (no -m)", "gbalance_plain"),
            ("-m, primary goes down mid-run", "gbalance_m_outage"))
    for label, key in rows:
        r = fo.get(key)
        if r is None:
            continue
        if "connections" not in r:
            print(f"{label:40}  NOT MEASURED: {r.get('error')}")
            continue
        print(f"{label:40}{r['failed']:>5} of {r['connections']:<4}{_fmt(r.get('ttfb_median_ms'), 1):>11}"
              f"{_fmt(r.get('ttfb_p99_ms'), 1):>9}{_fmt(r.get('ttfb_max_ms'), 1):>9}"
              f"{r.get('staggered_connects', '-')!s:>10}{r.get('suspect_marks', '-')!s:>8}")
        if r.get("error"):
            print(f"{'':40}  note: {r['error']}")
    d, m = fo.get("direct", {}), fo.get("gbalance_m", {})
    for label, key in (("dead at start", "gbalance_m"), ("dying mid-run", "gbalance_m_outage")):
        r = fo.get(key, {})
        if "ttfb_p99_ms" in d and "connections" in r:
            p99, top = r.get("ttfb_p99_ms"), r.get("ttfb_max_ms")
            ok = (r["failed"] == 0 and p99 is not None and p99 <= d["ttfb_p99_ms"] + 5
                  and top is not None and top < 50)
            print(f"target {label} (0 failed, p99 within 5 ms of direct, max < 50 ms): "
                  f"{'YES' if ok else 'NO'}")
    if m.get("first_second"):
        print(f"gbalance -m, first second of connections (ms or failure): {m['first_second']}")
    h = fo.get("healthy_load")
    if h:
        if "error" in h:
            print(f"healthy channels under wrk load: NOT MEASURED: {h['error']}")
        else:
            ok = h.get("staggered_connects") == 0 and h.get("suspect_marks") == 0
            print(f"healthy channels under wrk load ({_fmt(h.get('conn_per_s'))} conn/s, {h['args']}): "
                  f"{h.get('staggered_connects')} staggered connects, {h.get('suspect_marks')} suspect marks,"
                  f" delays {h.get('stagger_delays_ms')} ms (goal 0 and 0): {'YES' if ok else 'NO'}")
    o = fo.get("gbalance_m_outage", {})
    if "connections" in o:
        print(f"outage run: primary answered {o.get('served_by_primary')} connections, then hung at "
              f"{o.get('outage_at_s'):g} s; slowest: {_fmt(o.get('ttfb_max_ms'), 1)} ms")


def print_profile(prof: dict) -> None:
    print()
    print(f"gbalance profile under wrk (py-spy, {prof['samples']} busy samples, "
          f"busy {100 * (prof.get('busy_fraction') or 0):.0f}% of the time, "
          f"{_fmt(prof.get('rps_while_sampled'))} conn/s while sampled)")
    print("  self time (% of busy samples):")
    for f, pct in prof["self"][:15]:
        print(f"    {pct:5.1f}%  {f}")
    print("  self time by line:")
    for f, pct in prof.get("self_lines", [])[:15]:
        print(f"    {pct:5.1f}%  {f}")
    print("  inclusive time:")
    for f, pct in prof["inclusive"][:15]:
        print(f"    {pct:5.1f}%  {f}")


def print_native_profile(prof: dict) -> None:
    print()
    names = [n for n in ("gbalance", "haproxy") if n in prof]
    build = "compiled" if prof.get("compiled") else "pure"
    print(f"Where a short connection's CPU goes (perf samples under wrk -c{measure.WRK_CONNECTIONS},"
          f" Connection: close; gbalance {build} build, no -w; HAProxy 1 thread)")
    print(f"  {'part':20}" + "".join(f"{n + ' %':>12}{'µs/conn':>9}" for n in names))
    for g in profiling.GROUPS:
        if any(prof[n]["groups"].get(g) for n in names):
            print(f"  {g:20}" + "".join(f"{prof[n]['groups'][g]:>11.1f}%{prof[n]['us_per_conn'][g]:>9.1f}"
                                        for n in names))
    print(f"  {'total':20}" + "".join(f"{'':>12}{prof[n]['cpu_us_per_conn']:>9.1f}" for n in names)
          + "   (" + ", ".join(f"{n} {_fmt(prof[n].get('rate'))} conn/s" for n in names) + ")")
    for n in names:
        print(f"  {n} top symbols (% of samples):")
        for sym, pct in prof[n]["symbols"][:12]:
            print(f"    {pct:5.2f}%  {sym}")


# -- main ------------------------------------------------------------------------------

def run_part(result: dict, key: str, measure: Callable[[], dict], report: Callable[[dict], None],
             own_errors: bool = False, label: str = "") -> None:
    """Measure one part into ``result[key]`` and print its report.  A part that
    fails is an error of the run (logged, in the JSON) and the other parts go on;
    ``own_errors``: the part lists problems of its own under "errors"."""
    label = label or key
    try:
        res = measure()
        result[key] = res
        if own_errors:
            result["errors"].extend(res["errors"])
        report(res)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        result["errors"].append(f"{label}: {exc}")
        log(f"{label}: ERROR {exc}")


def failover_part(work: Workdir, conn: int, mem: int, args: argparse.Namespace) -> dict:
    """The failover scenarios, then -m over two healthy channels under full load."""
    res = failover.run(work, mem, args.failover_seconds, log)
    log("failover: -m over two healthy channels under full wrk load ...")
    res["healthy_load"] = failover.healthy_load(work, conn, max(args.seconds, 5), measure.conn_rate)
    return res

def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    cpu0 = _cpu_sample()
    ensure_tools()
    raise_fd_limit()
    if cpus_available():
        os.sched_setaffinity(0, {LOAD_CPU})
    else:
        log("fewer than 2 CPUs: proxy and load share cores, figures are not comparable")
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": args.runs,
                    "seconds_per_run": args.seconds, "haproxy": haproxy_version(),
                    "python": platform.python_version(), "cpus": os.cpu_count(),
                    "pinned": cpus_available(), "errors": []}
    work = Workdir()
    procs = []
    try:
        backends = {}
        if {"conn", "profile", "failover", "workers", "conncost", "syscalls"} & set(args.parts):
            proc, backends["conn"] = start_nginx(work.path)
            procs.append(proc)
        if "bulk" in args.parts:
            proc, backends["bulk"] = start_iperf3()
            procs.append(proc)
        if {"mem", "failover", "workers"} & set(args.parts):
            proc, backends["mem"] = start_greeter()
            procs.append(proc)
        result["loadavg_start"] = _loadavg()
        if any(p in args.parts for p in ("conn", "bulk", "mem")):
            throughput(args, work, backends, result)
            print_table(result)
        conn, mem = backends.get("conn"), backends.get("mem")
        if "bulk" in args.parts:
            run_part(result, "bulk", lambda: bulk.run(work, backends["bulk"], args.runs, args.seconds, log),
                     bulk.report, own_errors=True)
        if "workers" in args.parts:
            run_part(result, "workers", lambda: workers.run(work, conn, mem, args.runs, args.seconds, log),
                     workers.report)
        if "conncost" in args.parts:
            run_part(result, "conncost", lambda: conncost.run(work, conn, args.runs, args.seconds, log),
                     conncost.report)
        if "syscalls" in args.parts:
            run_part(result, "syscalls", lambda: syscalls.run(work, conn, args.seconds, log), syscalls.report,
                     own_errors=True)
        if "failover" in args.parts:
            run_part(result, "failover", lambda: failover_part(work, conn, mem, args), print_failover)
        if "profile" in args.parts:
            compiled = profiling.compiled_build()
            if compiled:
                log("profile: compiled build, py-spy would see only the hub; perf instead")
            else:
                log("profile: py-spy on gbalance under wrk ...")
                run_part(result, "profile", lambda: profiling.profile(work.path, conn, args.profile_seconds, log),
                         print_profile)
            run_part(result, "native_profile",
                     lambda: profiling.native_profile(work.path, conn, args.profile_seconds, log, compiled),
                     print_native_profile, label="native profile")
        if "scale" in args.parts:
            log("scale: idle connections held at 1k to 100k, storms on top ...")
            run_part(result, "scale", lambda: scale.run(work, log), scale.report)
        if "clients" in args.parts:
            log("clients: redis-benchmark, pgbench and wrk through each contender ...")
            run_part(result, "clients", lambda: clients.run(work, conn, args.runs, args.seconds, log),
                     clients.report, own_errors=True)
    except BenchError as exc:
        result["errors"].append(str(exc))
        print(f"bench: {exc}", file=sys.stderr)
    finally:
        for p in procs:
            stop(p)
        stop_all()
        work.close()
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    foreign = _foreign_cpu(cpu0)
    result["foreign_cpu_percent"] = foreign
    if foreign is not None and foreign > 10:
        print(f"\nnote: other processes on this machine used {foreign:.0f}% of its CPU time during the run"
              f" (load average {result['loadavg_start']:.1f} at the start): absolute figures are low and noisy;"
              " ratios from interleaved runs hold up better")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["errors"]:
        print("\nerrors:\n  " + "\n  ".join(result["errors"]))
    print(f"\nwritten {out} ({result['elapsed_s']:.0f} s)")
    return 1 if result["errors"] and not {"medians", "failover", "workers", "conncost", "bulk", "scale",
                                          "syscalls"} & set(result) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
