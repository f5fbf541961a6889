"""The shared channel table: an mmap'd file plus fcntl locks.

One file per master, named by listening port and bind address, holds the
whole routing table (groups, channels, states, counters) and the master's
pid.  The master routes every connection from it; ``balance -i``/``-c``
sessions map the same file and change it, so a change applies to the next
connection.  The layout is fixed and versioned:

* bytes 0..7: the magic ``GBALSTAT``;
* then one array of signed 64-bit slots: a header, ``MAXGROUPS`` group
  records and ``MAXGROUPS * MAXCHANNELS`` channel records;
* then one fixed-size, NUL-padded text field per channel: its numeric address.

Every number is a 64-bit slot so that the master can update counters with a
plain indexed add on a ``memoryview`` (no struct packing, no allocation, no
lock).  Only the master writes counters; changes made by a shell take the
*change lock* (byte 1) so two shells never interleave a read-modify-write.
The master holds the *master lock* (byte 0) for its whole life: a file whose
master lock is free belongs to a dead master and may be taken over.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterator

MAGIC = b"GBALSTAT"
LAYOUT_VERSION = 1
MAXGROUPS = 32
MAXCHANNELS = 64
ADDR_LEN = 64

#: Environment variable that moves the state directory (for non-root users).
STATE_DIR_ENV = "BALANCE_STATE_DIR"
DEFAULT_STATE_DIR = "/var/run/balance"

# Header slots.
H_VERSION = 0
H_PID = 1
H_MAXGROUPS = 2
H_MAXCHANNELS = 3
H_GENERATION = 4   # bumped whenever a channel's address or the channel set changes
H_MONITOR = 5      # MON_NONE / MON_ENABLED / MON_DISABLED
H_PORT = 6
H_STARTED = 7
H_NGROUPS = 8
H_SLOTS = 16

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
C_SLOTS = 16

GROUP_BASE = H_SLOTS
CHANNEL_BASE = GROUP_BASE + MAXGROUPS * G_SLOTS
NSLOTS = CHANNEL_BASE + MAXGROUPS * MAXCHANNELS * C_SLOTS
ADDR_OFFSET = len(MAGIC) + NSLOTS * 8
FILE_SIZE = ADDR_OFFSET + MAXGROUPS * MAXCHANNELS * ADDR_LEN

# Channel states.
ENABLED = 0
SOFT_DISABLED = 1   # by -a or monitoring; monitoring may re-enable it
HARD_DISABLED = 2   # by an admin; only an admin re-enables it
STATUS_NAMES = {ENABLED: "ENA", SOFT_DISABLED: "dis", HARD_DISABLED: "DIS"}

# Group types.
RR = 0
HASH = 1
TYPE_NAMES = {RR: "RR", HASH: "Hash"}

# Monitoring state in the header.
MON_NONE = 0
MON_ENABLED = 1
MON_DISABLED = 2


class StateError(Exception):
    """The state file cannot be used; ``errno`` tells why when the OS said so."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


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


def slot(group: int, channel: int, field: int) -> int:
    """Index into :attr:`SharedState.q` of one field of one channel."""
    return CHANNEL_BASE + (group * MAXCHANNELS + channel) * C_SLOTS + field


def gslot(group: int, field: int) -> int:
    """Index into :attr:`SharedState.q` of one field of one group."""
    return GROUP_BASE + group * G_SLOTS + field


