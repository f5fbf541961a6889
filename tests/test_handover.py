"""``balance -r``: a new master takes the listening socket from the running
one, so a restart refuses and cuts nothing; the old one drains its links.

Real ``balance`` processes, real sockets; the control socket's defences are
tried with a process of another uid when the tests run as root.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import eventually, free_port, ipv6_available, listening, pid_alive, read_line
from gbalance.process.handover import control_path
from gbalance.service.health import accept_limit
from gbalance.table.files import StateError, state_path
from gbalance.table.state import SharedState

NOBODY = 65534


def master_pid(balance, port: int) -> int:
    """The pid ``balance -i`` reports (the master a control session reaches)."""
    r = balance.run("-i", str(port), input="quit\n")
    assert r.returncode == 0, r.stderr
    m = re.search(r"PID of master process is (\d+)", r.stdout)
    assert m, r.stdout
    return int(m.group(1))


def reached_pid(balance, port: int) -> int:
    """Like :func:`master_pid` while a hand-over may be under way: 0 in the
    moment between the old master giving up its state file and the new one
    taking it (``-i`` then says "no master process")."""
    r = balance.run("-i", str(port), input="quit\n")
    if r.returncode == 69 and "no master process" in r.stderr:
        return 0
    assert r.returncode == 0, r.stderr
    m = re.search(r"PID of master process is (\d+)", r.stdout)
    assert m, r.stdout
    return int(m.group(1))


def assert_still_in_charge(balance, master, port: int, tag: str) -> None:
    """A failed ``-r`` left ``master`` as it was: running, listening, reached
    by ``-i`` and serving its backend (tagged ``tag``)."""
    assert master.p.poll() is None and listening(port)
    assert master_pid(balance, port) == master.pid
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert read_line(s) == tag


def wait_for(predicate, timeout: float = 15.0) -> bool:
    """:func:`eventually` with a longer default: hand-overs run under load."""
    return eventually(predicate, timeout)


class Load:
    """Opens a connection every 10 ms; each does one request/response round trip."""

    def __init__(self, port: int, tags: set[str]):
        self.port = port
        self.tags = tags
        self.attempts = 0
        self.failures: list[str] = []
        self.max_connect = 0.0
        self.max_round_trip = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Load":
        self.thread.start()
        return self

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            self.attempts += 1
            n = self.attempts
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    t1 = time.monotonic()
                    s.sendall(f"ping {n}\n".encode())
                    with s.makefile("rb") as f:
                        tag = f.readline().decode().strip()
                        echo = f.readline().decode().strip()
                    t2 = time.monotonic()
                if tag not in self.tags or echo != f"ping {n}":
                    self.failures.append(f"#{n}: short or wrong reply {tag!r} {echo!r}")
                self.max_connect = max(self.max_connect, t1 - t0)
                self.max_round_trip = max(self.max_round_trip, t2 - t0)
            except OSError as exc:
                self.failures.append(f"#{n}: {type(exc).__name__}: {exc}")
            next_at += 0.010
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


def backlog(port: int) -> int:
    """The accept backlog of the listener on ``port`` (``ss`` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=10).stdout
    return int(out.split()[2])


