"""Process plumbing for the benchmark: start pinned, wait, measure, kill by pid.

Everything the benchmark starts is registered in :data:`PROCS` and killed
by its own pid (SIGTERM, then SIGKILL) when it is no longer needed or when
the benchmark exits for any reason.  Only loopback addresses are used.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable

PROXY_CPU = 0
LOAD_CPU = 1
PROCS: dict[int, subprocess.Popen] = {}


#: CPUs this process could use when it started.  Read once, before run.py
#: pins itself to the load core: asking later would find only that core and
#: silently run every proxy there too, next to wrk and the backends.
_START_CPUS = frozenset(os.sched_getaffinity(0))


class BenchError(Exception):
    """A step of the benchmark could not be done; the message says why."""


def cpus_available() -> bool:
    """True when both the proxy core and the load core exist here."""
    return len(_START_CPUS) >= 2 and {PROXY_CPU, LOAD_CPU} <= _START_CPUS


def pin(cpu: int) -> list[str]:
    """The taskset prefix for a command (empty on a one-core machine)."""
    return ["taskset", "-c", str(cpu)] if cpus_available() else []


def raise_fd_limit() -> None:
    """1,000 idle connections through a proxy need a few thousand fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cpu: int, env: dict | None = None, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``cmd`` pinned to ``cpu`` and remember its pid for cleanup."""
    full = pin(cpu) + cmd
    proc = subprocess.Popen(full, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    PROCS[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen | None, grace: float = 3.0) -> None:
    """Terminate one process we started, by its pid, and reap it."""
    if proc is None:
        return
    PROCS.pop(proc.pid, None)
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(grace)


def stop_all() -> None:
    """Kill every process still registered (at exit, on errors, on ^C)."""
    for proc in list(PROCS.values()):
        stop(proc, grace=1.0)


def listening(port: int) -> bool:
    """Is some socket in LISTEN state on ``port`` (any local address)?

    Looked up in /proc instead of by connecting, because a test connection
    through a proxy would reach the backend (iperf3 takes it for a client).
    """
    hexport = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(hexport) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    """Wait for ``port`` to listen; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with status {proc.returncode} before listening on {port}")
        time.sleep(0.02)
    raise BenchError(f"nothing listens on port {port} after {timeout:g} s")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all of its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _proc_field(path: str, name: str) -> int:
    """The number after ``name`` on its line of a /proc text file (0 if absent or unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid``'s whole process tree, in kB."""
    return sum(_proc_field(f"/proc/{p}/smaps_rollup", "Pss:") for p in process_tree(pid))


