"""The shared channel table: an mmap'd file, and who may write which slot of it.

One file per master, named by listening port and bind address, holds the
whole routing table (groups, channels, states, counters), the master's pid
and start time, and a one-slot request mailbox.  The master routes every
connection from it; ``balance -i``/``-c`` sessions map the same file.  The
layout is fixed and versioned:

* bytes 0..7: the magic ``GBALSTAT``;
* then one array of signed 64-bit slots: a header (with the mailbox),
  ``MAXGROUPS`` group records and ``MAXGROUPS * MAXCHANNELS`` channel records,
  followed by the counter rows of workers 1 to ``MAXWORKERS - 1`` (``-w``):
  each a copy of the channel records' shape (:data:`TABLE_SLOTS` slots) of
  which only the counter fields are used; worker 0 (and the single process
  of ``-w 1``) counts in the channel records themselves;
* then one fixed-size, NUL-padded text field per channel: its numeric
  address; then one more such field: the address argument of a request.

Every number is a 64-bit slot so that a serving process can update its
counters with a plain indexed add on a ``memoryview`` (no struct packing, no
allocation, and no lock but in the one case :mod:`gbalance.counters` names).

Who writes which slot
---------------------

==========================  ==========================================  =====================
slots                       writer                                      when
==========================  ==========================================  =====================
header identity (version,   the master, in :meth:`SharedState.create`   once, before the file
pid, start time, limits)                                                is renamed into place
``H_REQ_*`` and the         a shell of the master's own user            under the change lock
request address                                                         (owner-only lock file)
``H_ACK_*``                 the master (:mod:`gbalance.mailbox`)        after applying a request
groups, channel set,        the master (:mod:`gbalance.channels`)       start-up, requests,
addresses, status, maxc,                                                connect results (-w 1),
suspect/fails/passes,       (:mod:`gbalance.carry` copies them into     monitoring; at a
monitor switch, generation  the new file at a reload)                   reload, before serving
``C_TOTALC``, ``C_C``       the process that serves (server's channel   per connection
in counter row *w*          events, :mod:`gbalance.forward` on close):
                            the master with ``-w 1``, worker *w* with
                            ``-w N``; with N > 1 ``C_C`` of a channel
                            with ``maxc`` is raised under the maxc lock
                            (:mod:`gbalance.counters`)
``C_C`` of a dead worker's  the master (:mod:`gbalance.pool`)           after the worker died,
row                                                                     before its replacement
``C_SENT``, ``C_RCVD``,     the serving process, in its own row         per chunk / connect
``C_STAGGERED`` in row *w*  (:mod:`gbalance.forward`, connect)
``C_*_BASE`` (reset,        the master (:mod:`gbalance.channels`,       on a ``reset`` request;
carried counters)           :mod:`gbalance.carry`)                      at a reload (``-r``)
``G_RR_NEXT``               the master with ``-w 1``                    per connection
                            (:mod:`gbalance.routing`); with N > 1 each
                            worker keeps its own cursor in memory
``C_STAGGER_US``            any serving process (last writer wins)      per connect (with -m)
status and suspect mark,    the serving process: a worker with          connect results, an
``C_CHANGED``, ``C_PASSES`` ``-w N`` (``-a``, passive detection,        address read back
= 0, on a connect result    through :mod:`gbalance.channels`, under     invalid
                            the maxc lock; ``C_PASSES`` = 0 just
                            after it, outside: at worst a rise count
                            is one off)
``H_WORKERS``               the master, at start-up                     once
``H_TABLE_DIGEST``          the master, at start-up                     once
==========================  ==========================================  =====================

Readers sum the counter rows (``C_C``, ``C_TOTALC``, ``C_SENT``, ``C_RCVD``,
``C_STAGGERED`` over rows ``0 .. H_WORKERS - 1``) and subtract the reset
baselines: a ``reset`` never writes a counter another process adds to, it
records the sums at that moment in ``C_TOTALC_BASE``, ``C_SENT_BASE`` and
``C_RCVD_BASE``.

With ``-w N`` the serving processes are the workers; they also make the
connect-result transitions (autodisable, passive detection, suspect marks)
through :mod:`gbalance.channels`, as balance's forked children did.  Each
change of a status or suspect mark is then read, decided and written under
the maxc lock (byte 2 of the lock file), by workers and master alike, so a
worker's connect result cannot undo an admin's ``disable`` or a check's
result made meanwhile.  Everything else stays the master's.

A shell never writes the table itself: it posts a request in the mailbox
and waits for the master's acknowledgement (see :mod:`gbalance.mailbox`), so
a ``reset`` can never race with the master's counting.  The master takes no
lock per connection: it holds the *master lock* (byte 0 of the lock file)
for its life, and shells of the same user take the *change lock* (byte 1)
to use the mailbox one at a time.  With ``-w N`` (N > 1) the workers take the
*maxc lock* (byte 2) for the few instructions that count a connection to a
channel with a ``maxc`` limit (:mod:`gbalance.counters`); channels without a
limit never take it.  Workers and the master also take it for a channel
state change (:meth:`gbalance.channels.Channels.fire`), never per
connection.

Permissions: the state file is 0644 (everybody may ``show``), the lock file
beside it (``.balance.<port>.<bind>.lock``) is 0600, so no other user can
hold a lock the master or its shells wait for.  Files are opened without
following symbolic links; a directory writable by others (unless sticky) or
a file owned by another user is refused.  Liveness is decided by the lock
file for the owner, and by pid plus process start time plus command line
for everybody else, so no other user can make a dead master look alive.

Every count read from the file is clamped to its range before it is used
(:attr:`SharedState.ngroups`, :meth:`SharedState.nchannels`), and a file
cut short while mapped costs no process its life (:mod:`gbalance.mapguard`).

This module imports nothing from the rest of the package but the leaf
:mod:`gbalance.mapguard`.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import mmap
import os
import re
import stat
import struct
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from gbalance.system import mapguard

MAGIC = b"GBALSTAT"
LAYOUT_VERSION = 3
MAXGROUPS = 32
MAXCHANNELS = 64
#: Most worker processes (``-w``); each has a counter row.
MAXWORKERS = 64
ADDR_LEN = 64

#: Environment variable that moves the state directory (for non-root users).
STATE_DIR_ENV = "BALANCE_STATE_DIR"
DEFAULT_STATE_DIR = "/var/run/balance"
#: How long a shell waits for another shell of the same user to finish a change.
CHANGE_LOCK_WAIT = 5.0

# Header slots.
H_VERSION = 0
H_PID = 1
H_MAXGROUPS = 2
H_MAXCHANNELS = 3
H_GENERATION = 4   # bumped whenever a channel's address or the channel set changes
H_MONITOR = 5      # MON_NONE / MON_ENABLED / MON_DISABLED
# slot 6 is unused (layout version 3 kept it)
H_STARTED = 7      # unix time the master started
H_NGROUPS = 8
H_START_TICKS = 9  # the master's start time in clock ticks after boot (/proc/<pid>/stat field 22)
H_WORKERS = 10     # counter rows in use: the -w number (1 = the master alone)
H_STAGGER_US = 11  # stagger delay of a channel not measured yet, microseconds (0 = off)
H_TABLE_DIGEST = 12  # digest of the command line's table (gbalance.carry; 0 = unknown)
# The request mailbox (see gbalance.mailbox).
H_REQ_SEQ = 16     # written last by the shell; -1 while it writes the arguments
H_REQ_OP = 17
H_REQ_G = 18
H_REQ_C = 19
H_REQ_A = 20
H_REQ_B = 21
H_ACK_SEQ = 24     # written last by the master: the request it answered
H_ACK_RESULT = 25
H_ACK_VALUE = 26
H_SLOTS = 32

# Group record slots.
G_NCHANNELS = 0
G_TYPE = 1
G_RR_NEXT = 2
G_SLOTS = 4

# Channel record slots.
C_STATUS = 0
C_PORT = 1
C_MAXC = 2
C_C = 3
C_TOTALC = 4
C_SENT = 5      # bytes client -> server
C_RCVD = 6      # bytes server -> client
C_SUSPECT = 7   # a connect has been pending too long (monitoring)
C_FAILS = 8     # consecutive failed checks (monitoring)
C_PASSES = 9    # consecutive passed checks (monitoring)
C_CHANGED = 10  # unix time of the last state change
C_STAGGER_US = 11  # adaptive stagger delay now, in microseconds (monitoring; gauge)
C_STAGGERED = 12   # parallel connects started because this channel's connect hung (counter)
C_TOTALC_BASE = 13  # sum of C_TOTALC at the last reset (readers subtract it)
C_SENT_BASE = 14
C_RCVD_BASE = 15
C_SLOTS = 16

GROUP_BASE = H_SLOTS
CHANNEL_BASE = GROUP_BASE + MAXGROUPS * G_SLOTS
#: Slots of one channel table; worker w's counters are at slot(...) + w * TABLE_SLOTS.
TABLE_SLOTS = MAXGROUPS * MAXCHANNELS * C_SLOTS
NSLOTS = CHANNEL_BASE + MAXWORKERS * TABLE_SLOTS
ADDR_OFFSET = len(MAGIC) + NSLOTS * 8
REQ_ADDR_OFFSET = ADDR_OFFSET + MAXGROUPS * MAXCHANNELS * ADDR_LEN
FILE_SIZE = REQ_ADDR_OFFSET + ADDR_LEN



class ChannelState(enum.IntEnum):
    """A channel's state, as stored in its ``C_STATUS`` slot (the values are the file's)."""

    ENABLED = 0         # ENA: takes connections
    SOFT_DISABLED = 1   # dis: by -a or monitoring; monitoring may re-enable it
    HARD_DISABLED = 2   # DIS: by an admin; only an admin re-enables it


ENABLED = ChannelState.ENABLED
SOFT_DISABLED = ChannelState.SOFT_DISABLED
HARD_DISABLED = ChannelState.HARD_DISABLED
STATUS_NAMES: dict[int, str] = {ENABLED: "ENA", SOFT_DISABLED: "dis", HARD_DISABLED: "DIS"}

# Group types.
RR = 0
HASH = 1
TYPE_NAMES = {RR: "RR", HASH: "Hash"}



class MonitorSwitch(enum.IntEnum):
    """The monitoring switch in the header's ``H_MONITOR`` slot (the values are the file's)."""

    NONE = 0        # the master runs without -m
    ENABLED = 1     # -m, checks run (``monitor enable``)
    DISABLED = 2    # -m, switched off by ``monitor disable``


MON_NONE = MonitorSwitch.NONE
MON_ENABLED = MonitorSwitch.ENABLED
MON_DISABLED = MonitorSwitch.DISABLED


class StateError(Exception):
    """The state file cannot be used; ``errno`` tells why when the OS said so."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class UnsafeState(StateError):
    """A state directory or file that another user could control: refused."""

    def __init__(self, message: str):
        super().__init__(message, errno.EPERM)


