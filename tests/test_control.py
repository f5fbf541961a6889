"""Talking to real masters: liveness, kill, resets under load, and hostile users.

The second user is real (uid 65534 through ``setpriv``, see ``otheruser.py``);
masters and shells are the real CLI.
"""

from __future__ import annotations

import os
import stat
import signal
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from gbalance.table.mailbox import Op, ask
from gbalance.table.files import state_path
from gbalance.table.layout import H_PID, H_START_TICKS
from gbalance.table.liveness import process_start_ticks
from gbalance.table.state import SharedState

import otheruser
from conftest import free_port, pid_alive, read_tag
from test_shell import channels, ctl, launch, wait_for

LOCKER = textwrap.dedent("""
    import fcntl, os, struct, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 0, 0)          # every byte (process lock)
    ofd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.fcntl(ofd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))   # and an OFD lock
    print("locked", flush=True)
    sys.stdin.read()
""")


def _state_dir(balance, prefix: str, mode: int):
    """Point ``balance`` at a new state directory of ``mode``; removed after the test."""
    otheruser.require_root()
    with otheruser.temp_dir(prefix, mode) as d:
        balance.state_dir = d
        balance.env["BALANCE_STATE_DIR"] = str(d)
        yield d


@pytest.fixture
def shared(balance):
    """A state directory the other user may read (the test's tmp_path is private)."""
    yield from _state_dir(balance, "gbal-ctl-", 0o755)


@pytest.fixture
def sticky(balance):
    """A state directory like /tmp: anybody may create files, nobody replace ours."""
    yield from _state_dir(balance, "gbal-sticky-", 0o1777)


class Locker:
    """The other user holding read locks on every byte of a state file."""

    def __init__(self, path: Path):
        self.p = otheruser.popen(otheruser.argv("-c", LOCKER, str(path)))
        assert self.p.stdout.readline() == "locked\n", self.p.stderr.read()

    def stop(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=10)


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def test_read_locks_of_another_user_stall_neither_proxy_nor_commands(balance, backends, shared):
    a, b = backends("A"), backends("B")
    port = free_port()
    launch(balance, "-m", "connect:interval=0.1", str(port), a.spec, b.spec, port=port, rows=2)
    locker = Locker(shared / f"balance.{port}.any")
    try:
        deadline = time.monotonic() + 1.5          # many monitor rounds with the locks held
        worst, n = 0.0, 0
        while time.monotonic() < deadline:
            tag, took = timed(read_tag, port, "127.0.0.1", 2.0)
            assert tag in ("A", "B")
            worst, n = max(worst, took), n + 1
        assert worst < 0.5, worst
        for command, answer in (("disable 0", "channel 0 disabled\n"), ("reset 1", "channel 1 counters reset\n"),
                                ("enable 0", "channel 0 enabled\n")):
            out, took = timed(ctl, balance, port, command)
            assert out == answer and took < 5, (command, took)
        assert ctl(balance, port, "show").count("ENA") == 2
        r = otheruser.run(otheruser.balance_argv("-c", "show", str(port)), balance.env)
        assert r.returncode == 0 and r.stderr == ""
    finally:
        locker.stop()
    print(f"{n} connections under the other user's locks, slowest {worst * 1000:.1f} ms")


def test_restart_after_kill9_while_another_user_read_locks_the_file(balance, backends, shared):
    a = backends("A")
    port = free_port()
    old = launch(balance, str(port), a.spec, port=port, rows=1)
    old.stop(signal.SIGKILL)
    path = shared / f"balance.{port}.any"
    locker = Locker(path)
    try:
        stale = (f"balance: no master process on port {port} "
                 f"(stale state file {path}, pid {old.pid} is gone)\n")
        r = balance.run("-c", "show", str(port))
        assert (r.returncode, r.stderr) == (69, stale)
        r = otheruser.run(otheruser.balance_argv("-c", "show", str(port)), balance.env)
        assert (r.returncode, r.stderr) == (69, stale)
        new = launch(balance, str(port), a.spec, port=port, rows=1)
        assert read_tag(port) == "A"
        assert f"PID of master process is {new.pid}\n" in balance.run("-i", str(port)).stdout
        r = otheruser.run(otheruser.balance_argv("-c", "show", str(port)), balance.env)
        assert r.returncode == 0 and "127.0.0.1" in r.stdout
    finally:
        locker.stop()


def test_master_replaces_a_planted_symlink_and_leaves_the_target(balance, backends, sticky):
    """Issue 17: what sits at the name is replaced (renamed over), never followed nor refused."""
    a = backends("A")
    port = free_port()
    target = sticky / "precious"
    target.write_text("root's own data\n")
    target.chmod(0o600)
    path = sticky / f"balance.{port}.any"
    otheruser.plant_symlink(str(target), str(path))
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 77 and "symbolic link" in r.stderr
    master = balance.start(str(port), a.spec, port=port)
    assert target.read_text() == "root's own data\n" and target.stat().st_mode & 0o777 == 0o600
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 0 and r.stderr == ""
    master.stop()


def test_master_replaces_a_file_another_user_created_and_the_shell_refuses_it(balance, backends, sticky):
    a = backends("A")
    port = free_port()
    path = sticky / f"balance.{port}.any"
    otheruser.plant_table(str(path))
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 77 and r.stderr.count("\n") == 1 and "owned by uid 65534" in r.stderr
    master = balance.start("-m", "command=true %H", str(port), a.spec, port=port)
    assert path.stat().st_uid == os.getuid()
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 0 and "touch" not in r.stdout
    master.stop()
    assert not os.path.exists("/tmp/pwned")