def median(values: list[float]) -> float | None:
    """Median of the values that were measured (None if none were)."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def tree_cpu_seconds(pid: int | None) -> float:
    """utime + stime of ``pid`` and its descendants (all threads), seconds (0 for no pid)."""
    if pid is None:
        return 0.0
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / _HZ


_HZ = os.sysconf("SC_CLK_TCK")


def tree_sleeps(pid: int | None) -> int:
    """Voluntary context switches of ``pid``'s process tree, all threads (0 for no pid):
    how often it went to sleep and so had to be woken again."""
    if pid is None:
        return 0
    total = 0
    for p in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        total += sum(_proc_field(f"/proc/{p}/task/{t}/status", "voluntary_ctxt_switches:") for t in tasks)
    return total


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds ``cpu`` has spent not idle since boot (user, system, irq, softirq, steal), from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                fields = [int(x) for x in line.split()[1:9]]
                return (sum(fields) - fields[3] - fields[4]) / _HZ
    return 0.0


# -- rounds: order, disturbance, ratios ----------------------------------------
#
# Rounds go forward and backward in turn (A B, B A, A B ...), so a contender
# that ran first in one round runs last in the next and a slow drift of the
# machine falls on both sides alike; the two sides of each goal ratio run
# next to each other.  Every ratio row keeps each round's own ratio (from
# that round's two runs), and the row's figure is, by what kept it
# steadiest in repeated runs on the shared 2-core machine (bench/FINDINGS,
# "How a ratio is computed"):
#
# * for rates (conn/s), the median of the per-round ratios: a busy machine
#   slows both runs of a round alike (their rates correlate, 0.5-0.8), and
#   dividing within the round cancels that;
# * for CPU per connection, the ratio of the two sides' medians: a run's
#   CPU figure wanders on its own (correlation with its neighbour about
#   0-0.4), the median of each side drops its own outliers, and pairing
#   narrowed these rows in only 6 of 15 measured cases.
#
# The lowest and highest per-round ratio are printed with every row.  Each
# run also records what else the machine did while it ran (steal, CPU used
# by processes that are not part of the bench) and a run with too much of
# it is marked disturbed.

#: Figures whose ratio is the median of per-round ratios (the others: ratio of medians).
PAIRED_FIGURES = frozenset({"rate"})

#: The kernel's thread daemon: every kernel thread is its child.
KTHREADD = 2
#: A run is marked disturbed when other processes used more than this share
#: of the machine's CPU time (percent of all cores) while it ran ...
FOREIGN_LIMIT = 10.0
#: ... or the hypervisor took more than this share (steal, percent).
STEAL_LIMIT = 2.0


def round_order(names, r: int) -> list:
    """The order of round ``r`` (0-based): forward on even rounds, backward on odd ones."""
    names = list(names)
    return names if r % 2 == 0 else names[::-1]


def _proc_stat() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])                # guest time is already counted in user and nice
    return total - idle - steal, steal, total


class Disturbance:
    """What the rest of the machine did during one measured run.

    ``start()`` before the run, ``stop()`` after it; ``proxy_pid`` is the
    measured proxy (HAProxy detaches, so it is not one of our children).
    ``result()`` gives steal and foreign CPU as percent of the machine.
    Foreign CPU is the machine's busy time minus the CPU of this process,
    everything it started (live or reaped: wrk, nginx, gbalance), the
    proxy's process tree and the kernel's own threads (ksoftirqd and
    kworkers carry part of the loopback traffic the bench itself makes;
    their share is recorded as ``kernel_threads_percent``).
    """

    def __init__(self, proxy_pid: int | None = None) -> None:
        self.proxy_pid = proxy_pid

    def _ours(self) -> float:
        t = os.times()
        own = tree_cpu_seconds(os.getpid()) + t.children_user + t.children_system
        if self.proxy_pid is not None and self.proxy_pid not in process_tree(os.getpid()):
            own += tree_cpu_seconds(self.proxy_pid)
        return own

    def start(self) -> "Disturbance":
        self.stat0, self.ours0, self.kernel0 = _proc_stat(), self._ours(), tree_cpu_seconds(KTHREADD)
        return self

    def stop(self) -> "Disturbance":
        self.stat1, self.ours1, self.kernel1 = _proc_stat(), self._ours(), tree_cpu_seconds(KTHREADD)
        return self

    def result(self) -> dict:
        busy, steal, total = (b - a for a, b in zip(self.stat0, self.stat1))
        if total <= 0:
            return {"foreign_cpu_percent": None, "steal_percent": None, "kernel_threads_percent": None,
                    "disturbed": False}
        seconds = total / _HZ
        kernel = self.kernel1 - self.kernel0
        foreign = max(0.0, 100.0 * (busy / _HZ - (self.ours1 - self.ours0) - kernel) / seconds)
        st = 100.0 * steal / total
        return {"foreign_cpu_percent": round(foreign, 1), "steal_percent": round(st, 1),
                "kernel_threads_percent": round(100.0 * kernel / seconds, 1),
                "disturbed": foreign > FOREIGN_LIMIT or st > STEAL_LIMIT}


def print_ratio_method(res: dict) -> None:
    """The two lines that say how a part's ratios were computed and how many runs were disturbed."""
    print("ratios: CPU ratio of the medians, rates median of each round's own ratio (its two runs ran"
          " next to each other); in brackets the lowest and highest round's own ratio")
    if res.get("disturbed_runs"):
        print(f"({res['disturbed_runs']} runs were disturbed by other load or steal: see the json's raw entries)")


def paired_ratio(a_runs: list[dict], b_runs: list[dict], key: str) -> dict:
    """The ratio row a[key] / b[key] over rounds (see the comment above).

    Returns ``value`` (the row's figure), ``method``, the median of the
    per-round ratios and the ratio of the medians, the lowest and highest
    per-round ratio, every round's ratio (None where one side failed), and
    the median of per-round ratios over the rounds where neither run was
    disturbed (None if there is no such round).
    """
    per: list[float | None] = []
    quiet: list[float] = []
    for a, b in zip(a_runs, b_runs):
        x, y = a.get(key), b.get(key)
        if x is None or not y:
            per.append(None)
            continue
        r = x / y
        per.append(round(r, 4))
        if not a.get("disturbed") and not b.get("disturbed"):
            quiet.append(r)
    got = [r for r in per if r is not None]
    ma, mb = median([a.get(key) for a in a_runs]), median([b.get(key) for b in b_runs])
    of_medians = ma / mb if ma is not None and mb else None
    paired = key in PAIRED_FIGURES
    return {"value": median(got) if paired else of_medians,
            "method": "median of per-round ratios" if paired else "ratio of medians",
            "median": median(got), "ratio_of_medians": of_medians,
            "min": min(got) if got else None, "max": max(got) if got else None,
            "rounds": per, "median_undisturbed": median(quiet) if quiet else None,
            "undisturbed_rounds": len(quiet)}


