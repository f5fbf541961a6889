"""Issue 21's real-client rows: redis, PostgreSQL and HTTP clients through each contender.

Through a direct connection, gbalance (default mode, and ``-w 1``) and
HAProxy (``mode tcp``, one thread), each round measures:

* ``redis-benchmark -P 16 -t set``: SET requests per second, 16 pipelined
  per connection, 50 connections, 3-byte values;
* ``redis-benchmark -d 262144 -t set,get``: SET and GET requests per second
  with 256 KiB values (bulk both ways, on 50 connections);
* ``pgbench -c 8``: transactions per second of the TPC-B-like script on a
  scale-8 database, 8 clients (one connection each, kept);
* ``wrk -t1 -c32``: a 100-byte file from nginx, keep-alive and
  ``Connection: close``, requests per second.

Every figure is checked for correctness, and a failed check is reported as
such (in the table, in ``errors`` and in the json), never dropped:

* redis: redis-benchmark must exit 0 with no error on its output; then,
  through the same proxy, 16 distinct random 256 KiB values are SET and read
  back with GET on one pipelined connection and compared byte for byte;
* PostgreSQL: pgbench must exit 0 with 0 failed transactions; then, read
  through the proxy, the history table must have grown by exactly the
  transactions pgbench processed, and the sums of account, teller and branch
  balances and of the history's deltas must all be equal;
* HTTP: wrk must see no non-2xx response and no socket error; then a 1 MiB
  random file is fetched through the proxy over one keep-alive connection
  (twice) and with ``Connection: close`` and compared byte for byte, before
  wrk (which makes it the proxy's warm-up too) and after.

The servers (redis-server, PostgreSQL as its own system user, nginx) are
started here in temporary directories on free loopback ports and killed by
their pids.  Proxies run on CPU 0, servers and clients on CPU 1; rounds are
interleaved (every contender once per round, in rotating order) and medians
are reported, with the proxy's CPU time (utime+stime of its process tree)
per request or transaction beside each rate.  PostgreSQL runs with fsync off, so the disk is not measured.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lib import (BENCH, LOAD_CPU, PROCS, BenchError, Direct, GBalance, HAProxy, Proxy, free_port, median, pin,
                 start, start_nginx, stop, wait_listening)
from measure import settle_timewait, timewait_count
from workers import tree_cpu_seconds

CONTENDERS = ("direct", "gbalance", "gbalance-w1", "haproxy")
LABELS = {"direct": "direct", "gbalance": "gbalance", "gbalance-w1": "gbalance -w 1", "haproxy": "HAProxy"}
#: (key, label, unit) of each figure, in the order they are measured and printed.
FIGURES = (("redis_set_p16", "redis-benchmark -P 16 SET", "req/s"),
           ("redis_256k_set", "redis 256 KiB SET", "req/s"),
           ("redis_256k_get", "redis 256 KiB GET", "req/s"),
           ("pgbench_c8", "pgbench -c 8 (TPC-B, scale 8)", "tps"),
           ("wrk_keepalive", "wrk keep-alive (100 B)", "req/s"),
           ("wrk_close", "wrk Connection: close (100 B)", "req/s"))
#: Which backend serves each figure.
SERVER = {"redis_set_p16": "redis", "redis_256k_set": "redis", "redis_256k_get": "redis",
          "pgbench_c8": "postgres", "wrk_keepalive": "nginx", "wrk_close": "nginx"}
WRK_CONNECTIONS = 32
PG_CLIENTS = 8
PG_SCALE = 8
BIG = 256 * 1024
CHECK_FILE = "check-1m"
TIMEOUT = 60.0


# -- servers ----------------------------------------------------------------------

def ensure_tools() -> None:
    """Install bench/deps.sh's packages when a redis or PostgreSQL tool is missing."""
    if all(shutil.which(t) for t in ("redis-server", "redis-benchmark", "wrk", "nginx")) and pg_bindir():
        return
    subprocess.run(["sh", str(BENCH / "deps.sh")], check=False)
    missing = [t for t in ("redis-server", "redis-benchmark", "wrk", "nginx") if not shutil.which(t)]
    if not pg_bindir():
        missing.append("postgresql")
    if missing:
        raise BenchError(f"missing tools: {' '.join(missing)} (see bench/deps.sh)")


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (initdb, postgres, pgbench, psql)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(re.sub(r"\D", "", p.split("/")[4]) or 0))
    for p in reversed(found):
        d = Path(p).parent
        if all((d / t).exists() for t in ("initdb", "pgbench", "psql")):
            return d
    return None


