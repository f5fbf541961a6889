"""System calls per proxied connection, counted with strace on the real CLI.

The per-connection cost of gbalance is mostly user space, but every system
call saved is one the kernel never has to do; these tests hold the cuts:

* a wake-up of the listener that finds one client does not end with an
  accept() failing with EAGAIN (its exception cost ~5k instructions per
  wake-up): Linux's TCP_INFO of the listener says the queue is empty;
* a short connection (client speaks first, backend answers and closes)
  costs no more system calls than the budget below, counted from the
  first accept to the last close.  Waits (epoll_wait) are left out: how
  many wake-ups a connection takes depends on timing (whether the
  backend's end arrives with its reply or after it), the work does not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import BALANCE, ROOT, OneShotBackend, eventually, free_port, pid_alive, wait_listening

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("strace") is None,
                                reason="needs Linux and strace")

#: Connections made one after the other (each waits for its reply).
N = 40
#: System calls of the proxy per short connection other than epoll_wait,
#: sequential clients.  Measured 2026-12-04: 23.0-23.1 (accept4, getsockopt
#: TCP_INFO of the listener, getsockname, F_SETOWN, poll, recvfrom, socket,
#: 2 setsockopt, F_SETOWN, connect, sendto, 2-3 epoll_ctl ADD, TCP_INFO,
#: recvfrom, sendto, shutdown, epoll_ctl DEL/MOD, recvfrom, 2 close); the
#: budget leaves room for a reply and end that arrive apart.
BUDGET = 24.5



def _strace_works(tmp_path) -> bool:
    res = subprocess.run(["strace", "-f", "-qq", "-o", str(tmp_path / "probe"), "true"], capture_output=True,
                         timeout=30)
    return res.returncode == 0


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def traced_run(tmp_path, extra: list[str] | None = None) -> list[str]:
    """Proxy N short connections through ``balance -f`` under strace; the
    trace lines of every connection's system calls (first accept on)."""
    if not _strace_works(tmp_path):
        pytest.fail("strace is installed but cannot trace here (ptrace refused?)")
    backend = OneShotBackend()
    port = free_port()
    trace = tmp_path / "trace"
    env = dict(os.environ, BALANCE_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), *BALANCE, "-f", *(extra or []), str(port),
                             f"127.0.0.1:{backend.port}"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, timeout=60)
        for _ in range(N):
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
            assert got == b"a" * 99 + b"\n"
        time.sleep(0.5)                     # the last link's close is traced
    finally:
        # strace detaches on SIGTERM and leaves its tracee running: stop the
        # traced balance itself (strace's child), and strace ends with it.
        tracees = _children(proc.pid) or [proc.pid]
        _signal_all(tracees, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            _signal_all(tracees, signal.SIGKILL)
            proc.kill()
            proc.wait(10)
        backend.close()
    assert eventually(lambda: not any(pid_alive(pid) for pid in tracees), 10), "the traced balance outlived the test"
    lines = trace.read_text(errors="replace").splitlines()
    first = next(i for i, line in enumerate(lines) if re.search(r"\baccept4?\(.*= \d+$", line))
    # The last connection's last close: the end of the proxying.
    last = max(i for i, line in enumerate(lines) if re.search(r"\bclose\(\d+\)\s+= 0", line) and i > first)
    return [line for line in lines[first:last + 1] if re.match(r"\d+\s+\w+\(", line)
            and not line.split(None, 1)[1].startswith(("rt_sigreturn", "--- "))]


def calls(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if re.match(rf"\d+\s+{name}\(", line)]


def test_each_wakeup_accepts_without_eagain(tmp_path):
    lines = traced_run(tmp_path)
    accepts = calls(lines, "accept4?")
    failed = [line for line in accepts if "EAGAIN" in line]
    assert len(accepts) - len(failed) == N
    assert failed == [], f"{len(failed)} accept() calls failed with EAGAIN over {N} wake-ups"


def test_short_connection_syscall_budget(tmp_path):
    lines = [line for line in traced_run(tmp_path) if not re.match(r"\d+\s+epoll_wait\(", line)]
    per = len(lines) / N
    by_name: dict[str, int] = {}
    for line in lines:
        name = line.split(None, 1)[1].split("(", 1)[0]
        by_name[name] = by_name.get(name, 0) + 1
    summary = ", ".join(f"{k} {v / N:g}" for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]))
    assert per <= BUDGET, f"{per:.2f} system calls per connection (budget {BUDGET}): {summary}"
