"""A reload (``balance -r``) keeps what the admin changed at run time.

Real ``balance`` masters (the CLI as a subprocess), real backends, the
table read back with ``balance -c show``; log priorities read from stderr
made to look like the journal's stream (``<N>message``).  The hostile
cases use a real second user (tests/otheruser.py).
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
import time
from pathlib import Path

import pytest

import otheruser
from conftest import BALANCE, ROOT, eventually, free_port, listening, pid_alive, read_line, wait_listening
from test_e2e_workers import accepting, children, serving
from gbalance.process.handover import control_path
from gbalance.system.limits import LISTEN_BACKLOG
from gbalance.table.files import state_path

TIMEOUT = 20.0


def wait_for(predicate, timeout: float = TIMEOUT) -> bool:
    return eventually(predicate, timeout)


def show(balance, port: int) -> list[list[str]]:
    """The rows of ``balance -c show PORT``, split into columns (header dropped)."""
    r = balance.run("-c", "show", str(port))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [line.split() for line in r.stdout.splitlines()[1:] if line.strip()]


def table(rows: list[list[str]]) -> list[tuple]:
    """What must carry over: group, type, index, state, address, port, totalc, maxc, sent, rcvd
    (everything but the open-connection count ``c``)."""
    return [tuple(r[:6] + r[7:]) for r in rows]


def ctl(balance, port: int, *commands: str) -> None:
    for cmd in commands:
        r = balance.run("-c", cmd, str(port))
        assert r.returncode == 0 and r.stderr == "" and "unknown" not in r.stdout \
            and "syntax" not in r.stdout, (cmd, r.stdout, r.stderr)


def roundtrip(port: int, payload: bytes = b"hello\n") -> str:
    """One connection: the backend's tag, then an echo of ``payload``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        tag = read_line(s)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(4096)
            assert chunk
            got += chunk
    return tag


def journal_stderr(tmp_path: Path, name: str):
    """A file for a master's stderr and the environment that makes it write ``<N>`` priorities."""
    f = open(tmp_path / name, "w+b")
    st = os.fstat(f.fileno())
    return f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def start_with_env(balance, extra_env: dict, *args: str, port: int, **kw):
    saved = balance.env
    balance.env = dict(saved, **extra_env)
    try:
        return balance.start(*args, port=port, **kw)
    finally:
        balance.env = saved


def reload(balance, old, *args: str, port: int, **kw):
    """``balance -f -r args``; waits until the old master has exited and ``-c`` reaches the new one."""
    new = balance.start("-r", *args, port=port, wait=False, **kw)
    old.p.wait(TIMEOUT)
    assert old.p.returncode == 0
    assert wait_for(lambda: balance.run("-c", "show", str(port)).returncode == 0)
    return new


# -- §1: the same command line keeps the whole table ------------------------------------

@pytest.mark.parametrize("before,after", [((), ()), (("-w", "1"), ("-w", "2")), (("-w", "2"), ())],
                         ids=["w1-w1", "w1-w2", "w2-w1"])
def test_same_command_line_keeps_the_whole_table(balance, backends, before, after):
    a, b, c, d, e = (backends(t) for t in "ABCDE")
    port = free_port()
    line = [str(port), a.spec, b.spec, "!", c.spec]
    old = balance.start(*before, *line, port=port)
    for _ in range(4):
        assert roundtrip(port, b"x" * 100) in ("A", "B")
    ctl(balance, port,
        "disable 1",                                    # B: under maintenance
        "maxc 0 3",                                     # A: at most 3
        f"create {d.host} {d.port}",                    # 0 2 (DIS)
        "create 127.0.0.1 1",                           # 0 3, then re-pointed
        f"assign 3 {e.host} {e.port}")
    r = balance.run("-i", str(port), input="group 1\ndisable 0\nhash\nquit\n")   # C off, hash
    assert r.returncode == 0 and "unknown" not in r.stdout, r.stdout
    before_rows = show(balance, port)
    new = reload(balance, old, *after, *line, port=port)
    after_rows = show(balance, port)
    assert table(after_rows) == table(before_rows)
    assert [r[3] for r in after_rows] == ["ENA", "DIS", "DIS", "DIS", "DIS"]
    assert after_rows[0][8] == "3"
    assert after_rows[0][8] == "3"
    assert after_rows[2][4:6] == [d.host, str(d.port)] and after_rows[3][4:6] == [e.host, str(e.port)]
    assert after_rows[4][1] == "Hash"
    totalc_a = int(after_rows[0][7])
    assert totalc_a + int(after_rows[1][7]) == 4 and int(after_rows[0][9]) > 0
    # B stays out of rotation: everything goes to A, and A's counters go on from there.
    # (A's maxc is 3: each connection's end is waited for, since the proxy
    # may count it open a moment after the client closed.)
    for _ in range(4):
        assert roundtrip(port) == "A"
        assert wait_for(lambda: show(balance, port)[0][6] == "0")
    assert wait_for(lambda: int(show(balance, port)[0][7]) == totalc_a + 4)
    new.stop()


