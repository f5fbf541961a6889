"""Handing the listening socket from a running master to its replacement.

``balance -r`` starts a master that takes over from the one already serving
the same port and bind address, without a moment in which the port is
closed.  The running (old) master keeps a Unix control socket next to its
state file (``<state file>.ctl``, mode 0600).  The new master connects and
the two speak a short line protocol:

=========================  =============================================
new -> old                 ``HANDOVER 1``
old -> new                 ``FD <pid>`` with the listening descriptor
                           attached (``SCM_RIGHTS``); the old master
                           still accepts
new -> old                 ``TAKE`` once the new one has checked the
                           socket, prepared its state file and table and
                           started accepting on it too (or it just hangs
                           up: nothing changes)
old -> new                 ``DONE`` after it stopped accepting, let go of
                           its state file (left for the new one to rename
                           over) and closed its control socket; it now
                           drains its own links
=========================  =============================================

The listening socket is never closed in between: both processes hold it
until the old one has stopped accepting, and connections that arrive while
nobody accepts wait in its backlog.

Safety: only a peer with our own uid is served (``SO_PEERCRED``, checked on
both sides), the socket file is 0600 in the state directory, the received
descriptor must be a listening TCP socket on the expected address, and
every step has a bounded timeout; the old master serves the control socket
from a greenlet, so a peer that stops answering never stalls its loop.
"""

from __future__ import annotations

import array
import contextlib
import errno
import ipaddress
import os
import socket
import stat
import struct
from dataclasses import dataclass
from collections.abc import Callable, Iterator

from gbalance.errors import EX_OSERR, BalanceError

CONTROL_SUFFIX = ".ctl"
PROTOCOL = b"HANDOVER 1\n"
#: Bound on every step of a hand-over, on both sides.
STEP_TIMEOUT = 5.0
MAX_LINE = 128
#: Control connections served at once; more are closed at once.
MAX_PEERS = 8
#: sun_path holds 108 bytes; longer paths are reached through /proc/self/fd.
_SUN_PATH_MAX = 107


def control_path(state_file: str) -> str:
    """The control socket of the master owning ``state_file``."""
    return state_file + CONTROL_SUFFIX


@contextlib.contextmanager
def _short_path(path: str) -> Iterator[str]:
    """A name for ``path`` that fits in ``sun_path`` (via the directory's fd)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield path
        return
    dfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{os.path.basename(path)}"
    finally:
        os.close(dfd)


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


# -- the running master's side ---------------------------------------------------


class HandoverServer:
    """The control socket of a serving master (runs in its gevent hub).

    ``listener_fd`` is sent to a same-uid peer that asks; when it confirms,
    ``on_take(pid)`` must stop accepting and give up the state file; only
    then is ``DONE`` sent.
    """

    def __init__(self, path: str, listener_fd: int, on_take: Callable[[int], None],
                 log_warning: Callable[[str], None]):
        self.path = path
        self.listener_fd = listener_fd
        self.on_take = on_take
        self.warn = log_warning
        self.sock = None
        self.ino = 0
        self._greenlet = None
        self.peers = 0
        self.busy = False       # a hand-over is under way

    def start(self) -> bool:
        """Bind the control socket (replacing a stale one); False if that fails."""
        from gevent import socket as gsocket
        import gevent

        # Bound under a temporary name, then renamed over whatever is at the
        # path (a dead master's socket, a planted link): a rename replaces
        # the name and never follows it.
        directory, name = os.path.split(self.path)
        tmp = os.path.join(directory or ".", f".{name}.{os.getpid()}")
        sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)          # our own left-over (same pid)
            with _short_path(tmp) as short:
                sock.bind(short)        # created 0600 through the umask: no chmod by name
            sock.listen(4)
            ino = os.lstat(tmp).st_ino
            os.rename(tmp, self.path)
            self.ino = ino
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.warn(f"cannot create control socket {self.path}: {exc.strerror};"
                      " balance -r cannot replace this master")
            return False
        finally:
            os.umask(old_umask)
        self.sock = sock
        self._greenlet = gevent.spawn(self._accept_loop)
        return True

    def close(self) -> None:
        """Stop serving and remove the socket file (if it is still ours)."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.ino:
                os.unlink(self.path)
        sock.close()
        import gevent

        g, self._greenlet = self._greenlet, None
        if g is not None and g is not gevent.getcurrent():
            g.kill(block=False)

    def _accept_loop(self) -> None:
        import gevent

        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self.sock is None or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                gevent.sleep(0.1)       # out of descriptors or similar: try again soon
                continue
            if self.peers >= MAX_PEERS:
                conn.close()
                continue
            self.peers += 1
            gevent.spawn(self._serve_one, conn)

    def _serve_one(self, conn) -> None:
        import gevent

        try:
            with gevent.Timeout(STEP_TIMEOUT, False):
                self._serve(conn)
        except OSError:
            pass
        finally:
            self.peers -= 1
            conn.close()

    def _serve(self, conn) -> None:
        pid, uid = peer_uid(conn)
        if uid != os.getuid():
            self.warn(f"refused a hand-over request from uid {uid} (pid {pid})")
            return
        if _read_line(conn) != PROTOCOL:
            return
        if self.busy or self.sock is None:
            conn.sendall(b"BUSY\n")
            return
        self.busy = True
        try:
            msg = f"FD {os.getpid()}\n".encode()
            conn.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.listener_fd]))])
            if _read_line(conn) != b"TAKE\n":
                return          # the new master gave up: we keep serving
            self.on_take(pid)
            conn.sendall(b"DONE\n")
        finally:
            self.busy = False