class MasterRunning(StateError):
    """Another live master already owns this port and bind address."""

    def __init__(self, path: str, pid: int):
        super().__init__(f"a balance master (pid {pid}) already serves this port and address ({path})")
        self.pid = pid


@dataclass
class Channel:
    """A snapshot of one channel record (for the shell and tests)."""

    group: int
    index: int
    status: int
    address: str
    port: int
    maxc: int
    c: int
    totalc: int
    sent: int
    rcvd: int
    suspect: int


def state_dir() -> str:
    """Return the state directory, honouring ``$BALANCE_STATE_DIR``."""
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def state_path(port: int, bind: str | None, directory: str | None = None) -> str:
    """Name the state file of the master on ``port`` and ``bind`` address.

    Without ``-b`` the key is ``any`` whether or not ``-6`` was given, so
    ``balance -i 80`` finds a master started as ``balance -6 80 ...``.
    """
    key = bind if bind else "any"
    key = re.sub(r"[^A-Za-z0-9.:_-]", "_", key)
    return os.path.join(directory or state_dir(), f"balance.{port}.{key}")


def lock_path(path: str) -> str:
    """The owner-only lock file that goes with the state file ``path``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.lock")


def slot(group: int, channel: int, field: int) -> int:
    """Index into :attr:`SharedState.q` of one field of one channel."""
    return CHANNEL_BASE + (group * MAXCHANNELS + channel) * C_SLOTS + field


def row_offset(worker: int) -> int:
    """What to add to a :func:`slot` index to reach worker ``worker``'s counter row."""
    return worker * TABLE_SLOTS