# -- §1: a changed command line keeps the channels that did not change -----------------------

def test_changed_command_line_keeps_unchanged_channels_and_logs_each(balance, backends, tmp_path):
    a, b, c, d = (backends(t) for t in "ABCD")
    port = free_port()
    old = balance.start(str(port), a.spec, b.spec, c.spec, port=port)
    for _ in range(3):
        roundtrip(port)
    ctl(balance, port, "disable 1", "disable 2", "maxc 0 7")
    before = show(balance, port)
    err, env = journal_stderr(tmp_path, "new.err")
    # Channel 2 now points at D: it starts as the command line says.
    new = start_with_env(balance, env, "-r", "-w", "2", str(port), a.spec, b.spec, d.spec,
                         port=port, wait=False, stderr=err)
    old.p.wait(TIMEOUT)
    assert wait_for(lambda: balance.run("-c", "show", str(port)).returncode == 0)
    rows = show(balance, port)
    assert [r[3] for r in rows] == ["ENA", "DIS", "ENA"]
    assert rows[0][8] == "7" and rows[2][4:6] == [d.host, str(d.port)]
    assert table(rows)[:2] == table(before)[:2]        # counters of A and B carried
    assert rows[2][7] == "0"
    for _ in range(4):
        assert roundtrip(port) in ("A", "D")
    new.stop()
    err.seek(0)
    log = err.read().decode()
    kept = [ln for ln in log.splitlines() if "reload:" in ln]
    assert f"<6>reload: kept channel 0 0 ({a.host}:{a.port}): ENA, maxc 7" in kept
    assert f"<6>reload: kept channel 0 1 ({b.host}:{b.port}): DIS, maxc 0" in kept
    assert any(ln.startswith(f"<4>reload: dropped channel 0 2 ({c.host}:{c.port}): DIS") for ln in kept)
    assert len(kept) == 3, kept


def test_bytes_of_links_still_draining_in_the_old_master_are_counted(balance, backends):
    a = backends("A")
    port = free_port()
    old = balance.start(str(port), a.spec, port=port)
    long_link = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert read_line(long_link) == "A"
    new = balance.start("-r", str(port), a.spec, port=port, wait=False)
    assert wait_for(lambda: pid_alive(old.pid) and
                    balance.run("-i", str(port), input="quit\n").stdout.count(f"is {new.pid}") == 1)
    at_reload = int(show(balance, port)[0][9])          # sent, carried over
    payload = b"y" * 50_000
    long_link.sendall(payload)                          # still served by the old master
    got = b""
    while len(got) < len(payload):
        got += long_link.recv(65536)
    long_link.close()
    old.p.wait(TIMEOUT)
    assert wait_for(lambda: int(show(balance, port)[0][9]) == at_reload + len(payload))
    new.stop()


# -- §1: a full stop and start begins from the command line --------------------------------

def test_stop_and_start_begins_from_the_command_line(balance, backends):
    a, b = backends("A"), backends("B")
    port = free_port()
    old = balance.start(str(port), a.spec, b.spec, port=port)
    roundtrip(port)
    ctl(balance, port, "disable 1")
    old.stop()
    assert old.p.returncode == 0
    assert not os.path.exists(state_path(port, None, str(balance.state_dir)))   # forgotten on stop
    new = balance.start(str(port), a.spec, b.spec, port=port)
    rows = show(balance, port)
    assert [r[3] for r in rows] == ["ENA", "ENA"] and [r[7] for r in rows] == ["0", "0"]
    new.stop()


