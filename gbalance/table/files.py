"""Where state files live, how they are named, and how they are opened safely.

A state file is named by the master's port and bind address
(:func:`state_path`) in ``$BALANCE_STATE_DIR`` or /var/run/balance, with
an owner-only lock file beside it (:func:`lock_path`).

Permissions: the state file is 0644 (everybody may ``show``), the lock file
beside it (``.balance.<port>.<bind>.lock``) is 0600, so no other user can
hold a lock the master or its shells wait for.  Files are opened without
following symbolic links; a directory writable by others (unless sticky) or
a file owned by another user is refused.  Liveness is decided by the lock
file for the owner, and by pid plus process start time plus command line
for everybody else, so no other user can make a dead master look alive.

The checks here refuse a directory or file another user could control
(:class:`UnsafeState`); every other failure of the file is a
:class:`StateError`.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys

from gbalance.table.layout import H_PID, MAGIC

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


STATE_DIR_ENV = "BALANCE_STATE_DIR"
DEFAULT_STATE_DIR = "/var/run/balance"
#: How long a shell waits for another shell of the same user to finish a change.


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


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symbolic link at ``path``, nor waits
    for a writer when another user has put a FIFO there (O_NONBLOCK: no
    effect on a regular file; the caller then refuses what is not one)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeState(f"refusing {path}: it is a symbolic link")
        raise


def current_umask() -> int:
    """The process's umask (read by setting it, and setting it back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def make_directory(path: str) -> None:
    """Create the state directory of ``path`` if needed and refuse an unsafe one."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {directory}: {exc.strerror}", exc.errno)
    check_directory(directory)


def rename_over(tmp: str, path: str) -> None:
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


def shared_directory(path: str) -> bool:
    """True if users other than its owner may create files in ``path``'s directory."""
    try:
        st = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return True
    return bool(st.st_mode & 0o022)


def read_pid_at(path: str) -> int:
    """The pid recorded in the state file at ``path``, or 0 if it cannot be read."""
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except (OSError, StateError):
        return 0
    try:
        return read_pid(fd)
    finally:
        os.close(fd)


def read_pid(fd: int) -> int:
    """The pid recorded in a state file, or 0 if it cannot be read."""
    try:
        raw = os.pread(fd, 8 * (H_PID + 1), len(MAGIC))
        return int.from_bytes(raw[H_PID * 8: H_PID * 8 + 8], sys.byteorder, signed=True)
    except (OSError, ValueError):
        return 0
