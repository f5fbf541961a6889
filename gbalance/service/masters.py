"""The masters of the instances: find them, start them, signal only them.

Stopping uses the master pid recorded in each instance's state file, and
only while that master is alive, so nothing is ever killed by name.  Only
state files and an ``init-instances`` record owned by this user (root) are
trusted, only keys of the ``PORT.ADDR`` form are read from the record
(written through mkstemp and rename), and pid, start time and command line
are checked again right before every signal, SIGKILL included.  Every
balance it runs starts in ``/``.  Environment: BALANCE_BIN (the balance
command), BALANCE_STATE_DIR (as for balance).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from gbalance.service.conffile import Instance, Out
from gbalance.system.child import SAFE_CWD
from gbalance.table.files import StateError, check_directory, state_dir
from gbalance.table.layout import H_START_TICKS
from gbalance.table.liveness import master_process_alive
from gbalance.table.state import SharedState

RECORD = "init-instances"      # keys started by the init script, in the state dir
START_TIMEOUT = 60.0


def balance_bin() -> str:
    """The balance command: $BALANCE_BIN, the one beside this script, or /usr/sbin/balance."""
    if os.environ.get("BALANCE_BIN"):
        return os.environ["BALANCE_BIN"]
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0] or ".")), "balance")
    if os.path.basename(sys.argv[0] or "") == "balance-instances" and os.access(beside, os.X_OK):
        return beside
    return "/usr/sbin/balance"


#: An instance key: "<port>.<bind address or any>" as state.state_path spells it.
KEY = re.compile(r"[1-9][0-9]{0,4}\.[A-Za-z0-9:_-][A-Za-z0-9.:_-]{0,254}")


def valid_key(key: str) -> bool:
    """True for a key of the ``PORT.ADDR`` form (no path, no "..")."""
    return bool(KEY.fullmatch(key)) and int(key.split(".", 1)[0]) <= 65535 and ".." not in key


@dataclass(frozen=True)
class MasterRef:
    """A live master as its state file recorded it: pid and process start time."""

    key: str
    pid: int
    ticks: int

    def still_there(self) -> bool:
        """True while ``pid`` is that very balance master: same start time, a
        balance command line (checked again right before every signal)."""
        return master_process_alive(self.pid, self.ticks)


def find_master(key: str) -> tuple[MasterRef | None, bool]:
    """(the live master of ``key`` or None, state file exists).

    Only a key of the ``PORT.ADDR`` form and a state file owned by this
    user (root, for the init script) are trusted: a master of another user
    is none of the init script's business, and its file could name any pid.
    """
    if not valid_key(key):
        return None, False
    path = os.path.join(state_dir(), "balance." + key)
    if not os.path.lexists(path):
        return None, False
    try:
        st = SharedState.attach(path)
    except StateError:
        return None, True
    try:
        if st.owner != os.geteuid():
            return None, True
        pid, ticks = st.pid, st.q[H_START_TICKS]
        if not st.master_alive() or not master_process_alive(pid, ticks):
            return None, True
        return MasterRef(key, pid, ticks), True
    finally:
        st.close()


def master_pid(key: str) -> tuple[int, bool]:
    """(pid, state file exists) of the live master of ``key``; pid 0 if none."""
    ref, exists = find_master(key)
    return (ref.pid if ref else 0), exists


def record_path() -> str:
    return os.path.join(state_dir(), RECORD)


def read_record() -> list[str]:
    """Instance keys the init script started earlier (lines may be gone now).

    Only a plain file of this user (never through a symbolic link) is
    read, and only keys of the ``PORT.ADDR`` form are taken from it.
    """
    try:
        fd = os.open(record_path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return []
        data = os.read(fd, 1 << 16)
    except OSError:
        return []
    finally:
        os.close(fd)
    return [k for k in data.decode("ascii", "replace").split() if valid_key(k)]


def write_record(keys: list[str], out: Out) -> None:
    """Replace the record: a new private file (mkstemp) renamed over the old one."""
    directory = state_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        check_directory(directory)
        fd, tmp = tempfile.mkstemp(prefix=f".{RECORD}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write("".join(k + "\n" for k in keys if valid_key(k)))
                os.fchmod(f.fileno(), 0o644)
            os.rename(tmp, record_path())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except StateError as exc:
        out.problem(f"balance: cannot write {record_path()}: {exc}")
    except OSError as exc:
        out.problem(f"balance: cannot write {record_path()}: {exc.strerror}")


def run_balance(inst: Instance, conf: str, out: Out, *extra: str) -> int | None:
    """Run ``balance [extra] <line>`` (it detaches); the new master's pid, or None.

    A proxy that did not come up is reported: balance's own start-up error
    (exit code and message), or a master that is gone right after start.
    """
    argv = [balance_bin(), *extra, *inst.args]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=START_TIMEOUT, cwd=SAFE_CWD)
    except (OSError, subprocess.TimeoutExpired) as exc:
        out.problem(f"balance {inst.key}: {conf} line {inst.line}: cannot start: {exc}")
        return None
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or "no message"
        out.problem(f"balance {inst.key}: {conf} line {inst.line}: failed (exit {done.returncode}): {why}")
        return None
    pid, _ = master_pid(inst.key)
    if not pid:
        out.problem(f"balance {inst.key}: {conf} line {inst.line}: the master exited right after starting")
        return None
    return pid


def signal_master(ref: MasterRef, sig: int) -> bool:
    """Send ``sig`` to the master of ``ref`` if the pid is still that master; True if sent.

    Checked right before the signal: pid, start time and a balance command
    line, so a pid that was reused (or a process that became something
    else) is never signalled.
    """
    if not ref.still_there():
        return False
    try:
        os.kill(ref.pid, sig)
    except ProcessLookupError:
        return False
    return True
