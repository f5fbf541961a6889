"""systemd readiness notification without libsystemd.

A service started with ``Type=notify`` gets ``$NOTIFY_SOCKET``: the name of
an ``AF_UNIX`` datagram socket, either a path or an abstract name written
with a leading ``@``.  One datagram of ``KEY=value`` lines tells systemd
the service is ready (``READY=1``), which pid is the main one
(``MAINPID=``), or that it is stopping (``STOPPING=1``).

The variable is read once and removed from the environment, so commands
the master runs (monitor checks) cannot speak for it.  Sends never wait
long: a full or absent receiver loses the message, the master carries on.
"""

from __future__ import annotations

import os
import socket

NOTIFY_ENV = "NOTIFY_SOCKET"

_UNSET = object()
_address: object = _UNSET


def socket_address(raw: str) -> str | None:
    """The socket address a ``$NOTIFY_SOCKET`` value names (a path, or an
    abstract name written with ``@``), or None for anything else."""
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]         # abstract namespace
    if raw.startswith("/"):
        return raw
    return None


def notify_address() -> str | None:
    """The socket address from ``$NOTIFY_SOCKET`` (read once, then unset), or None."""
    global _address
    if _address is _UNSET:
        _address = socket_address(os.environ.pop(NOTIFY_ENV, ""))
    return _address  # type: ignore[return-value]


def send(address: str | None, message: str, timeout: float = 0.0) -> bool:
    """Send one notification to ``address``; True if it was handed to the socket.

    ``timeout`` bounds how long a full receive queue may hold us up (0 = not
    at all).  Never raises.  (``balance-instances replace`` sends with the
    address of its own environment, which it leaves set.)
    """
    if address is None:
        return False
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        if timeout > 0:
            sock.settimeout(timeout)
        else:
            sock.setblocking(False)
        sock.sendto(message.encode("utf-8"), address)
        return True
    except (OSError, ValueError):
        return False
    finally:
        sock.close()


def notify(message: str, timeout: float = 0.0) -> bool:
    """Send one notification to the master's ``$NOTIFY_SOCKET`` (see :func:`send`)."""
    return send(notify_address(), message, timeout)


def ready(pid: int | None = None) -> bool:
    """``READY=1`` with our pid as the main pid (the detached one in daemon mode)."""
    return notify(f"READY=1\nMAINPID={pid or os.getpid()}\n", timeout=1.0)


def stopping() -> bool:
    """``STOPPING=1``: the master has begun draining."""
    return notify("STOPPING=1\n")
