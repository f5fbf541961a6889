#!/usr/bin/env python3
"""`make soak`: mixed traffic against a real master, then the bill.

Two parts (``--only soak,scale``, both by default):

soak
    One master (``balance -f``) in front of two channels of a test backend
    (a separate process).  Worker threads run, until ``--seconds``
    (``$SOAK_SECONDS``, default 180) are up: short echo exchanges, bulk
    uploads and downloads of 0.5-6 MB with an urgent byte in the middle,
    half-closed echo exchanges, client resets, backend resets; a set of
    idle connections is held throughout and checked at the end; a control
    thread keeps changing the table with ``balance -c`` (disable, enable,
    maxc).  Every transfer is checked (byte count and SHA-256).  Reported:
    bytes checked, bytes lost or corrupted (goal 0), resets that arrived as
    clean ends, urgent bytes relayed, failed connections, and the master's
    fds, RSS and PSS before and after (with the idle connections held both
    times), and the largest CPU share of the idle master over 1-second
    windows.

scale
    A master started with the usual soft fd limit of 1024 and a hard limit
    of 20,000 (it raises its own soft limit) holds ``--scale`` (default
    9,000) idle proxied connections, each checked by an echo round trip
    when opened and again at the end.  Reported: memory (PSS and RSS) per
    connection and the master's fds.

Everything runs on 127.0.0.1, every process started here is killed by its
pid, every loop is bounded by a deadline.  Results: printed, and
bench/results/soak.json.

Usage: bench/soak.py [--only soak,scale] [--seconds S] [--workers N] [--idle N] [--scale N]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import resource
import select
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib import (BENCH, PYTHON, PROCS, ROOT, BenchError, Workdir, free_port, pss_kb, stop,  # noqa: E402
                 stop_all, wait_listening)

LINGER_RESET = struct.pack("ii", 1, 0)
TICKS = os.sysconf("SC_CLK_TCK")
IO_TIMEOUT = 30.0
CONTROL_OPS = ("disable 1", "enable 1", "maxc 0 4", "maxc 0 0", "disable 0", "enable 0")


# -- test data ---------------------------------------------------------------------------

def data(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes: either end can make them again."""
    return random.Random(seed).randbytes(size)


def read_line(sock: socket.socket, limit: int = 200) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf.strip()


def recv_stream(sock: socket.socket, deadline: float) -> tuple[bytes, int, bool]:
    """Read to the end, taking urgent bytes before a read can step over them.

    Returns (normal bytes, urgent bytes seen, ended by a reset).
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    out, urgent = bytearray(), 0
    while time.monotonic() < deadline:
        events = poller.poll(500)
        if not events:
            continue
        ev = events[0][1]
        try:
            if ev & select.POLLPRI:
                with contextlib.suppress(BlockingIOError):
                    try:
                        urgent += len(sock.recv(1, socket.MSG_OOB))
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
            if ev & ~select.POLLPRI:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return bytes(out), urgent, False
                out += chunk
        except ConnectionResetError:
            return bytes(out), urgent, True
    raise TimeoutError("no end of stream before the deadline")


def send_with_urgent(sock: socket.socket, payload: bytes) -> None:
    half = len(payload) // 2
    sock.sendall(payload[:half])
    sock.send(b"!", socket.MSG_OOB)
    sock.sendall(payload[half:])


# -- the backend (a separate process) ---------------------------------------------------

class ModeBackend:
    """Thread per connection; the client's first line picks what happens.

    ``echo``: echo to the end.  ``sink``: read to the end (urgent bytes
    apart), answer ``count sha256 urgent``.  ``source SEED N``: send N bytes
    with an urgent byte in the middle, then close.  ``rst SEED N``: send N
    bytes, then reset.  ``stats`` (connected directly): the counters.
    """

    def __init__(self, ports: list[int]):
        self.stats = {"client_resets_seen": 0, "client_resets_hidden": 0}
        self.lock = threading.Lock()
        self.listeners = []
        for port in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(1024)
            self.listeners.append(s)

    def serve(self) -> None:
        for s in self.listeners[1:]:
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        self._accept(self.listeners[0])

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        deadline = time.monotonic() + 120
        try:
            with conn:
                words = read_line(conn).split()
                if not words:
                    return
                mode = words[0]
                if mode == b"echo":
                    conn.settimeout(None)      # idle connections stay until the client leaves
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        conn.sendall(chunk)
                elif mode in (b"sink", b"sinkrst"):
                    body, urgent, was_reset = recv_stream(conn, deadline)
                    if mode == b"sinkrst":
                        with self.lock:
                            self.stats["client_resets_seen" if was_reset else "client_resets_hidden"] += 1
                        return
                    conn.sendall(b"%d %s %d\n" % (len(body), hashlib.sha256(body).hexdigest().encode(), urgent))
                elif mode == b"source":
                    send_with_urgent(conn, data(int(words[1]), int(words[2])))
                elif mode == b"rst":
                    conn.sendall(data(int(words[1]), int(words[2])))
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                elif mode == b"stats":
                    with self.lock:
                        conn.sendall(json.dumps(self.stats).encode() + b"\n")
        except (OSError, TimeoutError):
            pass


def serve_echo_selectors(port: int) -> None:
    """A one-thread echo server for tens of thousands of idle connections."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s is lsock:
                for _ in range(64):
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                with contextlib.suppress(OSError):
                    s.send(chunk)
            else:
                sel.unregister(s)
                s.close()


