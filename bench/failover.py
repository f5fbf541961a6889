"""Failover benchmark (issue 5): a primary whose connects hang, a live backup.

The primary is a listener with backlog 0 whose accept queue is filled and
never accepted: further SYNs are dropped, so a connect to it hangs exactly
as to a machine that went down.  The backup (group 1) greets each client at
once.  A client connects every 100 ms with a 1 s timeout for the whole run
and records, per connection, success and time to first byte.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import threading
import time

from lib import PYTHON, BenchError, GBalance, Workdir

CLIENT_TIMEOUT = 1.0
CLIENT_PERIOD = 0.1


class HungListener:
    """A loopback port whose connects hang (full accept queue, never accepted)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = fill_queue(self.port)

    def hangs(self, wait: float = 0.5) -> bool:
        """True if a fresh connect is still pending after ``wait`` seconds."""
        return connect_hangs(self.port, wait)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


def fill_queue(port: int) -> list[socket.socket]:
    """Connect to a backlog-0 listener until a connect hangs; keep the fillers."""
    fillers = []
    for _ in range(16):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        if _wait_connected(s, 0.3):
            fillers.append(s)
            continue
        s.close()
        if connect_hangs(port):
            return fillers
    for s in fillers:
        s.close()
    raise BenchError("could not make the primary's connects hang")


def connect_hangs(port: int, wait: float = 0.5) -> bool:
    """True if a fresh connect to ``port`` is still pending after ``wait`` seconds."""
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect_ex(("127.0.0.1", port))
        return not _wait_connected(s, wait)
    finally:
        s.close()