def fmt_ratio(p: dict | None) -> str:
    """``1.17x (rounds 1.10-1.24)``: a ratio row's figure and its rounds' range."""
    if not p or p.get("value") is None:
        return "n/a"
    if p["min"] is None or round(p["min"], 2) == round(p["max"], 2):
        return f"{p['value']:.2f}x"
    return f"{p['value']:.2f}x (rounds {p['min']:.2f}-{p['max']:.2f})"


def wrk(url: str, seconds: float, conns: int, close: bool = True, strict: bool = False) -> tuple[float, int]:
    """One ``wrk -t1 -c<conns>`` run on the load core: (requests per second, requests completed).

    ``close`` sends ``Connection: close`` (one connection per request).
    More than 1 % non-2xx replies is an error; with ``strict`` so is more
    than 1 % socket errors.
    """
    cmd = pin(LOAD_CPU) + ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    try:
        out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish") from None
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise BenchError(f"wrk printed no rate: {out.strip()[-200:]!r}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad and int(bad.group(1)) > int(total.group(1)) // 100:
        raise BenchError(f"wrk: {bad.group(1)} of {total.group(1)} responses were errors")
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if strict and errs and sum(int(x) for x in errs.groups()) > int(total.group(1)) // 100:
        raise BenchError(f"wrk: {errs.group(0)}")
    return float(rate.group(1)), int(total.group(1))


def iperf3_stream(port: int, seconds: float, reverse: bool = False) -> tuple[float, int]:
    """One iperf3 stream through ``port`` on the load core: (Gbit/s received, bytes received).

    ``reverse`` (iperf3 -R) sends from the server to the client.
    """
    cmd = pin(LOAD_CPU) + ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(max(1, round(seconds))),
                           "-J", "--connect-timeout", "5000"] + (["-R"] if reverse else [])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError("iperf3 did not finish") from None
    try:
        data = json.loads(res.stdout)
    except ValueError:
        raise BenchError(f"iperf3 output unreadable: {res.stdout.strip()[-200:]!r}") from None
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    got = data["end"]["sum_received"]
    return got["bits_per_second"] / 1e9, int(got["bytes"])


class Workdir:
    """A private temporary directory, removed at the end."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="gbalance-bench-"))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- backends (all on the load core) ----------------------------------------

def start_nginx(work: Path) -> tuple[subprocess.Popen, int]:
    """nginx, one process, serving a 100-byte file at /100b."""
    port = free_port()
    root = work / "nginx"
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "www" / "100b").write_bytes(b"a" * 99 + b"\n")
    temps = "\n".join(f"  {k}_temp_path {root / k};" for k in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = root / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
master_process off;
pid {root / 'nginx.pid'};
error_log {root / 'error.log'};
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temps}
  server {{ listen 127.0.0.1:{port}; root {root / 'www'}; }}
}}
""")
    proc = start(["nginx", "-e", str(root / "error.log"), "-c", str(conf), "-p", str(root) + "/"], LOAD_CPU)
    wait_listening(port, proc)
    return proc, port


def start_iperf3() -> tuple[subprocess.Popen, int]:
    """A persistent iperf3 server."""
    port = free_port()
    proc = start(["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1"], LOAD_CPU)
    wait_listening(port, proc)
    return proc, port


def start_greeter() -> tuple[subprocess.Popen, int]:
    """bench/servers.py greeter: greets each connection, then holds it."""
    port = free_port()
    proc = start([PYTHON, str(BENCH / "servers.py"), "greeter", str(port)], LOAD_CPU)
    wait_listening(port, proc)
    return proc, port


# -- proxies (on the proxy core) ----------------------------------------------