class SharedState:
    """A mapped state file.

    ``q`` is the array of 64-bit slots; the hot path indexes it directly with
    indices from :func:`slot`.  Everything else goes through the methods.
    """

    def __init__(self, path: str, fd: int, writable: bool):
        self.path = path
        self.fd = fd
        self.writable = writable
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.mm = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, prot)
        self.q = memoryview(self.mm)[len(MAGIC):ADDR_OFFSET].cast("q")

    # -- opening ---------------------------------------------------------

    @classmethod
    def create(cls, path: str) -> "SharedState":
        """Create (or take over) the state file for a new master.

        Takes the master lock for the life of the process.  Raises
        :class:`MasterRunning` when a live master holds it, and
        :class:`StateError` when the directory or file cannot be used.
        """
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {directory}: {exc.strerror}", exc.errno)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open state file {path}: {exc.strerror}", exc.errno)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as exc:
            pid = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise MasterRunning(path, pid)
            raise StateError(f"cannot lock state file {path}: {exc.strerror}", exc.errno)
        try:
            # Group and others may read (show), only the owner may change.
            os.fchmod(fd, 0o644)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, FILE_SIZE)
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot initialise state file {path}: {exc.strerror}", exc.errno)
        st = cls(path, fd, True)
        st.mm[: len(MAGIC)] = MAGIC
        q = st.q
        q[H_VERSION] = LAYOUT_VERSION
        q[H_MAXGROUPS] = MAXGROUPS
        q[H_MAXCHANNELS] = MAXCHANNELS
        q[H_PID] = os.getpid()
        q[H_STARTED] = int(time.time())
        return st

    @classmethod
    def attach(cls, path: str) -> "SharedState":
        """Map an existing state file, writable if permissions allow."""
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise StateError(f"cannot open state file {path}: {exc.strerror}", exc.errno)
        except OSError as exc:
            raise StateError(f"cannot open state file {path}: {exc.strerror}", exc.errno)
        try:
            if os.fstat(fd).st_size < FILE_SIZE or os.pread(fd, len(MAGIC), 0) != MAGIC:
                raise StateError(f"{path} is not a gbalance state file")
            st = cls(path, fd, writable)
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
            self.mm.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass

    # -- locks and liveness ------------------------------------------------

    def master_alive(self) -> bool:
        """True while some process holds the master lock of this file."""
        if self.q[H_PID] == os.getpid():
            return True
        kind = fcntl.LOCK_EX if self.writable else fcntl.LOCK_SH
        try:
            fcntl.lockf(self.fd, kind | fcntl.LOCK_NB, 1, 0)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
        return False

    @contextlib.contextmanager
    def change(self) -> Iterator["SharedState"]:
        """Hold the change lock while editing the table.

        Raises ``PermissionError`` when this process may only read the file.
        """
        if not self.writable:
            raise PermissionError(errno.EACCES, "permission denied")
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 1)
        try:
            yield self
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 1)

    # -- header ------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.q[H_PID]

    @property
    def ngroups(self) -> int:
        return self.q[H_NGROUPS]

    @property
    def generation(self) -> int:
        return self.q[H_GENERATION]

    def bump_generation(self) -> None:
        """Tell the master that channel addresses or the channel set changed."""
        self.q[H_GENERATION] += 1

    @property
    def monitor(self) -> int:
        return self.q[H_MONITOR]

    def set_monitor(self, value: int) -> None:
        self.q[H_MONITOR] = value

    # -- groups --------------------------------------------------------------

    def nchannels(self, group: int) -> int:
        return self.q[gslot(group, G_NCHANNELS)]

    def group_type(self, group: int) -> int:
        return self.q[gslot(group, G_TYPE)]

    def set_group_type(self, group: int, kind: int) -> None:
        self.q[gslot(group, G_TYPE)] = kind

    def add_group(self, kind: int = RR) -> int:
        """Append an empty group and return its number."""
        g = self.q[H_NGROUPS]
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

        Raises :class:`StateError` when the group is full.
        """
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
        return Channel(group, channel, q[b + C_STATUS], self.address(group, channel),
                       q[b + C_PORT], q[b + C_MAXC], q[b + C_C], q[b + C_TOTALC],
                       q[b + C_SENT], q[b + C_RCVD], q[b + C_SUSPECT])

    def channels(self) -> Iterator[Channel]:
        """Every channel of every group, in order."""
        for g in range(self.ngroups):
            for c in range(self.nchannels(g)):
                yield self.channel(g, c)


def _read_pid(fd: int) -> int:
    """The pid recorded in a state file, or 0 if it cannot be read."""
    try:
        raw = os.pread(fd, 8 * (H_PID + 1), len(MAGIC))
        return int.from_bytes(raw[H_PID * 8: H_PID * 8 + 8], sys.byteorder, signed=True)
    except (OSError, ValueError):
        return 0