def _read_line(conn) -> bytes:
    """One short protocol line (or what came before EOF)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_LINE:
        chunk = conn.recv(MAX_LINE - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- the new master's side -----------------------------------------------------------


@dataclass
class Inherited:
    """A listening socket received from a running master, not yet taken."""

    sock: socket.socket
    pid: int
    conn: socket.socket

    def take(self) -> str | None:
        """Tell the old master to stop accepting and let go of its state file.

        None once it confirmed; else why not (the socket stays open: the
        caller decides whether the old master still serves it).
        """
        try:
            self.conn.sendall(b"TAKE\n")
            reply = _read_line(self.conn)
        except OSError as exc:
            return exc.strerror or str(exc)
        finally:
            self.conn.close()
        return None if reply == b"DONE\n" else "no confirmation"

    def abandon(self) -> None:
        """Hang up without taking over: the old master serves on."""
        self.conn.close()
        self.sock.close()


def request(path: str, timeout: float = STEP_TIMEOUT,
            warn: Callable[[str], None] | None = None) -> Inherited | None:
    """Ask the master behind control socket ``path`` for its listener.

    None when no master answers there (start normally), and when what is
    at ``path`` is not a socket of our own (a planted link or another
    user's socket offers no hand-over; ``warn`` says so).  Raises
    :class:`BalanceError` when one answers but the hand-over cannot be done.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        if warn is not None:
            what = "not a socket" if not stat.S_ISSOCK(st.st_mode) else f"owned by uid {st.st_uid}"
            warn(f"ignoring {path}: {what}, so no master offers a hand-over there")
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        with _short_path(path) as name:
            conn.connect(name)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        conn.close()
        return None
    except OSError as exc:
        conn.close()
        raise BalanceError(f"cannot reach the running master at {path}: {exc.strerror or exc}", EX_OSERR)
    try:
        pid, uid = peer_uid(conn)
        if uid != os.getuid():
            raise BalanceError(f"{path} belongs to uid {uid}, not to us: refusing to take a socket from it",
                               EX_OSERR)
        conn.sendall(PROTOCOL)
        msg, ancdata, _flags, _addr = conn.recvmsg(MAX_LINE, socket.CMSG_SPACE(4 * 4))
        fds = _received_fds(ancdata)
        if msg == b"BUSY\n":
            raise BalanceError(f"the running master (pid {pid}) is already being replaced", EX_OSERR)
        if not msg.startswith(b"FD ") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise BalanceError(f"the running master (pid {pid}) did not hand over its socket", EX_OSERR)
        sock = socket.socket(fileno=fds[0])
    except BalanceError:
        conn.close()
        raise
    except OSError as exc:
        conn.close()
        raise BalanceError(f"hand-over from the running master (pid {pid}) failed: {exc.strerror or exc}",
                           EX_OSERR)
    return Inherited(sock, pid, conn)


def _received_fds(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    return fds


def check_listener(sock: socket.socket, family: int, sockaddr: tuple) -> str | None:
    """Why ``sock`` is not a listening TCP socket on ``sockaddr``; None if it is."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            return "not a stream socket"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
        if sock.family != family:
            return f"listens on {_family_name(sock.family)}, not {_family_name(family)}"
        have = sock.getsockname()
    except OSError as exc:
        return exc.strerror or str(exc)
    if have[1] != sockaddr[1] or ipaddress.ip_address(have[0].split("%")[0]) != \
            ipaddress.ip_address(sockaddr[0].split("%")[0]):
        return f"listens on {have[0]} port {have[1]}, not {sockaddr[0]} port {sockaddr[1]}"
    return None


def _family_name(family: int) -> str:
    names: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
    return names.get(family, str(family))
