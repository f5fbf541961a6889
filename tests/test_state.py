"""The shared state file: layout, locks, take-over and read-only access.

fcntl locks belong to a process, so every "other master" here is a real
second process (a small Python helper), and read-only access is tried by a
real non-root user.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from gbalance import state as S
from gbalance.state import SharedState, StateError, MasterRunning

from conftest import ROOT, pid_alive

HOLDER = textwrap.dedent("""
    import sys
    from gbalance.state import SharedState
    st = SharedState.create(sys.argv[1])
    g = st.add_group()
    st.add_channel(g, "127.0.0.1", 8080, 3)
    if sys.argv[2] == "lock-change":
        import fcntl
        fcntl.lockf(st.fd, fcntl.LOCK_EX, 1, 1)
    print("ready", flush=True)
    if sys.argv[2] == "exit":
        import os
        os._exit(0)          # dies without cleaning up: a stale file
    sys.stdin.read()         # hold the locks until the test closes our stdin
""")


class Holder:
    """A second process that creates the state file and holds its master lock."""

    def __init__(self, path: Path, mode: str = "hold"):
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline() == "ready\n"

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
        self.p.wait(timeout=10)


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "run" / "balance.8080.any"


@pytest.fixture
def holder(path):
    h = Holder(path)
    yield h
    h.stop()


def test_layout_constants():
    assert S.MAXGROUPS == 32 and S.MAXCHANNELS == 64
    assert S.FILE_SIZE == 8 + S.NSLOTS * 8 + (S.MAXGROUPS * S.MAXCHANNELS + 1) * S.ADDR_LEN   # + request address
    assert S.slot(0, 0, 0) == S.CHANNEL_BASE
    assert S.slot(1, 0, 0) - S.slot(0, 0, 0) == S.MAXCHANNELS * S.C_SLOTS
    assert S.slot(S.MAXGROUPS - 1, S.MAXCHANNELS - 1, S.C_SLOTS - 1) == S.NSLOTS - 1
    assert S.gslot(S.MAXGROUPS - 1, S.G_SLOTS - 1) < S.CHANNEL_BASE


def test_state_path_keys_port_and_bind(tmp_path):
    d = str(tmp_path)
    assert S.state_path(80, None, d) == f"{d}/balance.80.any"
    assert S.state_path(80, "127.0.0.2", d) == f"{d}/balance.80.127.0.0.2"
    assert S.state_path(80, "::1", d) == f"{d}/balance.80.::1"
    assert S.state_path(80, "a/b c", d) == f"{d}/balance.80.a_b_c"   # no path tricks
    assert len({S.state_path(80, b, d) for b in (None, "127.0.0.1", "127.0.0.2", "::1")}) == 4


def test_state_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(S.STATE_DIR_ENV, str(tmp_path))
    assert S.state_path(81, None) == f"{tmp_path}/balance.81.any"
    monkeypatch.delenv(S.STATE_DIR_ENV)
    assert S.state_dir() == "/var/run/balance"


def test_create_writes_header_and_mode(path):
    st = SharedState.create(str(path))
    try:
        assert path.stat().st_size == S.FILE_SIZE
        assert path.stat().st_mode & 0o777 == 0o644
        assert path.read_bytes()[:8] == b"GBALSTAT"
        assert st.pid == os.getpid()
        assert st.q[S.H_VERSION] == S.LAYOUT_VERSION
        assert st.ngroups == 0 and st.monitor == S.MON_NONE
        assert st.master_alive()
    finally:
        st.close()


def test_attach_sees_changes_both_ways(path, holder):
    st = SharedState.attach(str(path))
    try:
        assert st.writable and st.master_alive() and st.pid == holder.p.pid
        assert st.ngroups == 1 and st.nchannels(0) == 1
        ch = st.channel(0, 0)
        assert (ch.address, ch.port, ch.maxc, ch.status, ch.c, ch.totalc) == ("127.0.0.1", 8080, 3, S.ENABLED, 0, 0)
        gen = st.generation
        with st.change():
            st.set_status(0, 0, S.HARD_DISABLED)
            st.set_address(0, 0, "::1", 9090)
            st.bump_generation()
            n = st.add_channel(0, "10.0.0.1", 1, status=S.HARD_DISABLED)
        assert n == 1 and st.generation == gen + 2
        other = SharedState.attach(str(path))
        try:
            assert [(c.address, c.port, c.status) for c in other.channels()] == \
                [("::1", 9090, S.HARD_DISABLED), ("10.0.0.1", 1, S.HARD_DISABLED)]
            assert other.get(0, 0, S.C_CHANGED) > 0
        finally:
            other.close()
    finally:
        st.close()


def test_second_master_is_refused(path, holder):
    with pytest.raises(MasterRunning) as info:
        SharedState.create(str(path))
    assert info.value.pid == holder.p.pid
    # ... and the live file was not touched.
    st = SharedState.attach(str(path))
    try:
        assert st.nchannels(0) == 1 and st.pid == holder.p.pid
    finally:
        st.close()


def test_stale_file_is_taken_over(path):
    h = Holder(path, "exit")
    h.stop()
    assert path.exists()
    old = SharedState.attach(str(path))
    try:
        assert not old.master_alive()          # the file stays, the lock went with the process
        assert old.nchannels(0) == 1
    finally:
        old.close()
    st = SharedState.create(str(path))
    try:
        assert st.pid == os.getpid()
        assert st.ngroups == 0 and st.nchannels(0) == 0   # re-initialised, not inherited
        assert st.address(0, 0) == ""
    finally:
        st.close()


def test_master_alive_follows_the_lock(path):
    h = Holder(path)
    st = SharedState.attach(str(path))
    try:
        assert st.master_alive()
        h.stop()
        assert not pid_alive(h.p.pid)
        assert not st.master_alive()
    finally:
        st.close()


def test_change_lock_excludes_other_processes(path):
    h = Holder(path, "lock-change")
    st = SharedState.attach(str(path))
    try:
        with pytest.raises(OSError) as info:
            fcntl.lockf(st.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
        assert info.value.errno in (errno.EAGAIN, errno.EACCES)
        h.stop()
        with st.change():                      # free again once the holder is gone
            st.set_group_type(0, S.HASH)
        assert st.group_type(0) == S.HASH
    finally:
        st.close()


def test_attach_rejects_what_is_not_a_state_file(tmp_path):
    with pytest.raises(StateError) as info:
        SharedState.attach(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT
    small = tmp_path / "small"
    small.write_bytes(b"GBALSTAT")
    with pytest.raises(StateError, match="not a gbalance state file"):
        SharedState.attach(str(small))
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"X" * S.FILE_SIZE)
    with pytest.raises(StateError, match="not a gbalance state file"):
        SharedState.attach(str(wrong))


def test_table_limits(path):
    st = SharedState.create(str(path))
    try:
        for _ in range(S.MAXGROUPS):
            st.add_group()
        with pytest.raises(StateError, match="too many groups"):
            st.add_group()
        for i in range(S.MAXCHANNELS):
            assert st.add_channel(5, "127.0.0.1", 1000 + i) == i
        with pytest.raises(StateError, match="no channel slots"):
            st.add_channel(5, "127.0.0.1", 1)
        assert st.nchannels(4) == 0 and st.nchannels(6) == 0   # neighbours untouched
        assert st.channel(5, S.MAXCHANNELS - 1).port == 1000 + S.MAXCHANNELS - 1
    finally:
        st.close()


def test_counters_are_plain_slots(path):
    st = SharedState.create(str(path))
    try:
        g = st.add_group()
        st.add_channel(g, "127.0.0.1", 80)
        st.q[S.slot(g, 0, S.C_SENT)] += 5
        st.q[S.slot(g, 0, S.C_RCVD)] += 2**40
        ch = st.channel(g, 0)
        assert (ch.sent, ch.rcvd) == (5, 2**40)
    finally:
        st.close()


READER = textwrap.dedent("""
    import errno, sys
    from gbalance.state import SharedState
    st = SharedState.attach(sys.argv[1])
    print("writable", st.writable)
    print("alive", st.master_alive())
    print("channels", [(c.address, c.port) for c in st.channels()])
    try:
        with st.change():
            pass
    except PermissionError as exc:
        print("change", errno.errorcode[exc.errno])
    try:
        st.q[0] = 1
    except TypeError:
        print("write", "refused")
""")


def test_other_user_attaches_read_only():
    if os.geteuid() != 0:
        pytest.fail("this test must run as root to try a second user")
    d = Path(tempfile.mkdtemp(prefix="gbal-state-"))
    try:
        d.chmod(0o755)
        path = d / "balance.8080.any"
        h = Holder(path)
        try:
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                sys.executable, "-c", READER, str(path)],
                               cwd=ROOT, capture_output=True, text=True, timeout=20)
            assert r.stderr == ""
            assert r.stdout.splitlines() == ["writable False", "alive True",
                                             "channels [('127.0.0.1', 8080)]",
                                             "change EACCES", "write refused"]
        finally:
            h.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_attach_rejects_other_layout(tmp_path):
    st = SharedState.create(str(tmp_path / "old"))
    st.q[S.H_VERSION] = S.LAYOUT_VERSION + 1
    st.close()
    with pytest.raises(StateError, match="state layout"):
        SharedState.attach(str(tmp_path / "old"))
