"""balance-instances signals only its own masters (gbalance/service/instances.py).

A state directory other users may write to (sticky, like /tmp) is where an
admin might point ``BALANCE_STATE_DIR``.  The other user (uid 65534, for
real) plants records, state files, symbolic links and locks there; root's
``balance-instances`` must neither write through them nor signal a pid
they name.  A master that turns into another program keeps its pid and
start time but not its command line: it is not killed either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import otheruser
from conftest import ROOT, eventually
from gbalance.service import conffile, masters, sysv
from gbalance.table import liveness as live


def helper(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gbalance.service.instances", *args], env=env, timeout=60,
                          capture_output=True, text=True, cwd="/", stdin=subprocess.DEVNULL)


@pytest.fixture
def shared_dir():
    """A sticky directory everybody may write to, owned by root (like /tmp)."""
    with otheruser.temp_dir("gbal-shared-", 0o1777) as d:
        yield d


#: Code the other user runs first: a state file at ``path`` naming ``pid``
#: (started at ``ticks``) as its live master, its lock held as a master holds
#: it; the returned descriptors keep the lock while the process lives.
PLANT_LIVE_MASTER = textwrap.dedent("""
    import fcntl, os, struct, sys
    from gbalance.table import layout as L
    from gbalance.table import files as F
    from gbalance.table import liveness as live

    def plant_live_master(path, pid, ticks):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, L.FILE_SIZE)
        os.pwrite(fd, L.MAGIC, 0)
        for index, value in ((L.H_VERSION, L.LAYOUT_VERSION), (L.H_PID, pid), (L.H_START_TICKS, ticks)):
            os.pwrite(fd, value.to_bytes(8, sys.byteorder, signed=True), 8 + 8 * index)
        lock = os.open(F.lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.fcntl(lock, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
        return fd, lock
""")


@pytest.mark.parametrize("key", ["x/../evil/f", "8080.any/x/../../evil/f", "./../evil/f"])
def test_stop_never_signals_a_pid_named_by_another_users_files(tmp_path, shared_dir, key):
    otheruser.require_root()
    victim = subprocess.Popen(["sleep", "300"])
    locker = None
    try:
        ticks = live.process_start_ticks(victim.pid)
        locker = otheruser.popen(otheruser.argv("-c", PLANT_LIVE_MASTER + textwrap.dedent("""
            d, pid, ticks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
            os.makedirs(os.path.join(d, "balance.x"))
            os.makedirs(os.path.join(d, "balance.8080.any", "x"))
            os.makedirs(os.path.join(d, "balance.."))
            evil = os.path.join(d, "evil")
            os.mkdir(evil, 0o755)
            path = os.path.join(evil, "f")
            held = plant_live_master(path, pid, ticks)
            with open(os.path.join(d, "init-instances"), "w") as f:
                f.write(sys.argv[4] + "\\n")
            print("planted", flush=True)
            sys.stdin.read()
        """), str(shared_dir), str(victim.pid), str(ticks), key))
        assert locker.stdout.readline() == "planted\n", locker.stderr.read()
        conf = tmp_path / "balance.conf"
        conf.write_text("")
        env = dict(os.environ, BALANCE_CONF=str(conf), BALANCE_STATE_DIR=str(shared_dir))
        done = helper(env, "stop")
        assert done.returncode == 0, done.stderr
        time.sleep(0.2)
        assert victim.poll() is None, "root signalled a pid another user named"
        assert "stopped" not in done.stdout
    finally:
        if locker is not None:
            locker.stdin.close()
            locker.wait(timeout=10)
        victim.kill()
        victim.wait()


def test_stop_never_signals_a_pid_from_a_state_file_root_does_not_own(tmp_path):
    """A state directory that belongs to another user (a mistake, but one an
    admin can make): that user's file for a configured port names root's pid."""
    otheruser.require_root()
    victim = subprocess.Popen(["sleep", "300"])
    locker = None
    with otheruser.temp_dir("gbal-userdir-", 0o755) as d:
        os.chown(d, otheruser.NOBODY, otheruser.NOBODY)
        try:
            locker = otheruser.popen(otheruser.argv("-c", PLANT_LIVE_MASTER + textwrap.dedent("""
                path, pid, ticks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
                held = plant_live_master(path, pid, ticks)
                print("planted", flush=True)
                sys.stdin.read()
            """), str(d / "balance.9999.any"), str(victim.pid), str(live.process_start_ticks(victim.pid))))
            assert locker.stdout.readline() == "planted\n", locker.stderr.read()
            conf = tmp_path / "balance.conf"
            conf.write_text("9999 127.0.0.1:1\n")
            env = dict(os.environ, BALANCE_CONF=str(conf), BALANCE_STATE_DIR=str(d))
            done = helper(env, "stop")
            assert done.returncode == 0, done.stderr
            time.sleep(0.2)
            assert victim.poll() is None, "root signalled a pid from another user's state file"
            status = helper(env, "status")
            assert "running" not in status.stdout, status.stdout
        finally:
            if locker is not None:
                locker.stdin.close()
                locker.wait(timeout=10)
            victim.kill()
            victim.wait()


def test_the_record_is_never_written_through_a_planted_name(tmp_path, shared_dir, backends):
    otheruser.require_root()
    precious = tmp_path / "precious"            # root's: nobody can reach it
    precious.write_text("keep me\n")
    otheruser.plant_symlink(str(precious), str(shared_dir / "init-instances.tmp"))
    b = backends("A")
    from conftest import free_port
    port = free_port()
    conf = tmp_path / "balance.conf"
    conf.write_text(f"{port} {b.spec}\n")
    env = dict(os.environ, BALANCE_CONF=str(conf), BALANCE_STATE_DIR=str(shared_dir),
               BALANCE_BIN=str(Path(sys.executable).parent / "balance"))
    try:
        done = helper(env, "start")
        assert done.returncode == 0, done.stderr
        assert precious.read_text() == "keep me\n"
        record = shared_dir / "init-instances"
        info = os.lstat(record)
        assert info.st_uid == 0 and not os.path.islink(record) and info.st_mode & 0o777 == 0o644
        assert record.read_text() == f"{port}.any\n"
    finally:
        done = helper(env, "stop")
    assert f"balance {port}.any: stopped" in done.stdout


def test_a_record_of_another_user_is_not_read(tmp_path, shared_dir):
    otheruser.require_root()
    otheruser.run_code("""
        import sys
        open(sys.argv[1], "w").write("8080.any\\n9090.any\\n")
    """, str(shared_dir / "init-instances"))
    old = os.environ.get("BALANCE_STATE_DIR")
    os.environ["BALANCE_STATE_DIR"] = str(shared_dir)
    try:
        assert masters.read_record() == []
    finally:
        if old is None:
            del os.environ["BALANCE_STATE_DIR"]
        else:
            os.environ["BALANCE_STATE_DIR"] = old


@pytest.mark.parametrize("key,ok", [
    ("80.any", True), ("8080.127.0.0.1", True), ("443.::1", True), ("65535.any", True),
    ("65536.any", False), ("0.any", False), ("80", False), ("80.", False), ("../80.any", False),
    ("80.any/../x", False), ("80..", False), ("80.a..b", False), ("x.any", False), ("", False),
    ("80.any\n", False), ("80." + "a" * 200 + ".example", True),
])
def test_only_port_addr_keys_are_valid(key, ok):
    assert masters.valid_key(key) is ok


@pytest.mark.parametrize("line", [
    "8080 a", "-b 127.0.0.1 80 a", "-b ::1 80 a", "-b fe80::1%eth0 443 a",
    "-b " + "h" * 60 + ".example.org 80 a", "-6 25 a",
])
def test_every_instance_key_of_the_config_is_valid(line):
    assert masters.valid_key(conffile.parse_args(line.split()).key)


FAKE_MASTER = """\
import os, signal, sys
from gbalance.table.state import SharedState
st = SharedState.create(sys.argv[1])
def became_something_else(*_):
    os.execv("/bin/sleep", ["sleep", "300"])
signal.signal(signal.SIGTERM, became_something_else)
print("ready", flush=True)
signal.pause()
"""


def test_a_master_that_became_another_program_is_not_killed(tmp_path, monkeypatch):
    """SIGKILL after the grace period is sent only to the very master: same pid,
    start time and a balance command line, checked right before it."""
    state_dir = tmp_path / "state"
    script = tmp_path / "balance-fake.py"       # "balance" in its command line, like a master
    script.write_text(FAKE_MASTER)
    key = "8088.any"
    proc = subprocess.Popen([sys.executable, str(script), str(state_dir / f"balance.{key}")],
                            stdout=subprocess.PIPE, text=True, cwd="/",
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline() == "ready\n"
        monkeypatch.setenv("BALANCE_STATE_DIR", str(state_dir))
        assert masters.master_pid(key)[0] == proc.pid
        out = conffile.Out()
        stopped = sysv.stop_keys([key], {key: 0.0}, out, margin=0.5)
        assert stopped == [key]
        assert eventually(lambda: _comm(proc.pid) == "sleep", timeout=5)
        time.sleep(1.0)
        assert proc.poll() is None, "killed a process that is no balance master any more"
    finally:
        proc.kill()
        proc.wait()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_metrics_and_show_read_a_state_dir_on_a_read_only_file_system(tmp_path, backends):
    """The metrics unit sees /run/balance read-only (ProtectSystem=strict): it reads."""
    from conftest import free_port, wait_listening
    b = backends("A")
    port = free_port()
    state_dir = tmp_path / "state"
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    conf = tmp_path / "balance.conf"
    conf.write_text(f"{port} {b.spec}\n")
    balance_bin = str(Path(sys.executable).parent / "balance")
    env = dict(os.environ, BALANCE_CONF=str(conf), BALANCE_STATE_DIR=str(state_dir), BALANCE_BIN=balance_bin)
    assert helper(env, "start").returncode == 0
    try:
        wait_listening(port)
        script = (f"mount --bind {state_dir} {state_dir} && mount -o remount,ro,bind {state_dir} && "
                  f"{balance_bin} -c show {port} && "
                  f"{sys.executable} -m gbalance.service.instances metrics {textfile}")
        r = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True,
                           text=True, timeout=60, cwd="/")
        assert r.returncode == 0, r.stderr
        assert b.spec.split(":")[0] in r.stdout
        text = (textfile / f"balance_{port}.any.prom").read_text()
        assert f'balance_up{{port="{port}",bind="any"}} 1' in text
    finally:
        assert f"balance {port}.any: stopped" in helper(env, "stop").stdout