def row_sum(q: memoryview, index: int, rows: int) -> int:
    """The sum of slot ``index`` (a :func:`slot` of a counter field) over ``rows`` rows."""
    total = q[index]
    for w in range(1, max(1, min(rows, MAXWORKERS))):
        total += q[index + w * TABLE_SLOTS]
    return total


def gslot(group: int, field: int) -> int:
    """Index into :attr:`SharedState.q` of one field of one group."""
    return GROUP_BASE + group * G_SLOTS + field


# -- safety checks -------------------------------------------------------------

def check_directory(directory: str) -> None:
    """Refuse a state directory another user could use to swap our files.

    It must be a real directory owned by us or by root, and not writable by
    group or others unless it is sticky (like /tmp), where nobody else may
    rename or remove our files.
    """
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise StateError(f"cannot use state directory {directory}: {exc.strerror}", exc.errno)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeState(f"refusing state directory {directory}: not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeState(f"refusing state directory {directory}: owned by uid {st.st_uid}")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafeState(f"refusing state directory {directory}: writable by other users")


def check_own_file(path: str, st: os.stat_result, what: str = "state file") -> None:
    """Refuse anything but a plain file of ours with a single name."""
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeState(f"refusing {what} {path}: not a regular file")
    if st.st_uid != os.geteuid():
        raise UnsafeState(f"refusing {what} {path}: owned by uid {st.st_uid}")
    if st.st_nlink != 1:
        raise UnsafeState(f"refusing {what} {path}: it has other names (hard links)")


def _open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symbolic link at ``path``, nor waits
    for a writer when another user has put a FIFO there (O_NONBLOCK: no
    effect on a regular file; the caller then refuses what is not one)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeState(f"refusing {path}: it is a symbolic link")
        raise


# -- locks ---------------------------------------------------------------------------
# Open-file-description locks: they belong to the open file, not the process,
# so closing another descriptor of the lock file never drops them, and two
# opens in one process exclude each other like two processes would.

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"   # struct flock: type, whence, start, len, pid


def _try_lock(fd: int, kind: int, start: int) -> bool:
    """Take (``F_WRLCK``/``F_RDLCK``) or drop (``F_UNLCK``) one byte without waiting."""
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, start, 1, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _locked(fd: int, start: int) -> bool:
    """True if someone holds a lock on byte ``start`` that a read lock would conflict with."""
    res = fcntl.fcntl(fd, _F_OFD_GETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, start, 1, 0))
    return struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK


# -- liveness --------------------------------------------------------------------

def process_start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time after boot, clock ticks); None if gone.

    A zombie counts as gone: it has exited.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_balance_process(pid: int) -> bool:
    """True if ``pid``'s command line names a balance program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(b"balance" in os.path.basename(arg) for arg in argv[:3])


def master_process_alive(pid: int, start_ticks: int) -> bool:
    """True if ``pid`` is the very balance master that recorded ``start_ticks``.

    Decided from /proc alone, so no other process can fake it; never true
    for pid 0 or 1 (never a master we may signal or trust).
    """
    if pid <= 1:
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and ticks == start_ticks and is_balance_process(pid)


class SharedState:
    """A mapped state file.

    ``q`` is the array of 64-bit slots; the hot path indexes it directly with
    indices from :func:`slot`.  Everything else goes through the methods.
    """

    def __init__(self, path: str, fd: int, writable: bool, lock_fd: int = -1):
        self.path = path
        self.fd = fd
        self.writable = writable
        self.lock_fd = lock_fd
        self.owner = os.geteuid()   # the state file's owner (set by attach)
        self.pending = ""           # temporary name of a prepared file not yet in place
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.mm = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, prot)
        # A file cut short under the mapping must not kill this process (SIGBUS).
        self._guard = mapguard.guard(self.mm, FILE_SIZE, fd, writable)
        self.q = memoryview(self.mm)[len(MAGIC):ADDR_OFFSET].cast("q")

    # -- opening ---------------------------------------------------------

    @classmethod
    def create(cls, path: str) -> "SharedState":
        """Create the state file for a new master (replacing a dead master's).

        Takes the master lock (on the owner-only lock file) for the life of
        the process, then writes a fresh file beside the old one and renames
        it over whatever is at ``path`` (a dead master's file, a stale
        symbolic link of ours), so nothing another process holds or planted
        at ``path`` is ever written through.  Raises :class:`MasterRunning`
        when a live master holds the lock, :class:`UnsafeState` for a
        directory or file another user controls, and :class:`StateError`
        when the directory or file cannot be used.
        """
        _make_directory(path)
        lock_fd = cls._take_master_lock(path)
        try:
            fd, tmp = cls._fresh_file(path)
            try:
                _rename_over(tmp, path)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        st = cls(path, fd, True, lock_fd)
        st._init_header()
        return st

    @classmethod
    def prepare(cls, path: str) -> "SharedState":
        """A new master's state file, written but not yet at ``path`` (``-r``).

        The running master still owns ``path`` and the master lock; the new
        file waits under a temporary name beside it (``pending``) until
        :meth:`place` takes the lock and renames it into place, so nothing
        that can fail on the file itself is left for after the hand-over.
        """
        _make_directory(path)
        fd, tmp = cls._fresh_file(path)
        st = cls(path, fd, True)
        st.pending = tmp
        st._init_header()
        return st

    def place(self, retry: float = 0.0) -> None:
        """Take the master lock and rename a :meth:`prepare`d file onto ``path``.

        ``retry``: keep trying this long while another master still holds
        the lock.  Raises :class:`MasterRunning` or :class:`StateError`; the
        file then stays under its temporary name (still mapped).
        """
        if not self.pending:
            return
        deadline = time.monotonic() + retry
        while True:
            try:
                lock_fd = self._take_master_lock(self.path)
                break
            except MasterRunning:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        try:
            _rename_over(self.pending, self.path)
        except BaseException:
            os.close(lock_fd)
            raise
        self.lock_fd = lock_fd
        self.pending = ""

    def _init_header(self) -> None:
        self.mm[: len(MAGIC)] = MAGIC
        q = self.q
        q[H_VERSION] = LAYOUT_VERSION
        q[H_MAXGROUPS] = MAXGROUPS
        q[H_MAXCHANNELS] = MAXCHANNELS
        q[H_PID] = os.getpid()
        q[H_START_TICKS] = process_start_ticks(os.getpid()) or 0
        q[H_STARTED] = int(time.time())
        q[H_WORKERS] = 1

    @staticmethod
    def _take_master_lock(path: str) -> int:
        """Open (creating, 0600) the lock file and take the master lock, or raise."""
        lpath = lock_path(path)
        try:
            fd = _open_nofollow(lpath, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise UnsafeState(f"refusing lock file {lpath}: {exc.strerror}")
            raise StateError(f"cannot open lock file {lpath}: {exc.strerror}", exc.errno)
        try:
            info = os.fstat(fd)
            check_own_file(lpath, info, "lock file")
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
            try:
                taken = _try_lock(fd, fcntl.F_WRLCK, 0)
            except OSError as exc:
                raise StateError(f"cannot lock {lpath}: {exc.strerror}", exc.errno)
            if not taken:
                raise MasterRunning(path, _read_pid_at(path))
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _fresh_file(path: str) -> tuple[int, str]:
        """A new, initialised-to-zero state file beside ``path``: (fd, its temporary name)."""
        directory, name = os.path.split(path)
        tmp = os.path.join(directory or ".", f".{name}.new.{os.getpid()}")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)   # our own left-over from a crashed start with our pid
            fd = _open_nofollow(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except StateError:
            raise
        except OSError as exc:
            raise StateError(f"cannot create state file in {directory}: {exc.strerror}", exc.errno)
        try:
            # Group and others may read (show), only the owner may change;
            # a stricter umask (077: 0600) takes read access away from them.
            os.fchmod(fd, 0o644 & ~_current_umask())
            os.ftruncate(fd, FILE_SIZE)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(f"cannot initialise state file {path}: {exc.strerror}", exc.errno)
        return fd, tmp

    @classmethod
    def attach(cls, path: str) -> "SharedState":
        """Map an existing state file: writable for the master's user, else read-only
        (also when the file system is read-only).

        Never follows a symbolic link; refuses a file that others may write.
        """
        writable = True
        try:
            fd = _open_nofollow(path, os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StateError(f"cannot open state file {path}: {exc.strerror}", exc.errno)
            # Not ours to write, or a read-only file system (a sandboxed
            # reader such as the metrics unit): reading is enough.
            writable = False
            try:
                fd = _open_nofollow(path, os.O_RDONLY)
            except StateError:
                raise
            except OSError as exc:
                raise StateError(f"cannot open state file {path}: {exc.strerror}", exc.errno)
        except StateError:
            raise
        except OSError as exc:
            raise StateError(f"cannot open state file {path}: {exc.strerror}", exc.errno)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UnsafeState(f"refusing state file {path}: not a regular file")
            if info.st_mode & 0o022:
                raise UnsafeState(f"refusing state file {path}: writable by other users")
            if info.st_uid not in (os.geteuid(), 0) and _shared_directory(path):
                # In a directory anybody may write to (/tmp), anybody may have put it there.
                raise UnsafeState(f"refusing state file {path}: owned by uid {info.st_uid}"
                                  " in a directory other users may write to")
            if writable and info.st_uid != os.geteuid() and os.geteuid() != 0:
                writable = False
            head = os.pread(fd, len(MAGIC) + 8, 0)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise StateError(f"{path} is not a gbalance state file")
            version = int.from_bytes(head[len(MAGIC):], sys.byteorder, signed=True)
            if version != LAYOUT_VERSION:   # a master of another version (smaller file)
                raise StateError(f"{path} has state layout {version}, expected {LAYOUT_VERSION}")
            if info.st_size < FILE_SIZE:
                raise StateError(f"{path} is not a gbalance state file")
            st = cls(path, fd, writable)
            st.owner = info.st_uid
        except Exception:
            os.close(fd)
            raise
        version = st.q[H_VERSION]
        if version != LAYOUT_VERSION:
            st.close()
            raise StateError(f"{path} has state layout {version}, expected {LAYOUT_VERSION}")
        return st

    def close(self) -> None:
        """Unmap and close (which also drops any lock this process holds)."""
        try:
            self.q.release()
            mapguard.unguard(self._guard)
            self.mm.close()
        except (BufferError, ValueError):
            pass
        for fd in (self.fd, self.lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.lock_fd = -1

    # -- locks and liveness ------------------------------------------------

    def _lock_file(self) -> int | None:
        """The lock file, opened on first use; None if this user may not open it."""
        if self.lock_fd < 0:
            try:
                fd = _open_nofollow(lock_path(self.path), os.O_RDWR if self.writable else os.O_RDONLY)
            except (OSError, StateError):
                return None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077 or info.st_uid != self.owner:
                    os.close(fd)
                    return None
            except OSError:
                os.close(fd)
                return None
            self.lock_fd = fd
        return self.lock_fd

    def open_own_lock(self) -> int:
        """A new open file description of the lock file (a worker's, for the maxc lock).

        Locks taken through it exclude those of every other open, even in
        processes forked from this one.  Raises :class:`StateError` when
        the lock file cannot be opened or is not the owner's private file.
        """
        path = lock_path(self.path)
        try:
            fd = _open_nofollow(path, os.O_RDWR)
        except OSError as exc:
            raise StateError(f"cannot open lock file {path}: {exc.strerror}", exc.errno)
        try:
            info = os.fstat(fd)
            check_own_file(path, info, "lock file")
            if info.st_mode & 0o077:
                raise UnsafeState(f"refusing lock file {path}: other users may open it")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def master_alive(self) -> bool:
        """True while the master that wrote this file runs.

        The owner asks the master lock; anybody else (who cannot open the
        owner-only lock file) checks pid, start time and command line.
        """
        q = self.q
        pid, ticks = q[H_PID], q[H_START_TICKS]
        if pid == os.getpid() and ticks == (process_start_ticks(pid) or 0):
            return True
        fd = self._lock_file()
        if fd is None:
            return master_process_alive(pid, ticks)
        try:
            return _locked(fd, 0)
        except OSError:
            return master_process_alive(pid, ticks)

    def live_pid(self) -> int:
        """The master's pid if it is alive and really a balance master, else 0.

        The only pid it is ever safe to signal.
        """
        pid = self.q[H_PID]
        if self.master_alive() and master_process_alive(pid, self.q[H_START_TICKS]):
            return pid
        return 0

    @contextlib.contextmanager
    def change(self, wait: float = CHANGE_LOCK_WAIT) -> Iterator["SharedState"]:
        """Hold the change lock (byte 1 of the owner-only lock file).

        Shells of the master's user take it to use the mailbox one at a
        time; only they can open the lock file, so only they can delay each
        other, and never for more than ``wait`` seconds.  Raises
        ``PermissionError`` when this process may only read the table.
        """
        if not self.writable:
            raise PermissionError(errno.EACCES, "permission denied")
        fd = self._lock_file()
        if fd is None:
            raise PermissionError(errno.EACCES, "permission denied")
        deadline = time.monotonic() + wait
        while True:
            try:
                if _try_lock(fd, fcntl.F_WRLCK, 1):
                    break
            except OSError as exc:
                raise StateError(f"cannot lock {lock_path(self.path)}: {exc.strerror}", exc.errno)
            if time.monotonic() >= deadline:
                raise StateError(f"another session kept the table busy for {wait:g} seconds",
                                 errno.EBUSY)
            time.sleep(0.005)
        try:
            yield self
        finally:
            _try_lock(fd, fcntl.F_UNLCK, 1)

    # -- header ------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.q[H_PID]

    @property
    def started(self) -> int:
        """Unix time the master started."""
        return self.q[H_STARTED]

    @property
    def ngroups(self) -> int:
        """Groups in use, within 0..MAXGROUPS whatever the file says."""
        return max(0, min(self.q[H_NGROUPS], MAXGROUPS))

    @property
    def generation(self) -> int:
        return self.q[H_GENERATION]

    def bump_generation(self) -> None:
        """Tell the master that channel addresses or the channel set changed."""
        self.q[H_GENERATION] += 1

    @property
    def workers(self) -> int:
        """Counter rows in use (the master's ``-w``), bounded for a damaged file."""
        return max(1, min(self.q[H_WORKERS], MAXWORKERS))

    def set_workers(self, n: int) -> None:
        self.q[H_WORKERS] = n

    def counter(self, group: int, channel: int, field: int) -> int:
        """A counter summed over the rows in use, less its reset baseline."""
        q = self.q
        i = slot(group, channel, field)
        value = row_sum(q, i, self.workers)
        base = _BASES.get(field)
        if base is not None:
            value -= q[i - field + base]
        return value

    @property
    def monitor(self) -> int:
        return self.q[H_MONITOR]

    def set_monitor(self, value: int) -> None:
        self.q[H_MONITOR] = value

    # -- groups --------------------------------------------------------------

    def nchannels(self, group: int) -> int:
        """Channels of ``group``, within 0..MAXCHANNELS whatever the file says (0 for no group)."""
        if not 0 <= group < MAXGROUPS:
            return 0
        return max(0, min(self.q[gslot(group, G_NCHANNELS)], MAXCHANNELS))

    def group_type(self, group: int) -> int:
        return self.q[gslot(group, G_TYPE)]

    def set_group_type(self, group: int, kind: int) -> None:
        self.q[gslot(group, G_TYPE)] = kind

    def add_group(self, kind: int = RR) -> int:
        """Append an empty group and return its number (never writing outside the group records)."""
        g = self.ngroups
        if g >= MAXGROUPS:
            raise StateError("too many groups")
        self.q[gslot(g, G_NCHANNELS)] = 0
        self.q[gslot(g, G_TYPE)] = kind
        self.q[gslot(g, G_RR_NEXT)] = 0
        self.q[H_NGROUPS] = g + 1
        return g

    # -- channels ------------------------------------------------------------

    def add_channel(self, group: int, address: str, port: int, maxc: int = 0,
                    status: int = ENABLED) -> int:
        """Append a channel to ``group`` and return its index.

        Raises :class:`StateError` when the group is full or no group.
        """
        if not 0 <= group < MAXGROUPS:
            raise StateError("no such group")
        n = self.nchannels(group)
        if n >= MAXCHANNELS:
            raise StateError("no channel slots available")
        base = slot(group, n, 0)
        for i in range(C_SLOTS):
            self.q[base + i] = 0
        self.set_address(group, n, address, port)
        self.q[base + C_MAXC] = maxc
        self.q[base + C_STATUS] = status
        self.q[base + C_CHANGED] = int(time.time())
        self.q[gslot(group, G_NCHANNELS)] = n + 1
        self.bump_generation()
        return n

    def address(self, group: int, channel: int) -> str:
        off = ADDR_OFFSET + (group * MAXCHANNELS + channel) * ADDR_LEN
        raw = self.mm[off: off + ADDR_LEN]
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def set_address(self, group: int, channel: int, address: str, port: int) -> None:
        """Re-point a channel; the caller bumps the generation if it must."""
        data = address.encode("ascii")[: ADDR_LEN - 1]
        off = ADDR_OFFSET + (group * MAXCHANNELS + channel) * ADDR_LEN
        self.mm[off: off + ADDR_LEN] = data.ljust(ADDR_LEN, b"\0")
        self.q[slot(group, channel, C_PORT)] = port

    def request_address(self) -> str:
        """The address argument of the pending request."""
        raw = self.mm[REQ_ADDR_OFFSET: REQ_ADDR_OFFSET + ADDR_LEN]
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def set_request_address(self, address: str) -> None:
        data = address.encode("ascii", "replace")[: ADDR_LEN - 1]
        self.mm[REQ_ADDR_OFFSET: REQ_ADDR_OFFSET + ADDR_LEN] = data.ljust(ADDR_LEN, b"\0")

    def get(self, group: int, channel: int, field: int) -> int:
        return self.q[slot(group, channel, field)]

    def put(self, group: int, channel: int, field: int, value: int) -> None:
        self.q[slot(group, channel, field)] = value

    def set_status(self, group: int, channel: int, status: int) -> None:
        self.q[slot(group, channel, C_STATUS)] = status
        self.q[slot(group, channel, C_CHANGED)] = int(time.time())

    def channel(self, group: int, channel: int) -> Channel:
        """A snapshot of one channel record."""
        b = slot(group, channel, 0)
        q = self.q
        cnt = self.counter
        return Channel(group, channel, q[b + C_STATUS], self.address(group, channel),
                       q[b + C_PORT], q[b + C_MAXC], cnt(group, channel, C_C),
                       cnt(group, channel, C_TOTALC), cnt(group, channel, C_SENT),
                       cnt(group, channel, C_RCVD), q[b + C_SUSPECT])

    def channels(self) -> Iterator[Channel]:
        """Every channel of every group, in order (bounded even in a damaged file)."""
        for g in range(max(0, min(self.ngroups, MAXGROUPS))):
            for c in range(max(0, min(self.nchannels(g), MAXCHANNELS))):
                yield self.channel(g, c)


_BASES = {C_TOTALC: C_TOTALC_BASE, C_SENT: C_SENT_BASE, C_RCVD: C_RCVD_BASE}


def _current_umask() -> int:
    """The process's umask (read by setting it, and setting it back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask

def _make_directory(path: str) -> None:
    """Create the state directory of ``path`` if needed and refuse an unsafe one."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {directory}: {exc.strerror}", exc.errno)
    check_directory(directory)


def _rename_over(tmp: str, path: str) -> None:
    """Put the file ``tmp`` at ``path``, replacing whatever name is there.

    A rename replaces a symbolic link or another name of ours without ever
    following it.  Only a sticky directory refuses: another user's entry
    there may not be replaced, and that is said as such.
    """
    try:
        os.rename(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            try:
                st = os.lstat(path)
            except OSError:
                raise UnsafeState(f"refusing state file {path}: {exc.strerror}")
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
            raise UnsafeState(f"refusing state file {path}: {kind} owned by uid {st.st_uid} in a"
                              " sticky directory (it may not be replaced)")
        raise StateError(f"cannot put state file {path} in place: {exc.strerror}", exc.errno)


def _shared_directory(path: str) -> bool:
    """True if users other than its owner may create files in ``path``'s directory."""
    try:
        st = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return True
    return bool(st.st_mode & 0o022)


def _read_pid_at(path: str) -> int:
    """The pid recorded in the state file at ``path``, or 0 if it cannot be read."""
    try:
        fd = _open_nofollow(path, os.O_RDONLY)
    except (OSError, StateError):
        return 0
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int:
    """The pid recorded in a state file, or 0 if it cannot be read."""
    try:
        raw = os.pread(fd, 8 * (H_PID + 1), len(MAGIC))
        return int.from_bytes(raw[H_PID * 8: H_PID * 8 + 8], sys.byteorder, signed=True)
    except (OSError, ValueError):
        return 0
