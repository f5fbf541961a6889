"""The shared listener of ``-w N`` watched with ``EPOLLEXCLUSIVE`` (Linux).

With several workers, every worker's libev loop watches the one listening
socket.  Plainly registered, a waiting client wakes every idle worker; all but
one then find nothing to accept.  Registered with ``EPOLLEXCLUSIVE`` in the
epoll set a worker sleeps on, the kernel wakes one waiting worker per client
and skips a worker that is busy (not in ``epoll_wait``): fewer wake-ups and
failed accepts per connection.

libev has no such flag, so once libev has registered the listener (lazily, on
the loop turn after its watcher starts) :func:`make_exclusive` replaces that
registration in libev's own epoll set with an exclusive one that carries the
very same ``data`` (libev keeps the descriptor and a generation count there and
checks both on every event).  libev never modifies that entry later: stopping
the watcher leaves it, starting it again meets ``EEXIST`` with the same mask
(which libev accepts), and an event nobody wants makes libev delete it (then
the next start adds a plain one, which :class:`ExclusiveListener` replaces
again).  Anything unexpected leaves the plain registration, which is correct,
only less frugal.  Elsewhere than Linux nothing is done.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import sys
from collections.abc import Callable
from typing import Any

EPOLLIN = 0x001
EPOLLEXCLUSIVE = 1 << 28
EPOLL_CTL_ADD = 1
EPOLL_CTL_DEL = 2

_PACKED = platform.machine() in ("x86_64", "amd64")


if _PACKED:
    class _EpollEvent(ctypes.Structure):
        # The kernel's struct epoll_event is packed on x86-64 only.
        _pack_ = 1
        _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]
else:
    class _EpollEvent(ctypes.Structure):  # type: ignore[no-redef]
        _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


_epoll_ctl: Any = None


def _ctl() -> Any:
    global _epoll_ctl
    if _epoll_ctl is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.epoll_ctl
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_EpollEvent)]
        fn.restype = ctypes.c_int
        _epoll_ctl = fn
    return _epoll_ctl


def parse_fdinfo(text: str) -> "dict[int, tuple[int, int]]":
    """The ``tfd`` lines of an epoll descriptor's fdinfo: {fd: (events, data)}.

    Lines that are not well formed are skipped.
    """
    found: "dict[int, tuple[int, int]]" = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 6 or words[0] != "tfd:" or words[2] != "events:" or words[4] != "data:":
            continue
        try:
            fd = int(words[1])
            events = int(words[3], 16)
            data = int(words[5], 16)
        except ValueError:
            continue
        if fd >= 0 and 0 <= events < 1 << 32 and 0 <= data < 1 << 64:
            found[fd] = (events, data)
    return found


def _fdinfo(epfd: int, pid: "int | str" = "self") -> bytes:
    """The whole fdinfo text of descriptor ``epfd`` (b"" if unreadable).

    It has one line per watched descriptor: a worker holding 6,000
    connections has about a megabyte there, which the kernel writes out
    whole each time (about 10 ms), so it is read only when the listener's
    registration must be learnt, never to take it out.
    """
    chunks = []
    try:
        with open(f"/proc/{pid}/fdinfo/{epfd}", "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return b""
    return b"".join(chunks)


def registered(epfd: int, pid: "int | str" = "self") -> "dict[int, tuple[int, int]]":
    """What the epoll descriptor ``epfd`` of process ``pid`` watches ({} if unreadable)."""
    return parse_fdinfo(_fdinfo(epfd, pid).decode("ascii", "replace"))


def entry(epfd: int, fd: int, pid: "int | str" = "self") -> "tuple[int, int] | None":
    """(events, data) with which ``epfd`` watches ``fd`` (None if it does not),
    found in the text without parsing the other lines."""
    m = re.search(rb"^tfd:[ \t]+%d[ \t]+events:[ \t]+([0-9a-fA-F]+)[ \t]+data:[ \t]+([0-9a-fA-F]+)" % fd,
                  _fdinfo(epfd, pid), re.M)
    if m is None:
        return None
    events, data = int(m.group(1), 16), int(m.group(2), 16)
    return (events, data) if events < 1 << 32 and data < 1 << 64 else None


def epoll_fds(pid: "int | str" = "self") -> "list[int]":
    """The epoll descriptors process ``pid`` holds."""
    out = []
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return []
    for name in names:
        try:
            if os.readlink(f"{base}/{name}") == "anon_inode:[eventpoll]":
                out.append(int(name))
        except (OSError, ValueError):
            continue
    return sorted(out)


def find_loop_epoll(fd: int) -> int:
    """The one epoll descriptor of this process in which libev watches ``fd``
    (its data's low 32 bits are ``fd``), or -1 if none or several."""
    hits = [ep for ep in epoll_fds() if ((entry(ep, fd) or (0, -1))[1] & 0xFFFFFFFF) == fd]
    return hits[0] if len(hits) == 1 else -1


def _ctl_call(epfd: int, op: int, fd: int, events: int, data: int) -> int:
    ev = _EpollEvent(events, data)
    if _ctl()(epfd, op, fd, ctypes.byref(ev)) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def make_exclusive(epfd: int, fd: int, found: "tuple[int, int] | None" = None) -> str:
    """Register ``fd`` in ``epfd`` with EPOLLIN|EPOLLEXCLUSIVE and the data it has.

    Returns "" when ``fd`` is (now) registered exclusively, else why not; on a
    failure the plain registration is put back as it was.
    """
    if found is None:
        found = entry(epfd, fd)
    if found is None:
        return f"descriptor {fd} is not in epoll set {epfd}"
    events, data = found
    if events & EPOLLEXCLUSIVE:
        return ""
    if events & 0xFFFF & ~0x19 or not events & EPOLLIN:
        return f"unexpected events {events:#x}"
    err = _ctl_call(epfd, EPOLL_CTL_DEL, fd, 0, 0)
    if err:
        return f"EPOLL_CTL_DEL: {os.strerror(err)}"
    err = _ctl_call(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLEXCLUSIVE, data)
    if err:
        _ctl_call(epfd, EPOLL_CTL_ADD, fd, events, data)
        return f"EPOLL_CTL_ADD with EPOLLEXCLUSIVE: {os.strerror(err)}"
    return ""


class ExclusiveListener:
    """Keeps a server's listener registered exclusively in its loop's epoll set.

    Call the instance each time the listener's watcher (re)starts; the change is
    made on the following loop turn (a zero timer: timers run after libev has
    applied descriptor changes).  Does nothing off Linux or off an epoll loop.
    """

    def __init__(self, loop: Any, fd: int, debug: "Callable[[str], None] | None" = None):
        self.loop = loop
        self.fd = fd
        self.debug = debug
        self.epfd = -1
        self.timer: Any = None
        self.told = False
        self.usable = sys.platform.startswith("linux") and getattr(loop, "backend", "") == "epoll"

    def __call__(self) -> None:
        if not self.usable or (self.timer is not None and self.timer.active):
            return
        if self.timer is None:
            self.timer = self.loop.timer(0.0)
        self.timer.start(self.apply)

    def withdraw(self, stopped: "Callable[[], bool]") -> None:
        """Take the listener out of the loop's epoll set once its watcher has
        stopped (``stopped()`` still true on the next loop turn), so that no
        client wakes this process for nothing.  Called when a worker stands
        by, reaches its connection limit or runs out of descriptors.

        A stopped watcher's descriptor stays registered in libev's epoll set;
        registered exclusively, it can even take the one wake-up a client
        gets from a process that accepts.  On the next turn libev has applied
        the stop (its own view of the descriptor is "not watched"), so a
        later start adds it again, and :meth:`__call__` makes that exclusive.
        """
        if not self.usable:
            return
        timer = self.loop.timer(0.0)

        def later() -> None:
            timer.close()
            if stopped():
                self._delete()

        timer.start(later)

    def _delete(self) -> None:
        """EPOLL_CTL_DEL of the listener from the loop's epoll set (known
        from :meth:`apply`; looked for only if it is not known or gone)."""
        if self.epfd >= 0:
            err = _ctl_call(self.epfd, EPOLL_CTL_DEL, self.fd, 0, 0)
            if err in (0, errno.ENOENT):    # (ENOENT: libev dropped it already)
                return
        self.epfd = find_loop_epoll(self.fd)
        if self.epfd >= 0:
            _ctl_call(self.epfd, EPOLL_CTL_DEL, self.fd, 0, 0)

    def withdraw_now(self) -> None:
        """Take the listener out of the loop's epoll set at once: call before
        this process closes its descriptor for good (draining).

        Closing one descriptor does not end an epoll registration while other
        processes hold the same socket (the master, the other workers, a new
        master after ``-r``): a draining worker would still be woken for new
        clients, and take a client's one wake-up without accepting it.
        """
        if not self.usable:
            return
        if self.timer is not None:
            self.timer.stop()
        self._delete()

    def apply(self) -> str:
        why = ""
        found = entry(self.epfd, self.fd) if self.epfd >= 0 else None
        if found is None:
            self.epfd = find_loop_epoll(self.fd)
        if self.epfd < 0:
            why = "the loop's epoll set was not found"
        else:
            why = make_exclusive(self.epfd, self.fd, found)
        if why and not self.told:
            self.told = True
            if self.debug is not None:
                self.debug(f"listener left plain in the loop's epoll set (no EPOLLEXCLUSIVE): {why}")
        return why