class Proxy:
    """One proxy instance forwarding ``port`` to ``backend`` on 127.0.0.1."""

    name = "?"

    def __init__(self, work: Path, backend: int):
        self.work = work
        self.backend = backend
        self.port = backend
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Proxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Direct connection: nothing to start."""

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Direct(Proxy):
    """No proxy: clients talk to the backend itself."""

    name = "direct"


class GBalance(Proxy):
    """``balance -f PORT 127.0.0.1:BACKEND`` from the venv, state in a temp dir."""

    name = "gbalance"

    def __init__(self, work: Path, backend: int, args: list[str] | None = None,
                 channels: list[str] | None = None):
        super().__init__(work, backend)
        self.args = args or []
        self.channels = channels or [f"127.0.0.1:{backend}"]
        self.stderr_path = work / f"gbalance-{os.getpid()}-{time.monotonic_ns()}.err"

    def start(self) -> None:
        # A port free when asked may be taken as some client's ephemeral
        # port before balance binds it (other processes connecting meanwhile):
        # then try another, at most three times.
        for attempt in range(3):
            self.port = free_port()
            state = self.work / f"state-{self.port}"
            state.mkdir(exist_ok=True)
            env = dict(os.environ, BALANCE_STATE_DIR=str(state))
            cmd = [PYTHON, "-m", "gbalance", "-f", *self.args, str(self.port), *self.channels]
            self.err = open(self.stderr_path, "wb")
            self.proc = start(cmd, PROXY_CPU, env=env, stderr=self.err)
            try:
                wait_listening(self.port, self.proc)
                break
            except BenchError as exc:
                stop(self.proc)
                self.err.close()
                first = self.stderr_text().strip().splitlines()
                last = first[-1] if first else str(exc)
                if "Address already in use" not in last or attempt == 2:
                    raise BenchError(f"gbalance did not start: {last}") from None
        pin_tree(self.proc.pid, PROXY_CPU)

    def stop(self) -> None:
        super().stop()
        if getattr(self, "err", None) is not None:
            self.err.close()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


def pin_tree(pid: int, cpu: int | set[int]) -> None:
    """Pin every thread of a process tree to ``cpu`` (or a set of CPUs) and check that it held."""
    if not cpus_available():
        return
    cpus = {cpu} if isinstance(cpu, int) else set(cpu)
    for p in process_tree(pid):
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                os.sched_setaffinity(int(tid), cpus)
        except (OSError, ValueError):
            continue
        if os.sched_getaffinity(p) != cpus:
            raise BenchError(f"pid {p} is not pinned to CPUs {sorted(cpus)}")


class Daemon:
    """A daemon known by its pidfile, with the part of Popen's interface we use.

    HAProxy is measured as it is deployed, detached (``-D``): in foreground
    debug mode (``-db``) it ran about 20 % slower here.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        self.returncode = 0
            except (OSError, IndexError):
                self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


class HAProxy(Proxy):
    """Debian's HAProxy in ``mode tcp``, one thread, no splice, foreground."""

    name = "haproxy"
    threads = 1                 # nbthread (bench/workers.py also runs 2)
    cpus: int | set[int] = PROXY_CPU
    #: The global lines on splicing and the connection cap (bench/bulk.py splices).
    splice_lines = "    maxconn 8000\n    nosplice\n"
    defaults_extra = ""

    def start(self) -> None:
        self.port = free_port()
        conf = self.work / f"{self.name}-{self.port}.cfg"
        conf.write_text(f"""global
    nbthread {self.threads}
{self.splice_lines}defaults
    mode tcp
{self.defaults_extra}    timeout connect 5s
    timeout client 5m
    timeout server 5m
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend be
backend be
    server s1 127.0.0.1:{self.backend}
""")
        pidfile = self.work / f"{self.name}-{self.port}.pid"
        launcher = start(["haproxy", "-D", "-p", str(pidfile), "-f", str(conf)], PROXY_CPU)
        launcher.wait(15)
        PROCS.pop(launcher.pid, None)
        if launcher.returncode != 0 or not pidfile.exists():
            raise BenchError(f"haproxy did not start (exit {launcher.returncode})")
        daemon = Daemon(int(pidfile.read_text().split()[0]))
        PROCS[daemon.pid] = daemon
        self.proc = daemon
        wait_listening(self.port, self.proc)
        # HAProxy's daemon does not keep taskset's CPU: it came up on the
        # load core (sharing it with wrk and nginx) until pinned here.
        pin_tree(daemon.pid, self.cpus)


PROXIES = {"direct": Direct, "gbalance": GBalance, "haproxy": HAProxy}


def haproxy_version() -> str:
    """First line of ``haproxy -v`` (to record what was compared)."""
    try:
        out = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    return out.splitlines()[0] if out else "unknown"


def print_rate_report(micro: dict[str, float], results: dict, count: int, rounds: int,
                      label_width: int, mode_width: int) -> None:
    """The report of a micro-benchmark plus interleaved short-connection rounds
    (bench/proxyproto_rate.py, bench/frontdoor_rate.py): ``micro`` maps a
    name to nanoseconds, ``results`` a mode to (conn/s per round, CPU us per
    connection per round)."""
    for what, ns in micro.items():
        print(f"{what:{label_width}} {ns / 1000:7.2f} us")
    print(f"{count} sequential short connections, {rounds} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    rounds_width = 6 * max(rounds, 1) + 16
    print(f"{'mode':{mode_width}} {'conn/s median':>14} {'all rounds':>{rounds_width}}"
          f" {'proxy CPU us/conn median':>25} {'min':>6}")
    for mode, (rates, cpus) in results.items():
        med = sorted(rates)[len(rates) // 2]
        cmed = sorted(cpus)[len(cpus) // 2]
        spread = " ".join(f"{r:.0f}" for r in rates)
        print(f"{mode:{mode_width}} {med:14.0f} {spread:>{rounds_width}} {cmed:25.1f} {min(cpus):6.1f}")