# -- the master --------------------------------------------------------------------------

def raise_own_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_master(work: Path, port: int, channels: list[str], soft_limit: int | None = None) -> subprocess.Popen:
    state = work / f"state-{port}"
    state.mkdir(exist_ok=True)
    env = dict(os.environ, BALANCE_STATE_DIR=str(state))

    def limit() -> None:
        if soft_limit is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft_limit, hard), hard))

    err = open(work / f"master-{port}.err", "wb")
    # With a soft limit to start from, -d makes the master log what it raised it to.
    flags = ["-f", "-d"] if soft_limit is not None else ["-f"]
    proc = subprocess.Popen([PYTHON, "-m", "gbalance", *flags, str(port), *channels],
                            env=env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                            preexec_fn=limit, cwd=ROOT)
    err.close()
    PROCS[proc.pid] = proc
    wait_listening(port, proc)
    return proc


def start_helper(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, str(Path(__file__).resolve()), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_own_fd_limit)
    PROCS[proc.pid] = proc
    return proc


@dataclass
class ProcSample:
    fds: int
    rss_kb: int
    pss_kb: int
    cpu_s: float


def sample(pid: int) -> ProcSample:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return ProcSample(fds, rss, pss_kb(pid), cpu_seconds(pid))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def idle_cpu_max_share(pid: int, windows: int = 5) -> float:
    """The largest CPU share (0-1) of ``pid`` over ``windows`` 1-second windows."""
    worst = 0.0
    for _ in range(windows):
        a, t = cpu_seconds(pid), time.monotonic()
        time.sleep(1.0)
        worst = max(worst, (cpu_seconds(pid) - a) / (time.monotonic() - t))
    return worst


# -- soak --------------------------------------------------------------------------------

@dataclass
class Tally:
    """What the workers saw; updated under ``lock``."""

    connections: int = 0
    failed: int = 0
    bytes_checked: int = 0
    bytes_lost_or_corrupted: int = 0
    corrupt_transfers: int = 0
    urgent_sent: int = 0
    urgent_relayed: int = 0
    backend_resets_seen: int = 0
    backend_resets_hidden: int = 0
    control_changes: int = 0
    control_errors: int = 0
    kinds: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)