# -- §1: a reload with -w N is as smooth as with -w 1 -------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_the_new_master_accepts_before_it_takes_the_socket(balance, backends, workers):
    """The test plays the running master: when the new one says TAKE, it (with -w 2:
    every worker up, the first accepting) must already serve, so no connection
    waits for it to start."""
    a = backends("A")
    port = free_port()
    listener = socket.create_server(("0.0.0.0", port))
    balance.state_dir.mkdir(mode=0o755, exist_ok=True)
    ctl_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl_server.bind(control_path(state_path(port, None, str(balance.state_dir))))
    ctl_server.listen(1)
    ctl_server.settimeout(TIMEOUT)
    new = balance.start("-r", "-w", str(workers), str(port), a.spec, port=port, wait=False)
    try:
        conn, _ = ctl_server.accept()
        conn.settimeout(TIMEOUT)
        assert conn.recv(100) == b"HANDOVER 1\n"
        conn.sendmsg([b"FD 1\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [listener.fileno()]))])
        assert conn.recv(100) == b"TAKE\n"
        procs = [new.pid] if workers == 1 else children(new.pid)
        assert len(procs) == workers
        # -w 2: every worker up, the first accepting (the second stands by until clients wait).
        up = (lambda: accepting(new.pid, port)) if workers == 1 else (lambda: serving(procs, port))
        assert wait_for(up, timeout=10)
        assert roundtrip(port) == "A"          # we never accept: the new master served it
        conn.sendall(b"DONE\n")
        conn.close()
        listener.close()
        assert wait_for(lambda: balance.run("-c", "show", str(port)).returncode == 0)
        assert show(balance, port)[0][7] == "1"
    finally:
        ctl_server.close()
        new.stop()


def test_a_take_over_never_confirmed_drains_what_it_accepted_and_leaves(balance, backends):
    """The test plays a running master that gets TAKE but neither confirms nor lets go of
    its state file: the new master must not serve on beside it; what it accepted in the
    meantime finishes (no reset), then it exits 71."""
    import fcntl
    from gbalance.table.files import lock_path
    from gbalance.table.locks import try_lock as _try_lock
    a = backends("A")
    port = free_port()
    listener = socket.create_server(("0.0.0.0", port))
    balance.state_dir.mkdir(mode=0o755, exist_ok=True)
    path = state_path(port, None, str(balance.state_dir))
    lock_fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    assert _try_lock(lock_fd, fcntl.F_WRLCK, 0)          # the "old master" holds its lock
    ctl_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl_server.bind(control_path(path))
    ctl_server.listen(1)
    ctl_server.settimeout(TIMEOUT)
    new = balance.start("-r", "-g", "10", str(port), a.spec, port=port, wait=False)
    try:
        conn, _ = ctl_server.accept()
        conn.settimeout(TIMEOUT)
        assert conn.recv(100) == b"HANDOVER 1\n"
        conn.sendmsg([b"FD 1\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    array.array("i", [listener.fileno()]))])
        assert conn.recv(100) == b"TAKE\n"
        link = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert read_line(link) == "A"                     # accepted by the new master
        conn.close()                                      # no DONE
        time.sleep(0.5)
        assert new.p.poll() is None                       # still draining our link
        link.sendall(b"still there\n")
        assert read_line(link) == "still there"
        link.close()
        new.p.wait(TIMEOUT)
        assert new.p.returncode == 71
        _out, err = new.stop()
        assert "hand-over from master pid" in err and "failed" in err, err
        assert not os.path.exists(path)                   # it left no state file behind
    finally:
        ctl_server.close()
        listener.close()
        os.close(lock_fd)
        new.stop()


# -- §3: -r has no point of no return ---------------------------------------------------------

@pytest.fixture
def sticky_state(balance):
    """The runner's state in a /tmp-like directory (world-writable, sticky)."""
    otheruser.require_root()
    with otheruser.temp_dir("gbal-reload-", 0o1777) as d:
        balance.state_dir = d
        balance.env["BALANCE_STATE_DIR"] = str(d)
        yield d


@pytest.mark.parametrize("planted", ["socket", "symlink"])
def test_something_planted_at_the_control_path_does_not_stop_r(balance, backends, sticky_state, planted):
    a, b = backends("A"), backends("B")
    port = free_port()
    ctl_path = control_path(state_path(port, None, str(sticky_state)))
    # Another user's listening socket, at our control socket's name or linked from it.
    theirs = ctl_path if planted == "socket" else str(sticky_state / "theirs")
    holder = otheruser.popen(otheruser.argv("-c", (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('ready', flush=True); sys.stdin.read()\n"), theirs))
    assert holder.stdout.readline() == "ready\n"
    if planted == "symlink":
        otheruser.plant_symlink(theirs, ctl_path)
    assert os.lstat(ctl_path).st_uid == otheruser.NOBODY
    try:
        first = balance.start("-r", str(port), a.spec, port=port)
        assert roundtrip(port) == "A"
        # It put its own control socket in place: the next -r hands over.
        st = os.lstat(ctl_path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()
        reload(balance, first, str(port), b.spec, port=port)
        assert roundtrip(port) == "B"
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_state_name_taken_by_another_user_during_a_reload(balance, backends, sticky_state):
    """As if the old master had unlinked its file and another user re-created the name."""
    a, b = backends("A"), backends("B")
    port = free_port()
    path = state_path(port, None, str(sticky_state))
    old = balance.start(str(port), a.spec, port=port)
    os.unlink(path)
    otheruser.plant_table(path)
    assert os.stat(path).st_uid == otheruser.NOBODY
    new = balance.start("-r", str(port), b.spec, port=port, wait=False)
    old.p.wait(TIMEOUT)
    assert new.p.poll() is None and listening(port)
    assert roundtrip(port) == "B"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()       # replaced, not refused
    r = balance.run("-i", str(port), input="quit\n")
    assert f"PID of master process is {new.pid}" in r.stdout
    new.stop()


def test_a_failure_after_the_hand_over_keeps_the_port_served(backends):
    """Masters of an unprivileged user in a sticky directory: root puts a file of its own
    at the state file's name, which that user may not replace.  The new master still
    serves the port (from its temporary file) and says so."""
    otheruser.require_root()
    a, b = backends("A"), backends("B")
    port = free_port()
    with otheruser.temp_dir("gbal-reload-", 0o1777) as d:
        env = dict(os.environ, BALANCE_STATE_DIR=str(d), PYTHONUNBUFFERED="1")
        path = state_path(port, None, str(d))
        old = otheruser.popen(otheruser.balance_argv("-f", str(port), a.spec), env)
        new = None
        try:
            assert wait_for(lambda: listening(port))
            assert roundtrip(port) == "A"
            os.unlink(path)
            Path(path).write_text("root's\n")
            new = otheruser.popen(otheruser.balance_argv("-f", "-r", str(port), b.spec), env)
            old.wait(TIMEOUT)
            assert old.returncode == 0
            assert wait_for(lambda: roundtrip(port) == "B")
            assert new.poll() is None and listening(port)
            assert Path(path).read_text() == "root's\n"
        finally:
            for p in (old, new):
                if p is not None and p.poll() is None:
                    os.kill(p.pid, signal.SIGTERM)
        out, err = new.communicate(timeout=TIMEOUT)
        assert "serving port" in err and "-i, -c and -r cannot reach this master" in err, err


# -- start-up order ----------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("workers", [1, 2])
def test_the_control_socket_exists_before_the_port_answers(tmp_path, backends, workers):
    """The master puts its control socket in place (the rename of the bound
    socket onto its path) before it makes the port listen, so a ``balance -r``
    that follows the port's first answer always finds it."""
    a = backends("A")
    port = free_port()
    trace = tmp_path / "trace"
    env = dict(os.environ, BALANCE_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=listen,rename", "-o", str(trace), *BALANCE,
                             "-f", "-w", str(workers), str(port), a.spec], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, timeout=60)
        assert eventually(lambda: any((tmp_path / "state").glob(f"balance.{port}.*.ctl")), 10)
    finally:
        # (strace detaches when signalled itself: stop the traced balance.)
        tracees = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        for pid in tracees or [proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            for pid in tracees:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(10)
    lines = trace.read_text(errors="replace").splitlines()
    renamed = [i for i, line in enumerate(lines) if re.search(r"\brename\(.*\.ctl\.\d+\", \".*\.ctl\"\) = 0", line)]
    listens = [i for i, line in enumerate(lines) if re.search(rf"\blisten\(\d+, {LISTEN_BACKLOG}\) += 0", line)]
    assert renamed and listens, lines
    assert renamed[0] < listens[0], lines


def test_a_replacement_right_after_the_first_answer_takes_over(balance, backends):
    """``balance -r`` run the moment the port listens (nothing else waited
    for) finds the control socket and takes the port over."""
    a = backends("A")
    for _ in range(5):
        port = free_port()
        old = balance.start(str(port), a.spec, port=port, wait=False)
        assert eventually(lambda p=port: listening(p), 30)
        new = balance.start("-r", str(port), a.spec, port=port, wait=False)
        assert eventually(lambda o=old: o.p.poll() is not None, 30), "the old master never handed over"
        assert old.p.returncode == 0
        assert new.p.poll() is None
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert read_line(s) == "A"
        new.stop()