def start_redis(work: Path) -> tuple[object, int]:
    """redis-server, no persistence, on a free loopback port."""
    port = free_port()
    d = work / f"redis-{port}"
    d.mkdir()
    proc = start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--dir", str(d), "--daemonize", "no", "--protected-mode", "no",
                  "--logfile", str(d / "redis.log"), "--maxclients", "1000"], LOAD_CPU)
    wait_listening(port, proc)
    return proc, port


class Postgres:
    """A throw-away PostgreSQL cluster owned by the ``postgres`` system user
    (or ``nobody``; by the caller when not root), fsync off, trust auth on loopback."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise BenchError("PostgreSQL is not installed (see bench/deps.sh)")
        self.dir = Path(tempfile.mkdtemp(prefix="gbalance-bench-pg-"))
        self.user: str | None = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    pw = pwd.getpwnam(name)
                except KeyError:
                    continue
                self.user = name
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
                break
        self.env = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C", "HOME": str(self.dir),
                    "PGCONNECT_TIMEOUT": "10"}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def _as_owner(self) -> dict:
        return {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid, "extra_groups": []} if self.user else {}

    def start(self) -> None:
        data = self.dir / "data"
        res = subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                              "-E", "UTF8", "--no-sync"], cwd=self.dir, env=self.env, capture_output=True,
                             text=True, timeout=120, **self._as_owner())
        if res.returncode != 0:
            raise BenchError(f"initdb failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
        self.port = free_port()
        cmd = pin(LOAD_CPU) + [str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port),
                               "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
                               "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                               "-c", "max_connections=40", "-c", "shared_buffers=64MB",
                               "-c", "logging_collector=off"]
        log = open(self.dir / "postgres.log", "wb")
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, **self._as_owner())
        finally:
            log.close()
        PROCS[self.proc.pid] = self.proc
        try:
            wait_listening(self.port, self.proc, timeout=60)
        except BenchError as exc:
            raise BenchError(f"postgres: {exc}: {self.log_tail()}") from None
        res = subprocess.run(pin(LOAD_CPU) + [str(self.bindir / "pgbench"), "-i", "-q", "-s", str(PG_SCALE),
                                              "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                              "postgres"],
                             cwd=self.dir, env=self.env, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise BenchError(f"pgbench -i failed: {res.stderr.strip().splitlines()[-1:]}")

    def log_tail(self) -> str:
        try:
            return " | ".join((self.dir / "postgres.log").read_text(errors="replace").strip().splitlines()[-2:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGINT)          # fast shutdown: ends its backends too
                self.proc.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        stop(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# -- contenders -----------------------------------------------------------------------

def make(name: str, work: Path, backend: int) -> Proxy:
    if name == "direct":
        return Direct(work, backend)
    if name == "gbalance":
        return GBalance(work, backend)
    if name == "gbalance-w1":
        return GBalance(work, backend, args=["-w", "1"])
    return HAProxy(work, backend)


def _run(cmd: list[str], timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(pin(LOAD_CPU) + cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cmd[0]} did not finish in {timeout:g} s") from None


class Meter:
    """CPU time (utime+stime) of the proxy's process tree per request over one run."""

    def __init__(self, pid: int | None, cpu: dict) -> None:
        self.pid, self.cpu, self.t0 = pid, cpu, 0.0

    def start(self) -> None:
        self.t0 = tree_cpu_seconds(self.pid) if self.pid else 0.0

    def stop(self, key: str, requests: int | None) -> None:
        """Record µs per request under ``key`` (nothing for a direct connection)."""
        if self.pid and requests:
            self.cpu[key] = 1e6 * (tree_cpu_seconds(self.pid) - self.t0) / requests


# -- redis ------------------------------------------------------------------------------