class Soak:
    def __init__(self, port: int, seconds: float, workers: int, backend_port: int):
        self.port = port
        self.seconds = seconds
        self.workers = workers
        self.backend_port = backend_port
        self.tally = Tally()
        self.lock = threading.Lock()
        self.deadline = 0.0

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self.tally, k, getattr(self.tally, k) + v)

    def note_error(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.tally.failed += 1
            if len(self.tally.errors) < 20:
                self.tally.errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    def connect(self, mode: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
        s.sendall(mode + b"\n")
        return s

    def check(self, expected: bytes, got: bytes) -> None:
        ok = hashlib.sha256(expected).digest() == hashlib.sha256(got).digest()
        self.add(bytes_checked=len(expected))
        if not ok:
            lost = max(len(expected) - len(got), 0) or len(expected)
            self.add(bytes_lost_or_corrupted=lost, corrupt_transfers=1)

    # The kinds of traffic ----------------------------------------------------------

    def short(self, rng: random.Random) -> None:
        payload = data(rng.getrandbits(32), rng.randint(1, 2000))
        with self.connect(b"echo") as s:
            s.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        self.check(payload, bytes(got))

    def half_close(self, rng: random.Random) -> None:
        payload = data(rng.getrandbits(32), rng.randint(10_000, 600_000))
        with self.connect(b"echo") as s:
            writer = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            writer.start()
            got, _, _ = recv_stream(s, time.monotonic() + IO_TIMEOUT)
            writer.join(IO_TIMEOUT)
        self.check(payload, got)

    def upload(self, rng: random.Random) -> None:
        payload = data(rng.getrandbits(32), rng.randint(500_000, 6_000_000))
        with self.connect(b"sink") as s:
            send_with_urgent(s, payload)
            s.shutdown(socket.SHUT_WR)
            count, digest, urgent = read_line(s).split()
        self.add(urgent_sent=1, urgent_relayed=int(urgent), bytes_checked=len(payload))
        if int(count) != len(payload) or digest.decode() != hashlib.sha256(payload).hexdigest():
            self.add(bytes_lost_or_corrupted=max(len(payload) - int(count), 0) or len(payload),
                     corrupt_transfers=1)

    def download(self, rng: random.Random) -> None:
        seed, size = rng.getrandbits(32), rng.randint(500_000, 6_000_000)
        with self.connect(b"source %d %d" % (seed, size)) as s:
            got, urgent, _ = recv_stream(s, time.monotonic() + IO_TIMEOUT)
        self.add(urgent_sent=1, urgent_relayed=urgent)
        self.check(data(seed, size), got)

    def client_reset(self, rng: random.Random) -> None:
        with self.connect(b"sinkrst") as s:
            s.sendall(data(rng.getrandbits(32), rng.randint(1000, 300_000)))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)

    def backend_reset(self, rng: random.Random) -> None:
        seed, size = rng.getrandbits(32), rng.randint(1000, 200_000)
        with self.connect(b"rst %d %d" % (seed, size)) as s:
            got, _, was_reset = recv_stream(s, time.monotonic() + IO_TIMEOUT)
        # What arrived before the reset must be the start of what was sent.
        expected = data(seed, size)[:len(got)]
        self.check(expected, got)
        self.add(backend_resets_seen=int(was_reset), backend_resets_hidden=int(not was_reset))

    KINDS = (("short", 10), ("half_close", 3), ("upload", 2), ("download", 2),
             ("client_reset", 2), ("backend_reset", 2))

    def worker(self, n: int) -> None:
        rng = random.Random(n)
        names = [k for k, w in self.KINDS for _ in range(w)]
        while time.monotonic() < self.deadline:
            kind = rng.choice(names)
            try:
                getattr(self, kind)(rng)
                with self.lock:
                    self.tally.connections += 1
                    self.tally.kinds[kind] = self.tally.kinds.get(kind, 0) + 1
            except (OSError, TimeoutError, ValueError) as exc:
                self.note_error(kind, exc)

    def control(self, env: dict) -> None:
        i = 0
        while time.monotonic() < self.deadline:
            op = CONTROL_OPS[i % len(CONTROL_OPS)]
            i += 1
            r = subprocess.run([PYTHON, "-m", "gbalance", "-c", op, str(self.port)], env=env,
                               capture_output=True, text=True, timeout=30, cwd=ROOT)
            self.add(control_changes=1, control_errors=int(r.returncode != 0 or "rror" in r.stdout))
            time.sleep(1.0)
        # Leave both channels enabled and unlimited.
        for op in ("enable 0", "enable 1", "maxc 0 0", "maxc 1 0"):
            subprocess.run([PYTHON, "-m", "gbalance", "-c", op, str(self.port)], env=env,
                           capture_output=True, timeout=30, cwd=ROOT)

    def run(self, env: dict) -> None:
        self.deadline = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.worker, args=(n,)) for n in range(self.workers)]
        threads.append(threading.Thread(target=self.control, args=(env,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 4 * IO_TIMEOUT)


def hold_idle(port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        s.sendall(b"echo\n")
        held.append(s)
    return held


def check_idle(held: list[socket.socket]) -> int:
    """Round-trip every held connection; the number that failed."""
    bad = 0
    for i, s in enumerate(held):
        msg = b"idle %d\n" % i
        try:
            s.sendall(msg)
            if read_line(s) != msg.strip():
                bad += 1
        except OSError:
            bad += 1
    return bad


def soak(args: argparse.Namespace, work: Workdir, log) -> dict:
    ports = [free_port(), free_port()]
    backend = start_helper("--serve-modes", *map(str, ports))
    for p in ports:
        wait_listening(p, backend)
    port = free_port()
    master = start_master(work.path, port, [f"127.0.0.1:{p}" for p in ports])
    env = dict(os.environ, BALANCE_STATE_DIR=str(work.path / f"state-{port}"))
    runner = Soak(port, args.seconds, args.workers, ports[0])
    try:
        held = hold_idle(port, args.idle)
        for _ in range(50):                      # warm up: lazily made objects exist
            runner.short(random.Random(0))
        time.sleep(1.0)
        before = sample(master.pid)
        log(f"soak: {args.seconds:g} s, {args.workers} workers, {args.idle} idle connections;"
            f" master {before.fds} fds, RSS {before.rss_kb} kB")
        runner.run(env)
        time.sleep(2.0)                           # closing connections settle
        idle_failed = check_idle(held)
        idle_share = idle_cpu_max_share(master.pid)
        after = sample(master.pid)
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=IO_TIMEOUT) as s:
            s.sendall(b"stats\n")
            stats = json.loads(read_line(s, 1000) or b"{}")
        for s in held:
            s.close()
        alive = master.poll() is None
    finally:
        stop(master)
        stop(backend)
    t = runner.tally
    return {"seconds": args.seconds, "workers": args.workers, "idle_connections": args.idle,
            "tally": asdict(t), "client_resets_seen_by_backend": stats.get("client_resets_seen"),
            "client_resets_hidden": stats.get("client_resets_hidden"),
            "idle_connections_failed": idle_failed, "master_alive": alive,
            "before": asdict(before), "after": asdict(after),
            "idle_cpu_max_share": round(idle_share, 4)}


def scale(args: argparse.Namespace, work: Workdir, log) -> dict:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = 2 * args.scale + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(f"{args.scale} connections need a hard fd limit of {need} (have {hard})")
    bport = free_port()
    backend = start_helper("--serve-echo", str(bport))
    wait_listening(bport, backend)
    port = free_port()
    master = start_master(work.path, port, [f"127.0.0.1:{bport}"], soft_limit=1024)
    held: list[socket.socket] = []
    try:
        with open(f"/proc/{master.pid}/limits") as f:
            soft = next(int(line.split()[3]) for line in f if line.startswith("Max open files"))
        for s in hold_idle(port, 20):
            s.close()
        time.sleep(0.5)
        before = sample(master.pid)
        t0 = time.monotonic()
        for i in range(args.scale):
            s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
            held.append(s)
            msg = b"hello %d\n" % i
            s.sendall(msg)
            if read_line(s) != msg.strip():
                raise BenchError(f"connection {i} got no echo")
        opened_s = time.monotonic() - t0
        time.sleep(1.0)
        with_conns = sample(master.pid)
        failed = check_idle(held)
        alive = master.poll() is None
    finally:
        for s in held:
            s.close()
        stop(master)
        stop(backend)
    n = args.scale
    return {"connections": n, "failed_round_trips": failed, "master_alive": alive,
            "master_soft_fd_limit": soft, "open_seconds": round(opened_s, 1),
            "before": asdict(before), "with_connections": asdict(with_conns),
            "pss_kb_per_conn": round((with_conns.pss_kb - before.pss_kb) / n, 2),
            "rss_kb_per_conn": round((with_conns.rss_kb - before.rss_kb) / n, 2)}


def report(result: dict) -> None:
    s = result.get("soak")
    if s:
        t = s["tally"]
        print()
        print(f"Soak: {s['seconds']:g} s, {s['workers']} workers, {s['idle_connections']} idle connections held")
        print(f"  connections            {t['connections']:,} ({', '.join(f'{k} {v}' for k, v in sorted(t['kinds'].items()))})")
        print(f"  failed connections     {t['failed']}")
        print(f"  bytes checked          {t['bytes_checked']:,}")
        print(f"  bytes lost/corrupted   {t['bytes_lost_or_corrupted']:,} in {t['corrupt_transfers']} transfers (goal 0)")
        print(f"  urgent bytes relayed   {t['urgent_relayed']} of {t['urgent_sent']}")
        print(f"  backend resets         {t['backend_resets_seen']} seen as resets, {t['backend_resets_hidden']} as clean ends")
        print(f"  client resets          {s['client_resets_seen_by_backend']} seen as resets, {s['client_resets_hidden']} as clean ends")
        print(f"  control changes        {t['control_changes']} ({t['control_errors']} errors)")
        print(f"  idle connections       {s['idle_connections_failed']} of {s['idle_connections']} failed the final round trip")
        b, a = s["before"], s["after"]
        print(f"  master fds             {b['fds']} before, {a['fds']} after")
        print(f"  master RSS             {b['rss_kb']:,} kB before, {a['rss_kb']:,} kB after (PSS {b['pss_kb']:,} -> {a['pss_kb']:,})")
        print(f"  idle master CPU        at most {100 * s['idle_cpu_max_share']:.1f}% of a core (1 s windows)")
        for e in t["errors"][:10]:
            print(f"  error: {e}")
    c = result.get("scale")
    if c:
        print()
        print(f"Scale: {c['connections']:,} idle proxied connections, master started with soft limit 1024 "
              f"(raised to {c['master_soft_fd_limit']}), opened in {c['open_seconds']} s")
        print(f"  failed round trips     {c['failed_round_trips']}")
        print(f"  master fds             {c['with_connections']['fds']:,}")
        print(f"  memory per connection  {c['pss_kb_per_conn']} kB PSS, {c['rss_kb_per_conn']} kB RSS")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="gbalance soak test and connection-scale measure")
    p.add_argument("--only", default="soak,scale")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 180)))
    p.add_argument("--workers", type=int, default=int(os.environ.get("SOAK_WORKERS", 12)))
    p.add_argument("--idle", type=int, default=int(os.environ.get("SOAK_IDLE", 200)))
    p.add_argument("--scale", type=int, default=int(os.environ.get("SOAK_SCALE", 9000)))
    p.add_argument("--output", default=str(BENCH / "results" / "soak.json"))
    p.add_argument("--serve-modes", nargs="+", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.serve_modes:
        ModeBackend(args.serve_modes).serve()
        return 0
    if args.serve_echo:
        serve_echo_selectors(args.serve_echo)
        return 0
    raise_own_fd_limit()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    parts = [x for x in args.only.split(",") if x]
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": []}
    work = Workdir()
    try:
        if "soak" in parts:
            result["soak"] = soak(args, work, log)
        if "scale" in parts:
            log(f"scale: {args.scale} idle connections ...")
            result["scale"] = scale(args, work, log)
    except (BenchError, OSError) as exc:
        result["errors"].append(str(exc))
        print(f"soak: {exc}", file=sys.stderr)
    finally:
        stop_all()
        work.close()
    report(result)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {out}")
    s = result.get("soak", {})
    bad = result["errors"] or (s and s["tally"]["bytes_lost_or_corrupted"])
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