def test_kill_is_a_request_and_never_a_signal(balance, tmp_path):
    """A state file that names a process which is no master: kill must leave it alone."""
    port = free_port()
    sleeper = subprocess.Popen(["sleep", "60"])
    st = SharedState.create(state_path(port, None, str(balance.state_dir)))
    try:
        st.q[H_PID] = sleeper.pid                       # forged by the file's own user
        st.q[H_START_TICKS] = process_start_ticks(sleeper.pid)
        r = balance.run("-c", "kill", str(port), timeout=30)
        assert r.returncode == 0 and r.stderr == ""
        assert r.stdout == "no answer from the master: the master did not answer within 5 seconds\n"
        assert pid_alive(sleeper.pid)
    finally:
        st.close()
        sleeper.kill()
        sleeper.wait()


# -- counters have one writer ---------------------------------------------------------------

class Traffic:
    """Clients streaming chunks through the proxy and reading their echo."""

    CHUNK = 16384

    def __init__(self, port: int, clients: int):
        self.lock = threading.Lock()
        self.started = 0        # bytes whose sendall had begun
        self.echoed = 0         # bytes whose echo had come back in full
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(port,)) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, port: int) -> None:
        data = os.urandom(self.CHUNK)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                while not self.stop.is_set():
                    with self.lock:
                        self.started += len(data)
                    s.sendall(data)
                    got = 0
                    while got < len(data):
                        chunk = s.recv(len(data) - got)
                        assert chunk
                        got += len(chunk)
                    with self.lock:
                        self.echoed += len(data)
        except BaseException as exc:  # reported by finish()
            self.errors.append(exc)

    def totals(self) -> tuple[int, int]:
        with self.lock:
            return self.started, self.echoed

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=20)
        assert not self.errors, self.errors


def test_reset_under_heavy_traffic_is_never_lost(balance, backends):
    echo = backends(mode="echo")
    port = free_port()
    launch(balance, str(port), echo.spec, port=port, rows=1)
    traffic = Traffic(port, clients=8)
    path = state_path(port, None, str(balance.state_dir))
    st = SharedState.attach(path)
    try:
        wait_for(lambda: channels(balance, port)[0].sent > 4_000_000, "traffic to flow")
        for _ in range(20):                             # resets while bytes flow, in process
            assert ask(st, Op.RESET, 0, 0).result == 0
        echoed_before = traffic.totals()[1]
        assert ctl(balance, port, "reset 0") == "channel 0 counters reset\n"   # and the CLI's
        started_after = traffic.totals()[0]
        wait_for(lambda: traffic.totals()[0] > started_after + 4_000_000, "more traffic")
        traffic.finish()
        wait_for(lambda: channels(balance, port)[0].c == 0, "the links to close")
        started, echoed = traffic.totals()
        assert started == echoed
        ch = channels(balance, port)[0]
        # Bytes sent after the reset returned were counted after it; bytes echoed
        # before it began were counted before it.
        assert started - started_after <= ch.sent <= started - echoed_before, (ch.sent, started)
        assert started - started_after <= ch.rcvd <= started - echoed_before, (ch.rcvd, started)
        assert ch.totalc == 0                           # the 8 links were counted before
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        wait_for(lambda: channels(balance, port)[0].totalc == 1, "one new connection counted")
        print(f"{started / 1e6:.0f} MB through the proxy, {ch.sent / 1e6:.0f} MB after the last reset")
    finally:
        st.close()
        traffic.stop.set()


def test_other_addresses_trusts_only_live_masters_state_files(balance, backends, tmp_path):
    """Naming the other -b addresses of a port looks only at regular state files
    of live masters on that port: no FIFO is opened, no symlink followed, a
    stale file and junk are left out."""
    from gbalance.shell.control import other_addresses

    a = backends("A")
    port = free_port()
    launch(balance, "-b", "127.0.0.1", str(port), a.spec, port=port, rows=1)
    stale_port = free_port()
    dead = launch(balance, "-b", "127.0.0.2", str(stale_port), a.spec, port=stale_port, rows=1)
    dead.stop(signal.SIGKILL)
    d = balance.state_dir
    os.replace(d / f"balance.{stale_port}.127.0.0.2", d / f"balance.{port}.127.0.0.2")  # stale
    os.mkfifo(d / f"balance.{port}.10.0.0.1")              # would block an O_RDONLY open
    (d / f"balance.{port}.10.0.0.2").write_bytes(b"junk" * 100)
    os.symlink(d / f"balance.{port}.127.0.0.1", d / f"balance.{port}.10.0.0.3")
    (d / f"balance.{port}.bad name").write_bytes(b"")
    assert other_addresses(port, None, str(d)) == ["127.0.0.1"]
    assert other_addresses(port, "127.0.0.1", str(d)) == []
    assert other_addresses(stale_port, None, str(d)) == []


def test_a_fifo_at_the_state_path_never_hangs_a_shell(balance, shared):
    """A FIFO another user may only read stands where a state file would: the
    shell's read-only open must not wait for a writer; it refuses the FIFO
    in one line."""
    otheruser.require_root()
    port = free_port()
    path = shared / f"balance.{port}.any"
    os.mkfifo(path, 0o644)
    try:
        r = otheruser.run(otheruser.balance_argv("-c", "show", str(port)), balance.env, timeout=15)
        assert r.returncode == 77, r
        assert r.stderr == f"balance: refusing state file {path}: not a regular file\n", r.stderr
    finally:
        os.unlink(path)