def redis_benchmark(port: int, extra: list[str]) -> tuple[dict[str, float], str | None]:
    """One redis-benchmark run (CSV): ({test: req/s}, error or None)."""
    res = _run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--csv", *extra])
    rates = {}
    for line in res.stdout.splitlines():
        m = re.match(r'"([A-Z]+)","([\d.]+)"', line)
        if m:
            rates[m.group(1)] = float(m.group(2))
    problem = None
    bad = [x for x in (res.stdout + "\n" + res.stderr).splitlines() if re.search(r"error|ERR|refused|reset", x, re.I)]
    if res.returncode != 0 or bad:
        problem = f"redis-benchmark exit {res.returncode}: {(bad or [res.stderr.strip()])[0][:160]}"
    return rates, problem


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise BenchError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def redis_check(port: int, count: int = 16) -> str | None:
    """SET ``count`` random 256 KiB values and GET them back, pipelined on one
    connection through ``port``; None if every byte came back, else what differed."""
    values = [os.urandom(BIG) for _ in range(count)]
    keys = [b"gbalance:check:%d:%d" % (os.getpid(), i) for i in range(count)]
    request = b"".join(_resp(b"SET", k, v) for k, v in zip(keys, values))
    request += b"".join(_resp(b"GET", k) for k in keys)
    expect = b"+OK\r\n" * count + b"".join(b"$%d\r\n%s\r\n" % (BIG, v) for v in values)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(request)
            got = _recv_exact(s, len(expect))
    except (OSError, BenchError) as exc:
        return f"redis check: {exc}"
    if got != expect:
        at = next(i for i, (a, b) in enumerate(zip(got, expect)) if a != b)
        return f"redis check: {len(expect)} bytes expected, first difference at byte {at}"
    return None


def redis_round(proxy: Proxy, seconds: float, meter: Meter) -> tuple[dict, list[str]]:
    """The three redis figures on one proxy instance, and the problems seen."""
    problems = []
    out = {}
    redis_benchmark(proxy.port, ["-t", "set", "-P", "16", "-n", "100000"])      # warm-up
    runs = (("redis_set_p16", "SET", ["-P", "16"], int(400_000 * seconds)),
            ("redis_256k_set", "SET", ["-d", str(BIG)], int(3_000 * seconds)),
            ("redis_256k_get", "GET", ["-d", str(BIG)], int(3_000 * seconds)))   # GETs the value SET before
    for key, test, extra, n in runs:
        meter.start()
        rates, err = redis_benchmark(proxy.port, ["-t", test.lower(), *extra, "-n", str(n)])
        meter.stop(key, n)
        out[key] = rates.get(test)
        problems += [err] if err else []
    err = redis_check(proxy.port)
    problems += [err] if err else []
    for key in ("redis_set_p16", "redis_256k_set", "redis_256k_get"):
        if out[key] is None:
            problems.append(f"{key}: redis-benchmark printed no rate")
    return out, problems


# -- PostgreSQL ------------------------------------------------------------------------

