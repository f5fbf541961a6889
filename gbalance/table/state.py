"""The shared channel table: one mapped state file per master, its life cycle and accessors.

One file per master, named by listening port and bind address
(:mod:`gbalance.table.files`), holds the whole routing table (groups,
channels, states, counters), the master's pid and start time, and a
one-slot request mailbox; its layout, and who may write which slot of it,
are :mod:`gbalance.table.layout`'s.  The master routes every connection
from it; ``balance -i``/``-c`` sessions map the same file.

:class:`SharedState` creates a master's file (or prepares it under a
temporary name for ``-r`` and puts it in place later), attaches a shell or
worker to an existing one, gives a master's file up while keeping the
mapping (:meth:`SharedState.release`), and reads and writes the table
through named accessors; the hot path indexes :attr:`SharedState.q`
directly.  A file cut short while mapped costs no process its life
(:mod:`gbalance.system.mapguard`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import stat
import sys
import time
from collections.abc import Iterator

from gbalance.system import mapguard
from gbalance.table.files import (MasterRunning, StateError, UnsafeState, check_own_file, current_umask,
                                  lock_path, make_directory, open_nofollow, read_pid_at, rename_over,
                                  shared_directory)
from gbalance.table.layout import (ADDR_LEN, ADDR_OFFSET, C_C, C_CHANGED, C_MAXC, C_PORT, C_RCVD, C_SENT,
                                   C_SLOTS, C_STATUS, C_SUSPECT, C_TOTALC, COUNTER_BASES, ENABLED, FILE_SIZE,
                                   G_NCHANNELS, G_RR_NEXT, G_TYPE, H_GENERATION, H_MAXCHANNELS,
                                   H_MAXGROUPS, H_MONITOR, H_NGROUPS, H_PID, H_START_TICKS, H_STARTED,
                                   H_VERSION, H_WORKERS, LAYOUT_VERSION, MAGIC, MAXCHANNELS, MAXGROUPS,
                                   MAXWORKERS, REQ_ADDR_OFFSET, RR, Channel, gslot, row_sum, slot)
from gbalance.table.liveness import master_process_alive, process_start_ticks
from gbalance.table.locks import is_locked, try_lock

CHANGE_LOCK_WAIT = 5.0


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
        make_directory(path)
        lock_fd = cls._take_master_lock(path)
        try:
            fd, tmp = cls._fresh_file(path)
            try:
                rename_over(tmp, path)
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
        make_directory(path)
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
            rename_over(self.pending, self.path)
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
            fd = open_nofollow(lpath, os.O_RDWR | os.O_CREAT, 0o600)
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
                taken = try_lock(fd, fcntl.F_WRLCK, 0)
            except OSError as exc:
                raise StateError(f"cannot lock {lpath}: {exc.strerror}", exc.errno)
            if not taken:
                raise MasterRunning(path, read_pid_at(path))
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
            fd = open_nofollow(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except StateError:
            raise
        except OSError as exc:
            raise StateError(f"cannot create state file in {directory}: {exc.strerror}", exc.errno)
        try:
            # Group and others may read (show), only the owner may change;
            # a stricter umask (077: 0600) takes read access away from them.
            os.fchmod(fd, 0o644 & ~current_umask())
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
            fd = open_nofollow(path, os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StateError(f"cannot open state file {path}: {exc.strerror}", exc.errno)
            # Not ours to write, or a read-only file system (a sandboxed
            # reader such as the metrics unit): reading is enough.
            writable = False
            try:
                fd = open_nofollow(path, os.O_RDONLY)
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
            if info.st_uid not in (os.geteuid(), 0) and shared_directory(path):
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

    def release(self, unlink: bool = True) -> None:
        """Give up a master's state file but keep its mapping.

        The file is unlinked (only if the path still names our file; with
        ``unlink`` False it stays for the master that replaces us, which
        renames its own over it, so the name is never free for another user to
        take), its descriptor is closed, and the lock file's descriptor with
        the master lock on it (the only lock the master holds, byte 0) is closed
        so ``-i``/``-c`` sessions of the owner see this master as gone.  The
        mapping stays valid: draining links keep counting into it.  A prepared
        file never put in place goes.
        """
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            name = self.pending or self.path
            if (unlink or self.pending) and os.stat(name).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(name)
        with contextlib.suppress(OSError):
            os.close(self.fd)        # (no lock is ever taken on the state file itself)
        self.fd = -1
        if self.lock_fd >= 0:        # the master lock on the owner-only lock file
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = -1

    # -- locks and liveness ------------------------------------------------

    def _lock_file(self) -> int | None:
        """The lock file, opened on first use; None if this user may not open it."""
        if self.lock_fd < 0:
            try:
                fd = open_nofollow(lock_path(self.path), os.O_RDWR if self.writable else os.O_RDONLY)
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
            fd = open_nofollow(path, os.O_RDWR)
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
            return is_locked(fd, 0)
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
                if try_lock(fd, fcntl.F_WRLCK, 1):
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
            try_lock(fd, fcntl.F_UNLCK, 1)

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
        base = COUNTER_BASES.get(field)
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