def test_restart_loses_no_connection(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    old = balance.start(str(port), a.spec, b.spec, port=port)
    long_link = socket.create_connection(("127.0.0.1", port), timeout=10)
    first_tag = read_line(long_link)
    load = Load(port, {"A", "B"}).start()
    try:
        assert wait_for(lambda: load.attempts >= 100)
        # Hand-over 1: a foreground master replaces the first one.
        mid = balance.start("-r", str(port), a.spec, b.spec, port=port, wait=False)
        assert wait_for(lambda: reached_pid(balance, port) == mid.pid), "-i does not reach the new master"
        assert pid_alive(old.pid)                  # still draining our long link
        long_link.sendall(b"still served\n")
        assert read_line(long_link) == "still served"
        long_link.close()
        old.p.wait(15)
        assert old.p.returncode == 0
        assert wait_for(lambda: load.attempts >= 250)
        # Hand-over 2: a daemon replaces the foreground one; it exits 0 once listening.
        r = balance.run("-r", str(port), a.spec, b.spec, timeout=30)
        with contextlib.suppress(StateError):     # the daemon dies with the test whatever happens
            st = SharedState.attach(state_path(port, None, str(balance.state_dir)))
            balance.daemon_pids.append(st.pid)
            st.close()
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        new_pid = master_pid(balance, port)
        assert new_pid in balance.daemon_pids
        assert new_pid != mid.pid
        mid.p.wait(15)                             # no links of its own: exits at once
        assert mid.p.returncode == 0
        assert wait_for(lambda: load.attempts >= 400)
    finally:
        load.stop()
    print(f"\nhand-over under load: {load.attempts} connections attempted, {len(load.failures)} failed, "
          f"max connect {load.max_connect * 1000:.1f} ms, max round trip {load.max_round_trip * 1000:.1f} ms")
    assert load.failures == []
    assert load.attempts >= 400
    assert first_tag in ("A", "B")
    # -c reaches the new master: disabling a channel changes its routing.
    r = balance.run("-c", "disable 0", str(port))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert read_line(s) == "B"
    assert backlog(port) == accept_limit()         # the listener's backlog carried over
    assert not os.path.exists(control_path(state_path(port, None, str(balance.state_dir)))) or \
        stat.S_IMODE(os.stat(control_path(state_path(port, None, str(balance.state_dir)))).st_mode) == 0o600
    os.kill(new_pid, signal.SIGTERM)
    assert wait_for(lambda: not pid_alive(new_pid))


def test_replace_without_a_running_master_starts_normally(balance, backends):
    a = backends("A")
    port = free_port()
    proc = balance.start("-r", str(port), a.spec, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert read_line(s) == "A"
    assert master_pid(balance, port) == proc.pid
    path = control_path(state_path(port, None, str(balance.state_dir)))
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


def test_without_r_a_second_master_still_exits_71(balance, backends):
    a = backends("A")
    port = free_port()
    first = balance.start(str(port), a.spec, port=port)
    r = balance.run("-f", str(port), a.spec, timeout=20)
    assert r.returncode == 71
    assert f"pid {first.pid}" in r.stderr and "already running" in r.stderr and "-r" in r.stderr
    assert master_pid(balance, port) == first.pid


def test_replace_refuses_another_address_family(balance, backends):
    a = backends("A")
    port = free_port()
    first = balance.start(str(port), a.spec, port=port)             # IPv4 0.0.0.0
    r = balance.run("-f", "-r", "-6", str(port), a.spec, timeout=20)
    assert r.returncode == 71, r.stderr
    assert r.stderr.startswith("balance: the running master") and "IPv4, not IPv6" in r.stderr
    assert r.stderr.count("\n") == 1
    assert_still_in_charge(balance, first, port, "A")                # nothing changed


def test_silent_and_garbage_peers_neither_block_nor_break_it(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    first = balance.start(str(port), a.spec, port=port)
    path = control_path(state_path(port, None, str(balance.state_dir)))
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(path)                           # says nothing, never reads
    asks = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    asks.connect(path)
    asks.sendall(b"HANDOVER 1\n")                  # takes the fd, then never answers
    asks.settimeout(5)
    assert asks.recv(100).startswith(b"FD ")
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage.connect(path)
    garbage.sendall(os.urandom(4096))
    # The master keeps serving meanwhile (its loop is not held by any of them).
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            assert read_line(s) == "A"
    # A hand-over in progress refuses a second one; once the stalled one
    # times out, a real replacement works.
    r = balance.run("-f", "-r", str(port), b.spec, timeout=20)
    assert r.returncode == 71 and "already being replaced" in r.stderr, r.stderr
    asks.settimeout(10)
    assert asks.recv(100) == b""                   # bounded: the master hung up on it
    start = time.monotonic()
    new = balance.start("-r", str(port), b.spec, port=port, wait=False)
    assert wait_for(lambda: reached_pid(balance, port) == new.pid, timeout=10)
    assert time.monotonic() - start < 8
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert read_line(s) == "B"
    first.p.wait(10)
    assert first.p.returncode == 0
    for s in (silent, asks, garbage):
        s.close()


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another uid")


@pytest.fixture
def open_dir(balance):
    """Move the runner's state into a directory every user may traverse
    (pytest's own temp tree is 0700, which alone would keep others out)."""
    d = Path(tempfile.mkdtemp(prefix="gbalance-handover-"))
    os.chmod(d, 0o755)
    balance.state_dir = d
    balance.env["BALANCE_STATE_DIR"] = str(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(fn) -> int:
    """Run ``fn`` in a child process as uid/gid nobody; its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = fn()
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_root
def test_other_users_cannot_take_the_socket(balance, backends, open_dir):
    a = backends("A")
    port = free_port()
    first = balance.start(str(port), a.spec, port=port)
    path = control_path(state_path(port, None, str(balance.state_dir)))

    def connect() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except PermissionError:
            return 10
        return 11

    assert _as_nobody(connect) == 10               # mode 0600 keeps them out
    os.chmod(path, 0o666)                          # even if the mode is too open ...

    def ask() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        try:
            s.sendall(b"HANDOVER 1\n")
            msg, anc, _, _ = s.recvmsg(100, socket.CMSG_SPACE(16))
        except (ConnectionResetError, BrokenPipeError):
            return 20                              # hung up on before reading our request
        return 20 if msg == b"" and not anc else 21

    assert _as_nobody(ask) == 20                   # ... SO_PEERCRED refuses them
    assert first.p.poll() is None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert read_line(s) == "A"
    out, err = first.stop()
    assert f"refused a hand-over request from uid {NOBODY}" in err


@needs_root
def test_a_control_socket_of_another_user_is_not_trusted(balance, backends, open_dir):
    a = backends("A")
    port = free_port()
    path = control_path(state_path(port, None, str(balance.state_dir)))
    bait = socket.create_server(("127.0.0.1", 0))  # what a hostile user would hand us
    ready_r, ready_w = os.pipe()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            srv.listen(1)                          # credentials are taken here
            os.write(ready_w, b"1")
            srv.settimeout(20)
            conn, _ = srv.accept()
            conn.recv(100)
            conn.sendmsg([b"FD 1\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [bait.fileno()]))])
            conn.recv(100)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        r = balance.run("-f", "-r", str(port), a.spec, timeout=30)
        assert r.returncode == 71, r.stderr
        assert f"belongs to uid {NOBODY}" in r.stderr
        assert not os.path.exists(state_path(port, None, str(balance.state_dir)))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        srv.close()
        bait.close()
        os.close(ready_r)
        os.close(ready_w)


def test_replace_a_master_without_control_socket_says_why(balance, backends):
    a = backends("A")
    port = free_port()
    first = balance.start(str(port), a.spec, port=port)
    os.unlink(control_path(state_path(port, None, str(balance.state_dir))))   # as an older master
    r = balance.run("-f", "-r", str(port), a.spec, timeout=20)
    assert r.returncode == 71
    assert r.stderr == (f"balance: another balance master (pid {first.pid}) is already running on port {port}"
                        " and offers no hand-over (no control socket): stop it first\n")
    assert first.p.poll() is None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert read_line(s) == "A"


@pytest.mark.parametrize("opts,hosts", [
    (["-b", "127.0.0.1"], ["127.0.0.1"]),
    (["-6"], ["127.0.0.1", "::1"]),
], ids=["bind", "dual-stack"])
def test_replace_keeps_the_address(balance, backends, opts, hosts):
    if "-6" in opts and not ipv6_available():
        pytest.skip("no IPv6 on this host")
    a, b = backends("A"), backends("B")
    port = free_port()
    bind = opts[1] if opts[0] == "-b" else None
    old = balance.start(*opts, str(port), a.spec, port=port)
    new = balance.start("-r", *opts, str(port), b.spec, port=port, wait=False)
    old.p.wait(15)
    assert old.p.returncode == 0
    for host in hosts:
        with socket.create_connection((host, port), timeout=10) as s:
            assert read_line(s) == "B"
    r = balance.run(*(["-b", bind] if bind else []), "-i", str(port), input="quit\n")
    assert f"PID of master process is {new.pid}" in r.stdout


def test_bad_arguments_fail_before_the_running_master_lets_go(balance, backends):
    a = backends("A")
    port = free_port()
    first = balance.start(str(port), a.spec, port=port)
    r = balance.run("-f", "-r", "-B", "no-such-host.invalid", str(port), a.spec, timeout=30)
    assert r.returncode == 65, r.stderr
    assert_still_in_charge(balance, first, port, "A")


def test_four_clients_across_eight_handovers(balance, backends):
    """The README's second figure: repeated hand-overs under more load."""
    a, b = backends("A"), backends("B")
    port = free_port()
    procs = [balance.start(str(port), a.spec, b.spec, port=port)]
    loads = [Load(port, {"A", "B"}).start() for _ in range(4)]
    try:
        assert wait_for(lambda: min(x.attempts for x in loads) >= 50)
        for _ in range(8):
            procs.append(balance.start("-r", str(port), a.spec, b.spec, port=port, wait=False))
            procs[-2].p.wait(30)
            assert procs[-2].p.returncode == 0
            target = min(x.attempts for x in loads) + 30
            assert wait_for(lambda target=target: min(x.attempts for x in loads) >= target)
    finally:
        for x in loads:
            x.stop()
    attempts = sum(x.attempts for x in loads)
    failures = [f for x in loads for f in x.failures]
    print(f"\n8 hand-overs, 4 clients: {attempts} connections attempted, {len(failures)} failed, "
          f"max connect {max(x.max_connect for x in loads) * 1000:.1f} ms, "
          f"max round trip {max(x.max_round_trip for x in loads) * 1000:.1f} ms")
    assert failures == []
    assert master_pid(balance, port) == procs[-1].pid