class FailingPrimary:
    """A primary that serves (greets) at first and hangs after ``up_for`` s.

    Going down stops accepting, shrinks the backlog to 0 (``listen`` again
    on the same socket) and fills the queue, so from then on connects hang
    as to a machine that crashed.  Only a connect that lands in the queue
    in the instant between the last accept and the fill could be lost.
    """

    def __init__(self, up_for: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        self.served = 0
        self._down = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._timer = threading.Timer(up_for, self._go_down)
        self._timer.daemon = True

    def start(self) -> None:
        self._thread.start()
        self._timer.start()

    def _serve(self) -> None:
        while not self._down.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                conn.sendall(b"primary\n")
            except OSError:
                pass
            conn.close()
            self.served += 1

    def _go_down(self) -> None:
        self._down.set()
        self._thread.join(1)
        self.sock.listen(0)
        try:
            self.fillers = fill_queue(self.port)
        except BenchError:
            pass

    def close(self) -> None:
        self._timer.cancel()
        self._down.set()
        self._thread.join(1)
        for s in self.fillers:
            s.close()
        self.sock.close()


def _wait_connected(s: socket.socket, timeout: float) -> bool:
    import select
    _, w, _ = select.select([], [s], [], timeout)
    return bool(w) and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def one_client(port: int, out: list, i: int) -> None:
    """Connect, wait for the first byte, all within the client timeout."""
    t0 = time.perf_counter()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    except OSError as exc:
        out[i] = (False, f"connect: {type(exc).__name__}")
        return
    try:
        left = CLIENT_TIMEOUT - (time.perf_counter() - t0)
        if left <= 0:
            out[i] = (False, "timeout")
            return
        s.settimeout(left)
        data = s.recv(16)
        if data:
            out[i] = (True, time.perf_counter() - t0)
        else:
            out[i] = (False, "closed")
    except TimeoutError:
        out[i] = (False, "timeout")
    except OSError as exc:
        out[i] = (False, type(exc).__name__)
    finally:
        s.close()


def client_run(port: int, seconds: float) -> dict:
    """One connection every 100 ms for ``seconds``; summary of the results."""
    n = int(round(seconds / CLIENT_PERIOD))
    out: list = [None] * n
    threads = []
    start = time.perf_counter()
    for i in range(n):
        delay = start + i * CLIENT_PERIOD - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one_client, args=(port, out, i), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(CLIENT_TIMEOUT + 2)
    return summarize(out)


def summarize(out: list) -> dict:
    """Failures (with reasons), median and p99 time to first byte in ms."""
    ok = sorted(r[1] * 1000 for r in out if r and r[0])
    reasons: dict[str, int] = {}
    for r in out:
        if not r or not r[0]:
            why = r[1] if r else "no result"
            reasons[why] = reasons.get(why, 0) + 1
    res = {"connections": len(out), "failed": len(out) - len(ok), "fail_reasons": reasons}
    if ok:
        res["ttfb_median_ms"] = statistics.median(ok)
        res["ttfb_p99_ms"] = ok[min(len(ok) - 1, int(0.99 * len(ok) + 0.5) - 1)] if len(ok) > 1 else ok[0]
        res["ttfb_max_ms"] = ok[-1]
    # The first second shows the transition (the staggered connect at work).
    first = [r for r in out[: int(1 / CLIENT_PERIOD)]]
    res["first_second"] = [round(r[1] * 1000, 1) if r and r[0] else (r[1] if r else None) for r in first]
    return res


def run(work: Workdir, backup_port: int, seconds: float, log) -> dict:
    """The three scenarios: direct backup, gbalance -m, gbalance without -m."""
    result: dict = {"seconds": seconds, "client_timeout_s": CLIENT_TIMEOUT, "period_s": CLIENT_PERIOD}
    primary = HungListener()
    try:
        if not primary.hangs():
            raise BenchError("the primary's connects do not hang")
        log(f"failover: primary 127.0.0.1:{primary.port} hangs, backup 127.0.0.1:{backup_port}")
        log("failover: direct to the backup ...")
        result["direct"] = client_run(backup_port, seconds)
        channels = [f"127.0.0.1:{primary.port}", "!", f"127.0.0.1:{backup_port}"]
        for name, args in (("gbalance_m", ["-t", "5", "-m", "connect:interval=1"]),
                           ("gbalance_plain", ["-t", "5"])):
            log(f"failover: balance -f {' '.join(args)} PORT primary ! backup ...")
            result[name] = _through(work, backup_port, args, channels, seconds)
            result[name]["args"] = " ".join(args)
    finally:
        primary.close()
    log(f"failover: outage during the run (primary serves for {seconds / 3:g} s, then hangs) ...")
    result["gbalance_m_outage"] = outage(work, backup_port, seconds)
    return result


def outage(work: Workdir, backup_port: int, seconds: float) -> dict:
    """``-m`` with a primary that goes down a third of the way into the run."""
    primary = FailingPrimary(seconds / 3)
    args = ["-t", "5", "-m", "connect:interval=1"]
    proxy = GBalance(work.path, backup_port, args=args,
                     channels=[f"127.0.0.1:{primary.port}", "!", f"127.0.0.1:{backup_port}"])
    try:
        proxy.start()
    except BenchError as exc:
        primary.close()
        return {"error": str(exc)}
    try:
        primary.start()
        res = client_run(proxy.port, seconds)
        res["served_by_primary"] = primary.served
        res["outage_at_s"] = seconds / 3
        res.update(stagger_report(proxy))
    finally:
        proxy.stop()
        primary.close()
    res["suspect_marks"] = suspect_marks(proxy)
    tail = proxy.stderr_text().strip().splitlines()
    if tail:
        res["log_tail"] = tail[-6:]
    res["args"] = " ".join(args)
    return res


def _through(work: Workdir, backup_port: int, args: list[str], channels: list[str], seconds: float) -> dict:
    proxy = GBalance(work.path, backup_port, args=args, channels=channels)
    try:
        proxy.start()
    except BenchError as exc:
        return {"error": str(exc)}
    try:
        res = client_run(proxy.port, seconds)
        if proxy.proc.poll() is not None:
            res["error"] = f"gbalance exited with status {proxy.proc.returncode} during the run"
        else:
            res.update(stagger_report(proxy))
    finally:
        proxy.stop()
    res["suspect_marks"] = suspect_marks(proxy)
    tail = proxy.stderr_text().strip().splitlines()
    if tail:
        res["log_tail"] = tail[-6:]
    return res


def stagger_report(proxy: GBalance) -> dict:
    """Parallel (staggered) connects and current delays, from ``balance -c metrics``."""
    env = dict(os.environ, BALANCE_STATE_DIR=str(proxy.work / f"state-{proxy.port}"))
    try:
        out = subprocess.run([PYTHON, "-m", "gbalance", "-c", "metrics", str(proxy.port)],
                             env=env, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"stagger_error": str(exc)}
    staggered = 0
    delays_ms = []
    for line in out.splitlines():
        m = re.match(r'balance_channel_(staggered_total|stagger_seconds)\{.*group="(\d+)",channel="(\d+)".*\} (\S+)$', line)
        if not m:
            continue
        if m.group(1) == "staggered_total":
            staggered += int(float(m.group(4)))
        else:
            delays_ms.append(round(float(m.group(4)) * 1000, 2))
    return {"staggered_connects": staggered, "stagger_delays_ms": delays_ms}


def suspect_marks(proxy: GBalance) -> int:
    """How many times a channel was marked suspect (the proxy's log)."""
    return proxy.stderr_text().count("suspect: connect still pending")


def healthy_load(work: Workdir, backend_port: int, seconds: float, rate) -> dict:
    """``-m`` over two healthy channels under full wrk load (proxy pinned to its
    core): how many staggered connects and suspect marks that makes (goal 0)."""
    args = ["-t", "5", "-m", "connect:interval=1"]
    proxy = GBalance(work.path, backend_port, args=args,
                     channels=[f"127.0.0.1:{backend_port}", f"127.0.0.1:{backend_port}"])
    try:
        proxy.start()
    except BenchError as exc:
        return {"error": str(exc)}
    try:
        res = {"conn_per_s": rate(proxy, seconds), "args": " ".join(args)}
        res.update(stagger_report(proxy))
    finally:
        proxy.stop()
    res["suspect_marks"] = suspect_marks(proxy)
    return res
