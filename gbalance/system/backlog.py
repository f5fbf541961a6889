"""A listening socket's accept queue: how many clients wait in it (Linux).

For a socket in the LISTEN state, Linux's ``struct tcp_info`` carries the
length of its accept queue in ``tcpi_unacked`` (a 32-bit field at byte 24).
The server asks it after accepting (to accept exactly what waits instead of
going on until accept() fails with EAGAIN), and the master of ``-w N``
samples it to see whether clients wait (:mod:`gbalance.process.steering`).
Elsewhere than Linux, or for a listener whose TCP_INFO does not say (an
MPTCP one), the length is unknown.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable

TCP_INFO = getattr(socket, "TCP_INFO", 0) if sys.platform.startswith("linux") else 0
TCP_LISTEN = 10             # tcpi_state of a listening socket
QUEUE_AT = 24               # offset of tcpi_unacked
QUEUE_LEN = struct.Struct("=I")


def queue_probe(listener: socket.socket) -> "Callable[[int, int, int], bytes] | None":
    """The listener's ``getsockopt`` when its TCP_INFO tells the accept
    queue's length (Linux, plain TCP, listening), else None."""
    if not TCP_INFO:
        return None
    try:
        if listener.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_TCP:
            return None
        info = listener.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 32)
    except (OSError, AttributeError):
        return None
    if len(info) < QUEUE_AT + 4 or info[0] != TCP_LISTEN:
        return None
    return getattr(listener, "_sock", listener).getsockopt   # (gevent's socket: the one under it)


def accept_queue_length(listener: socket.socket) -> "int | None":
    """Clients waiting in ``listener``'s accept queue, or None if that cannot be told."""
    probe = queue_probe(listener)
    if probe is None:
        return None
    try:
        return QUEUE_LEN.unpack_from(probe(socket.IPPROTO_TCP, TCP_INFO, 32), QUEUE_AT)[0]
    except (OSError, struct.error):
        return None
