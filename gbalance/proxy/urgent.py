"""Urgent (out-of-band) bytes and errors on sockets nobody reads: :class:`UrgentRelay`.

One relay per serving process, made by the server and handed to every link
(:mod:`gbalance.proxy.forward`) and connect race
(:mod:`gbalance.proxy.connect`); the class says how it keeps the per-connection
cost to one ``fcntl``.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import select
import signal
import socket
import sys
from typing import TYPE_CHECKING
from collections.abc import Callable

from gbalance.proxy.forward import DONTWAIT
from gbalance.proxy.watchers import READ

if TYPE_CHECKING:
    from gbalance.proxy.forward import Link
    from gbalance.proxy.watchers import EventLoop


#: Seconds without an urgent byte after which new links are no longer put
#: in the urgent epoll set (see :class:`UrgentRelay`).
URGENT_CALM = 60.0
F_SETOWN = getattr(fcntl, "F_SETOWN", 8)


def _owner_setter() -> Callable[[int, int], None]:
    """``set_owner(fd, pid)``: ``fcntl(fd, F_SETOWN, pid)``, made twice per connection.

    ``fcntl.fcntl`` first tries its third argument as a buffer, and an int
    fails that with a formatted TypeError it then clears: about 40 % of
    the call.  Where the C library's ``fcntl`` can be called directly
    (ctypes, holding the GIL: the call never blocks) it is; elsewhere
    ``fcntl.fcntl`` is.  Either raises OSError if the kernel refuses.
    """
    def portable(fd: int, pid: int) -> None:
        fcntl.fcntl(fd, F_SETOWN, pid)

    # Linux on x86-64 and arm64 only: there a variadic call with int
    # arguments passes them as a plain call does (libffi makes plain calls).
    if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "aarch64"):
        return portable
    try:
        import ctypes
        libc_fcntl = ctypes.PyDLL(None).fcntl
    except (ImportError, OSError, AttributeError):
        return portable
    libc_fcntl.restype = ctypes.c_int

    def direct(fd: int, pid: int) -> None:
        if libc_fcntl(fd, F_SETOWN, pid) < 0:
            raise OSError(f"fcntl(F_SETOWN) failed on descriptor {fd}")

    return direct


set_owner = _owner_setter()


class UrgentRelay:
    """Forward TCP urgent (out-of-band) bytes as balance 3.56 does, and
    report errors on sockets nobody is reading.

    libev cannot watch for exceptional conditions, so a second epoll set
    (Linux) watches sockets for ``EPOLLPRI``; its own fd is watched by the
    hub at the highest priority, so an urgent byte is taken before a flow's
    read can step over its mark (which would discard it).  Each urgent byte
    is read with ``MSG_OOB`` and sent on with ``MSG_OOB``.  Elsewhere urgent
    data is simply not relayed.

    Putting every socket in that set costs two ``epoll_ctl`` calls per
    connection and a second wait-queue entry on every socket, which was the
    largest single cost of a short connection.  So the set is filled only
    when it is needed:

    * every proxied socket is *owned* by this process (``F_SETOWN``, one
      cheap ``fcntl`` when it is accepted or created), so the kernel sends
      ``SIGURG`` as soon as urgent data arrives on any of them;
    * on ``SIGURG`` (a libev signal watcher, also at the highest priority)
      the relay goes on *alert*: every open link's sockets join the set
      (``links``, the server's own record of its open links: the relay
      keeps no per-link entry of its own), the set is polled at once, and
      links started while on alert join it at their start.  The alert ends
      after :data:`URGENT_CALM` seconds without ``SIGURG``; sockets already
      in the set stay until closed;
    * a flow that stops reading its source because the destination is full
      (back-pressure) puts that source in the set, alert or not: epoll
      reports ``EPOLLERR``/``EPOLLHUP`` unasked, and an error goes to the
      link (see :meth:`Link.socket_failed`), so a reset on a socket whose
      flow waits for the other side is passed on at once.

    The set is edge-triggered: a hang-up or an urgent byte is reported once,
    and a socket leaves the set when it is closed (no ``epoll_ctl(DEL)``).
    """

    def __init__(self, loop: EventLoop, calm: float = URGENT_CALM, links: dict[Link, float] | None = None):
        self.ep = select.epoll() if hasattr(select, "epoll") and hasattr(signal, "SIGURG") else None
        # fd in the set -> (src, dst, link)
        self.peers: dict[int, tuple[_socket.socket, _socket.socket, Link | None]] = {}
        #: Every started, open link (iterable; the server passes its dict of them).
        self.links: dict[Link, float] = links if links is not None else {}
        self.alert = False
        self.pid = os.getpid()
        self.calm = calm
        self.signals = 0                     # SIGURGs seen (for tests and tracing)
        if self.ep is not None:
            self.watcher = loop.io(self.ep.fileno(), READ, priority=2)
            self.watcher.start(self._on_event)
            self.sigurg = loop.signal(signal.SIGURG, priority=2)
            self.sigurg.start(self._on_sigurg)
            self.calm_timer = loop.timer(calm)

    def own(self, sock: _socket.socket) -> None:
        """Have the kernel signal urgent data on ``sock`` to this process."""
        if self.ep is not None:
            try:
                set_owner(sock.fileno(), self.pid)
            except OSError:
                pass

    def add_link(self, link: "Link") -> None:
        """A link starts: watch its sockets now if on alert (else the next
        alert finds it in ``links``)."""
        if self.alert and self.ep is not None:
            self.add(link.client, link.server, link)
            self.add(link.server, link.client, link)

    def remove_link(self, link: "Link") -> None:
        """A link's sockets are about to be closed (which takes them out of the set)."""
        peers = self.peers
        if peers:
            peers.pop(link.client.fileno(), None)
            peers.pop(link.server.fileno(), None)

    def add(self, src: _socket.socket, dst: _socket.socket, link: Link | None = None) -> None:
        """Put ``src`` in the set (urgent bytes go to ``dst``, errors to ``link``)."""
        if self.ep is None:
            return
        fd = src.fileno()
        if fd in self.peers:
            return
        try:
            self.ep.register(fd, select.EPOLLPRI | select.EPOLLET)
        except OSError:
            return
        self.peers[fd] = (src, dst, link)

    def _on_sigurg(self) -> None:
        """Urgent data arrived somewhere: watch every link, look at once."""
        self.signals += 1
        self.calm_timer.stop()
        self.calm_timer.start(self._on_calm)
        if not self.alert:
            # The alert begins: every open link joins the set (one already
            # in stays; a link started during the alert joins at its start).
            self.alert = True
            for link in self.links:
                if not link.closed:
                    self.add(link.client, link.server, link)
                    self.add(link.server, link.client, link)
        self._on_event()

    def _on_calm(self) -> None:
        self.alert = False

    def _forget(self, fd: int) -> None:
        assert self.ep is not None        # (only the set's events call it)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        self.peers.pop(fd, None)

    def _on_event(self) -> None:
        assert self.ep is not None        # (its watchers exist only with the set)
        for fd, ev in self.ep.poll(0):
            entry = self.peers.get(fd)
            if entry is None:
                continue
            src, dst, link = entry
            if ev & select.EPOLLPRI:
                try:
                    byte = src.recv(1, socket.MSG_OOB | DONTWAIT)
                    if byte:
                        dst.send(byte, socket.MSG_OOB | DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    if exc.errno != errno.EINVAL:   # EINVAL: a flow took it first
                        ev |= select.EPOLLERR
            if ev & select.EPOLLERR:
                # An error is reported to the link and the socket forgotten.
                # A hang-up alone is a socket shut both ways, a clean end
                # the flows see; edge-triggered, it does not fire again.
                self._forget(fd)
                if link is not None:
                    link.socket_failed(src)
