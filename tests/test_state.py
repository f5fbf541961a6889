"""The shared state file: layout, locks, take-over and read-only access.

Every "other master" here is a real second process (a small Python helper
whose command line names balance, as a master's does), and read-only
access, read locks and planted files come from a real non-root user
(uid 65534, see ``otheruser.py``).
"""

from __future__ import annotations

import errno
import os
import stat
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from gbalance.table import layout as L
from gbalance.table import files as F
from gbalance.table import liveness as live
from gbalance.table.files import MasterRunning, StateError, UnsafeState
from gbalance.table.state import SharedState

import otheruser
from conftest import ROOT, pid_alive

HOLDER = textwrap.dedent("""
    import sys
    from gbalance.table.state import SharedState
    st = SharedState.create(sys.argv[1])
    g = st.add_group()
    st.add_channel(g, "127.0.0.1", 8080, 3)
    if sys.argv[2] == "lock-change":
        held = st.change()
        held.__enter__()
    print("ready", flush=True)
    if sys.argv[2] == "exit":
        import os
        os._exit(0)          # dies without cleaning up: a stale file
    sys.stdin.read()         # hold the locks until the test closes our stdin
""")


class Holder:
    """A second process that creates the state file and holds its master lock."""

    def __init__(self, path: Path, mode: str = "hold"):
        script = path.parent.parent / "balance_holder.py"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(HOLDER)
        script.chmod(0o644)
        self.p = subprocess.Popen([sys.executable, str(script), str(path), mode], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
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
    assert L.MAXGROUPS == 32 and L.MAXCHANNELS == 64
    assert L.FILE_SIZE == 8 + L.NSLOTS * 8 + (L.MAXGROUPS * L.MAXCHANNELS + 1) * L.ADDR_LEN   # + request address
    assert L.slot(0, 0, 0) == L.CHANNEL_BASE
    assert L.slot(1, 0, 0) - L.slot(0, 0, 0) == L.MAXCHANNELS * L.C_SLOTS
    last = L.slot(L.MAXGROUPS - 1, L.MAXCHANNELS - 1, L.C_SLOTS - 1)
    assert last == L.CHANNEL_BASE + L.TABLE_SLOTS - 1
    assert last + L.row_offset(L.MAXWORKERS - 1) == L.NSLOTS - 1     # the last worker's row ends it
    assert L.gslot(L.MAXGROUPS - 1, L.G_SLOTS - 1) < L.CHANNEL_BASE


def test_state_path_keys_port_and_bind(tmp_path):
    d = str(tmp_path)
    assert F.state_path(80, None, d) == f"{d}/balance.80.any"
    assert F.state_path(80, "127.0.0.2", d) == f"{d}/balance.80.127.0.0.2"
    assert F.state_path(80, "::1", d) == f"{d}/balance.80.::1"
    assert F.state_path(80, "a/b c", d) == f"{d}/balance.80.a_b_c"   # no path tricks
    assert len({F.state_path(80, b, d) for b in (None, "127.0.0.1", "127.0.0.2", "::1")}) == 4


def test_state_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(F.STATE_DIR_ENV, str(tmp_path))
    assert F.state_path(81, None) == f"{tmp_path}/balance.81.any"
    monkeypatch.delenv(F.STATE_DIR_ENV)
    assert F.state_dir() == "/var/run/balance"


def test_create_writes_header_and_mode(path):
    st = SharedState.create(str(path))
    try:
        assert path.stat().st_size == L.FILE_SIZE
        assert path.stat().st_mode & 0o777 == 0o644
        assert path.read_bytes()[:8] == b"GBALSTAT"
        assert st.pid == os.getpid()
        assert st.q[L.H_VERSION] == L.LAYOUT_VERSION
        assert st.ngroups == 0 and st.monitor == L.MON_NONE
        assert st.master_alive()
    finally:
        st.close()


def test_attach_sees_changes_both_ways(path, holder):
    st = SharedState.attach(str(path))
    try:
        assert st.writable and st.master_alive() and st.pid == holder.p.pid
        assert st.ngroups == 1 and st.nchannels(0) == 1
        ch = st.channel(0, 0)
        assert (ch.address, ch.port, ch.maxc, ch.status, ch.c, ch.totalc) == ("127.0.0.1", 8080, 3, L.ENABLED, 0, 0)
        gen = st.generation
        with st.change():
            st.set_status(0, 0, L.HARD_DISABLED)
            st.set_address(0, 0, "::1", 9090)
            st.bump_generation()
            n = st.add_channel(0, "10.0.0.1", 1, status=L.HARD_DISABLED)
        assert n == 1 and st.generation == gen + 2
        other = SharedState.attach(str(path))
        try:
            assert [(c.address, c.port, c.status) for c in other.channels()] == \
                [("::1", 9090, L.HARD_DISABLED), ("10.0.0.1", 1, L.HARD_DISABLED)]
            assert other.get(0, 0, L.C_CHANGED) > 0
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


def test_change_lock_excludes_other_sessions_for_a_bounded_time(path):
    h = Holder(path, "lock-change")
    st = SharedState.attach(str(path))
    try:
        start = time.monotonic()
        with pytest.raises(StateError, match="busy") as info:
            with st.change(wait=0.3):
                pass
        assert info.value.errno == errno.EBUSY
        assert 0.3 <= time.monotonic() - start < 2
        h.stop()
        with st.change(wait=0.3):              # free again once the holder is gone
            pass
    finally:
        st.close()


def test_lock_file_is_owner_only_and_beside_the_state_file(path):
    st = SharedState.create(str(path))
    try:
        lock = path.parent / f".{path.name}.lock"
        assert F.lock_path(str(path)) == str(lock)
        assert lock.stat().st_mode & 0o777 == 0o600
        assert path.stat().st_mode & 0o777 == 0o644
        assert sorted(p.name for p in path.parent.iterdir()) == [lock.name, path.name]
    finally:
        st.close()


def test_liveness_needs_pid_start_time_and_a_balance_command_line(path):
    h = Holder(path)
    try:
        st = SharedState.attach(str(path))
        ticks = st.q[L.H_START_TICKS]
        assert ticks == live.process_start_ticks(h.p.pid) > 0
        assert live.master_process_alive(h.p.pid, ticks)
        assert not live.master_process_alive(h.p.pid, ticks + 1)      # a recycled pid
        assert not live.master_process_alive(1, live.process_start_ticks(1) or 0)
        assert not live.master_process_alive(0, 0)
        sleeper = subprocess.Popen(["sleep", "30"])
        try:                                                     # alive, but no balance master
            assert not live.master_process_alive(sleeper.pid, live.process_start_ticks(sleeper.pid))
        finally:
            sleeper.kill()
            sleeper.wait()
        assert st.live_pid() == h.p.pid
        st.close()
    finally:
        h.stop()


def test_attach_rejects_what_is_not_a_state_file(tmp_path):
    with pytest.raises(StateError) as info:
        SharedState.attach(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT
    small = tmp_path / "small"
    small.write_bytes(b"GBALSTAT")
    with pytest.raises(StateError, match="not a gbalance state file"):
        SharedState.attach(str(small))
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"X" * L.FILE_SIZE)
    with pytest.raises(StateError, match="not a gbalance state file"):
        SharedState.attach(str(wrong))


def test_table_limits(path):
    st = SharedState.create(str(path))
    try:
        for _ in range(L.MAXGROUPS):
            st.add_group()
        with pytest.raises(StateError, match="too many groups"):
            st.add_group()
        for i in range(L.MAXCHANNELS):
            assert st.add_channel(5, "127.0.0.1", 1000 + i) == i
        with pytest.raises(StateError, match="no channel slots"):
            st.add_channel(5, "127.0.0.1", 1)
        assert st.nchannels(4) == 0 and st.nchannels(6) == 0   # neighbours untouched
        assert st.channel(5, L.MAXCHANNELS - 1).port == 1000 + L.MAXCHANNELS - 1
    finally:
        st.close()


def test_counters_are_plain_slots(path):
    st = SharedState.create(str(path))
    try:
        g = st.add_group()
        st.add_channel(g, "127.0.0.1", 80)
        st.q[L.slot(g, 0, L.C_SENT)] += 5
        st.q[L.slot(g, 0, L.C_RCVD)] += 2**40
        ch = st.channel(g, 0)
        assert (ch.sent, ch.rcvd) == (5, 2**40)
    finally:
        st.close()


READER = textwrap.dedent("""
    import errno, sys
    from gbalance.table.state import SharedState
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
    otheruser.require_root()
    d = Path(tempfile.mkdtemp(prefix="gbal-state-"))
    try:
        d.chmod(0o755)
        path = d / "run" / "balance.8080.any"
        h = Holder(path)
        try:
            r = otheruser.run(otheruser.argv("-c", READER, str(path)))
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
    st.q[L.H_VERSION] = L.LAYOUT_VERSION + 1
    st.close()
    with pytest.raises(StateError, match="state layout"):
        SharedState.attach(str(tmp_path / "old"))


# -- hostile users and planted files ----------------------------------------------------

@pytest.fixture
def sticky_dir():
    """A directory like /tmp: world-writable and sticky, readable by the other user."""
    with otheruser.temp_dir("gbal-sticky-", 0o1777) as d:
        yield d


def test_symlink_planted_by_another_user_is_replaced_never_followed(sticky_dir):
    """A sticky directory lets root replace the name (issue 17: replace rather than refuse)."""
    otheruser.require_root()
    target = sticky_dir / "precious"
    target.write_text("root's data\n")
    target.chmod(0o600)
    path = sticky_dir / "balance.8080.any"
    otheruser.plant_symlink(str(target), str(path))
    with pytest.raises(UnsafeState, match="symbolic link"):
        SharedState.attach(str(path))
    st = SharedState.create(str(path))
    try:
        assert target.read_text() == "root's data\n" and target.stat().st_mode & 0o777 == 0o600
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
        assert st.pid == os.getpid()
    finally:
        st.close()


def test_symlink_planted_at_the_lock_file_is_refused(sticky_dir):
    otheruser.require_root()
    target = sticky_dir / "precious"
    target.write_text("x")
    path = sticky_dir / "balance.8080.any"
    otheruser.plant_symlink(str(target), F.lock_path(str(path)))
    # O_NOFOLLOW refuses it (or the kernel's protected_symlinks does first)
    with pytest.raises(UnsafeState, match="refusing lock file .*(symbolic link|Permission denied)"):
        SharedState.create(str(path))
    assert target.read_text() == "x" and target.stat().st_mode & 0o777 == 0o644
    assert not path.exists()


def test_file_precreated_by_another_user_is_replaced_never_used(sticky_dir):
    otheruser.require_root()
    path = sticky_dir / "balance.8080.any"
    # A well-formed table whose address field would reach a shell as root.
    otheruser.plant_table(str(path))
    with pytest.raises(UnsafeState, match="owned by uid 65534"):
        SharedState.attach(str(path))
    st = SharedState.create(str(path))
    try:
        info = os.lstat(path)
        assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o644
        assert b"touch" not in path.read_bytes()[:L.FILE_SIZE]
        assert st.pid == os.getpid()
    finally:
        st.close()


def test_directory_others_may_write_is_refused_unless_sticky(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(UnsafeState, match="writable by other users"):
        SharedState.create(str(open_dir / "balance.1.any"))
    assert list(open_dir.iterdir()) == []
    open_dir.chmod(0o1777)                      # sticky: nobody may replace our files
    st = SharedState.create(str(open_dir / "balance.1.any"))
    st.close()


def test_directory_of_another_user_is_refused(tmp_path):
    otheruser.require_root()
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, otheruser.NOBODY, otheruser.NOBODY)
    with pytest.raises(UnsafeState, match="owned by uid 65534"):
        SharedState.create(str(d / "balance.1.any"))


def test_read_locks_of_another_user_change_nothing_for_a_restart(tmp_path):
    """The other user read-locks every byte of a dead master's file: a new master starts."""
    otheruser.require_root()
    d = Path(tempfile.mkdtemp(prefix="gbal-locks-"))
    try:
        d.chmod(0o755)
        path = d / "run" / "balance.8080.any"
        h = Holder(path, "exit")
        h.stop()
        (d / "run").chmod(0o755)
        locker = otheruser.popen(otheruser.argv("-c", textwrap.dedent("""
            import fcntl, os, struct, sys
            fd = os.open(sys.argv[1], os.O_RDONLY)
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 0, 0)      # every byte, process lock
            ofd = os.open(sys.argv[1], os.O_RDONLY)
            fcntl.fcntl(ofd, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))   # and an OFD lock
            try:
                os.open(sys.argv[2], os.O_RDONLY)
                print("lock file readable", flush=True)
            except PermissionError:
                print("locked", flush=True)
            sys.stdin.read()
        """), str(path), F.lock_path(str(path))))
        try:
            assert locker.stdout.readline() == "locked\n"
            old = SharedState.attach(str(path))
            assert not old.master_alive()
            old.close()
            st = SharedState.create(str(path))
            try:
                assert st.pid == os.getpid() and st.master_alive()
            finally:
                st.close()
        finally:
            locker.stdin.close()
            locker.wait(timeout=10)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_file_of_another_layout_says_which(tmp_path):
    """A master of the previous version left a smaller file with layout 2."""
    path = tmp_path / "balance.80.any"
    path.write_bytes(L.MAGIC + (2).to_bytes(8, sys.byteorder) + bytes(4096))
    os.chmod(path, 0o644)
    with pytest.raises(StateError, match=rf"has state layout 2, expected {L.LAYOUT_VERSION}"):
        SharedState.attach(str(path))
    path.write_bytes(b"NOTGBAL!" + bytes(100))
    with pytest.raises(StateError, match="is not a gbalance state file"):
        SharedState.attach(str(path))


def test_release_gives_the_file_and_master_lock_up_but_keeps_the_mapping(tmp_path):
    """A draining master: its name goes (or stays for the master that replaces it),
    the master lock is free at once, and its links keep counting into the mapping."""
    path = str(tmp_path / "balance.80.any")
    old = SharedState.create(path)
    g = old.add_group()
    old.add_channel(g, "127.0.0.1", 8080)
    old.release(unlink=False)           # -r: the new master renames its file over this one
    assert os.path.exists(path) and old.fd == -1 and old.lock_fd == -1
    new = SharedState.create(path)      # the master lock is free: no MasterRunning
    old.q[L.slot(0, 0, L.C_TOTALC)] += 1    # still mapped: a draining link counts on
    assert old.get(0, 0, L.C_TOTALC) == 1 and new.ngroups == 0
    old.release()                       # twice: nothing more to give up
    old.close()
    new.release()                       # SIGTERM: the name goes with it
    assert not os.path.exists(path)
    new.close()