def _psql(pg: Postgres, port: int, sql: str) -> str:
    res = _run([str(pg.bindir / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", sql], env=pg.env, cwd=pg.dir)
    if res.returncode != 0:
        raise BenchError(f"psql: {res.stderr.strip()[:160]}")
    return res.stdout.strip()


_SUMS = ("select (select count(*) from pgbench_history), (select coalesce(sum(abalance),0) from pgbench_accounts),"
         " (select coalesce(sum(tbalance),0) from pgbench_tellers), (select coalesce(sum(bbalance),0)"
         " from pgbench_branches), (select coalesce(sum(delta),0) from pgbench_history)")


def pg_round(pg: Postgres, proxy: Proxy, seconds: float, meter: Meter) -> tuple[dict, list[str]]:
    """pgbench -c 8 through ``proxy``, then the database's books are checked through it."""
    problems = []
    before = _psql(pg, proxy.port, _SUMS).split("|")
    meter.start()
    res = _run([str(pg.bindir / "pgbench"), "-n", "-c", str(PG_CLIENTS), "-j", "1", "-T", str(max(1, round(seconds))),
                "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "postgres", "postgres"],
               timeout=seconds + TIMEOUT, env=pg.env, cwd=pg.dir)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", res.stdout)
    done = re.search(r"number of transactions actually processed: (\d+)", res.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", res.stdout)
    meter.stop("pgbench_c8", int(done.group(1)) if done else None)
    if res.returncode != 0 or not tps or not done:
        problems.append(f"pgbench exit {res.returncode}: {(res.stderr.strip() or res.stdout.strip())[-160:]!r}")
    if failed and int(failed.group(1)):
        problems.append(f"pgbench: {failed.group(1)} failed transactions")
    try:
        after = _psql(pg, proxy.port, _SUMS).split("|")
        if len(after) != 5 or len(set(after[1:])) != 1:
            problems.append(f"pgbench check: balances disagree (accounts, tellers, branches, history): {after[1:]}")
        elif done and int(after[0]) - int(before[0]) != int(done.group(1)):
            problems.append(f"pgbench check: {done.group(1)} transactions processed but history grew by "
                            f"{int(after[0]) - int(before[0])}")
    except (BenchError, ValueError, IndexError) as exc:
        problems.append(f"pgbench check: {exc}")
    return {"pgbench_c8": float(tps.group(1)) if tps else None}, problems


# -- HTTP ---------------------------------------------------------------------------------

def wrk(port: int, seconds: float, close: bool) -> tuple[float | None, int | None, str | None]:
    """``wrk -t1 -c32`` on the 100-byte file: (req/s, requests, problem or None); any
    error response or socket error is a problem."""
    cmd = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{max(1, round(seconds))}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    res = _run(cmd + [f"http://127.0.0.1:{port}/100b"], timeout=seconds + TIMEOUT)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", res.stdout)
    total = re.search(r"(\d+) requests in", res.stdout)
    if not rate or not total:
        return None, None, f"wrk printed no rate: {res.stdout.strip()[-160:]!r}"
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", res.stdout)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", res.stdout)
    problem = None
    if bad and int(bad.group(1)):
        problem = f"wrk: {bad.group(1)} of {total.group(1)} responses were not 2xx"
    elif errs and sum(int(x) for x in errs.groups()):
        problem = f"wrk: {errs.group(0)} in {total.group(1)} requests"
    return float(rate.group(1)), int(total.group(1)), problem


def _http_get(s: socket.socket, path: str, close: bool) -> bytes:
    s.sendall(f"GET /{path} HTTP/1.1\r\nHost: x\r\n{'Connection: close' if close else ''}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise BenchError("connection closed inside the response head")
        head += chunk
    head, body = head.split(b"\r\n\r\n", 1)
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    if not head.startswith(b"HTTP/1.1 200") or not m:
        raise BenchError(f"unexpected response head {head[:60]!r}")
    return body + _recv_exact(s, int(m.group(1)) - len(body))


def http_check(port: int, expect: bytes) -> str | None:
    """The 1 MiB check file twice on one keep-alive connection and once with
    ``Connection: close``; None if all came back exactly."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            got = [_http_get(s, CHECK_FILE, False), _http_get(s, CHECK_FILE, False)]
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            got.append(_http_get(s, CHECK_FILE, True))
    except (OSError, BenchError) as exc:
        return f"http check: {exc}"
    wrong = [i for i, g in enumerate(got) if g != expect]
    return f"http check: responses {wrong} of 3 differ from the file" if wrong else None


def http_round(proxy: Proxy, seconds: float, expect: bytes, meter: Meter) -> tuple[dict, list[str]]:
    problems = []
    out = {}
    err = http_check(proxy.port, expect)                                 # also the warm-up
    problems += [err] if err else []
    for key, close in (("wrk_keepalive", False), ("wrk_close", True)):
        meter.start()
        out[key], requests, err = wrk(proxy.port, seconds, close)
        meter.stop(key, requests)
        problems += [err] if err else []
    err = http_check(proxy.port, expect)
    problems += [err] if err else []
    return out, problems


# -- the part -------------------------------------------------------------------------------

def run(work, nginx: int | None, runs: int, seconds: float, log, contenders: tuple[str, ...] = CONTENDERS) -> dict:
    """Start the servers, measure every figure through every contender in
    ``runs`` interleaved rounds, stop the servers; medians, ratios, checks."""
    ensure_tools()
    t0 = time.monotonic()
    owned: list = []
    pg = None
    raw = {n: {k: [] for k, _, _ in FIGURES} for n in contenders}
    result_tw = None
    cpu_us = {n: {k: [] for k, _, _ in FIGURES} for n in contenders}
    problems: dict[str, list[str]] = {n: [] for n in contenders}
    errors: list[str] = []
    try:
        servers: dict[str, int] = {}
        proc, servers["redis"] = start_redis(work.path)
        owned.append(proc)
        if nginx is None:
            proc, nginx = start_nginx(work.path)
            owned.append(proc)
        servers["nginx"] = nginx
        expect = os.urandom(1 << 20)
        (work.path / "nginx" / "www" / CHECK_FILE).write_bytes(expect)
        log("clients: initdb and pgbench -i ...")
        pg = Postgres()
        pg.start()
        servers["postgres"] = pg.port
        log(f"clients: servers up in {time.monotonic() - t0:.0f} s")
        # Once, bounded, so the part stays within its few minutes: earlier
        # parts' TIME_WAIT sockets drain a while; within the part, the rotating
        # order spreads the ones its own close runs leave over the contenders.
        settle_timewait(limit=20_000, max_wait=20.0)
        result_tw = timewait_count()
        for r in range(runs):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for server in ("redis", "postgres", "nginx"):
                for name in order:
                    try:
                        cpu: dict[str, float] = {}
                        with make(name, work.path, servers[server]) as proxy:
                            meter = Meter(proxy.pid, cpu)
                            if server == "redis":
                                out, bad = redis_round(proxy, seconds, meter)
                            elif server == "postgres":
                                out, bad = pg_round(pg, proxy, seconds, meter)
                            else:
                                out, bad = http_round(proxy, seconds, expect, meter)
                    except (BenchError, OSError) as exc:
                        out, bad = {}, [f"{server}: {exc}"]
                    for key, value in out.items():
                        raw[name][key].append(value)
                    for key, value in cpu.items():
                        cpu_us[name][key].append(round(value, 2))
                    for b in bad:
                        problems[name].append(f"round {r + 1}: {b}")
                        errors.append(f"clients round {r + 1} {name}: {b}")
                    shown = ", ".join(f"{k} {v:,.0f}" for k, v in out.items() if v is not None)
                    log(f"clients round {r + 1}/{runs} {name:12} {shown}"
                        + (f"  CHECK FAILED: {'; '.join(bad)}" if bad else ""))
    finally:
        for p in owned:
            stop(p)
        if pg is not None:
            pg.stop()
    med = {n: {k: median(raw[n][k]) for k, _, _ in FIGURES} for n in contenders}
    med_cpu = {n: {k: median(cpu_us[n][k]) for k, _, _ in FIGURES} for n in contenders if n != "direct"}
    ratios = {}
    for key, _, _ in FIGURES:
        g, h, d = med.get("gbalance", {}).get(key), med.get("haproxy", {}).get(key), med.get("direct", {}).get(key)
        ratios[key] = {"gbalance/haproxy": g / h if g is not None and h else None,
                       "gbalance/direct": g / d if g is not None and d else None}
        if "gbalance-w1" in med:
            w = med["gbalance-w1"][key]
            ratios[key]["w1/haproxy"] = w / h if w is not None and h else None
        g, h = med_cpu.get("gbalance", {}).get(key), med_cpu.get("haproxy", {}).get(key)
        ratios[key]["cpu_gbalance/haproxy"] = g / h if g is not None and h else None
    correct = {n: not problems[n] and all(raw[n][k] and None not in raw[n][k] for k, _, _ in FIGURES)
               for n in contenders}
    return {"contenders": list(contenders), "raw": raw, "medians": med, "ratios": ratios,
            "bytes_correct": correct, "problems": problems, "errors": errors,
            "cpu_us_per_request": cpu_us, "cpu_us_medians": med_cpu, "elapsed_s": round(time.monotonic() - t0, 1), "timewait_at_start": result_tw,
            "conditions": f"medians of {runs} interleaved rounds, {seconds:g} s runs; proxy on CPU 0, "
                          f"servers and clients on CPU 1; redis-benchmark 50 connections, pgbench scale "
                          f"{PG_SCALE} fsync off, wrk -t1 -c{WRK_CONNECTIONS}"}


def _f(v, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def report(res: dict) -> None:
    """The real-client rows on stdout."""
    names = res["contenders"]
    med, ratios = res["medians"], res["ratios"]
    print()
    print(f"Real clients (issue 21), {res['conditions']}")
    head = f"{'figure':34}" + "".join(f"{LABELS[n]:>15}" for n in names) + f"{'gb/hap':>8}{'gb/dir':>8}"
    if "gbalance-w1" in names:
        head += f"{'w1/hap':>8}"
    print(head)
    print("-" * len(head))
    for key, label, unit in FIGURES:
        line = f"{label + ' ' + unit:34}" + "".join(f"{_f(med[n][key]):>15}" for n in names)
        line += f"{_f(ratios[key]['gbalance/haproxy'], '.2f'):>8}{_f(ratios[key]['gbalance/direct'], '.2f'):>8}"
        if "gbalance-w1" in names:
            line += f"{_f(ratios[key].get('w1/haproxy'), '.2f'):>8}"
        print(line)
    print("proxy CPU us per request (pgbench: per transaction), utime+stime of its process tree;"
          " gb/hap of CPU:")
    for key, label, _ in FIGURES:
        line = f"{label:34}" + "".join(f"{_f(res['cpu_us_medians'].get(n, {}).get(key), '.1f'):>15}" for n in names)
        print(line + f"{_f(ratios[key]['cpu_gbalance/haproxy'], '.2f'):>8}")
    verdict = {True: "yes", False: "NO"}
    print(f"{'every byte correct':34}" + "".join(f"{verdict[res['bytes_correct'][n]]:>15}" for n in names))
    for n in names:
        for p in res["problems"][n]:
            print(f"  {LABELS[n]}: CHECK FAILED {p}")
    print(f"(part took {res['elapsed_s']:.0f} s)")
