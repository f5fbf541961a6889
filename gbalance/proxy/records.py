"""The record classes of the compiled per-connection modules.

:class:`Connected` (:mod:`gbalance.proxy.connect`), :class:`Received`
(:mod:`gbalance.proxy.proxyproto`) and :class:`StaggerRule`
(:mod:`gbalance.proxy.stagger`) live here, not beside their users:
Cython 0.29 (Debian bookworm's cython3, which ``GBALANCE_COMPILED=1 make
deb`` compiles with) makes no ``__annotations__`` for a class body it
compiles, and dataclasses and ``typing.NamedTuple`` read their fields from
there: compiled, they would have no fields.  This module is not in
:data:`gbalance.build.COMPILED_MODULES`, so these classes are plain Python
whatever the build; the compiled modules import them from here (and so
still export them under their old names).  tests/test_build.py checks
the fields of every record class, compiled or not.
"""

from __future__ import annotations

import _socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from gbalance.proxy.watchers import IoWatcher

#: Lowest stagger delay: below this a busy loop's own latency would look like a hang.
DEFAULT_FLOOR = 0.005


class Connected(NamedTuple):
    """The winner of a race, with the (stopped) watchers it used.

    The forwarder reuses the watchers instead of creating new ones: the
    client's read watcher as is, the connect's write watcher turned into a
    read watcher on the backend socket.  Either may be None.
    """

    sock: _socket.socket
    group: int
    channel: int
    client_watcher: IoWatcher | None
    server_watcher: IoWatcher | None
    #: What the client sent while the connect was pending (send it first).
    early: bytes = b""
    #: The backend reset the connection before the link began.
    reset: bool = False
    #: How many bytes of ``early`` were already sent to the backend.
    sent: int = 0


class Received(NamedTuple):
    """A complete, valid header.

    ``source`` and ``dest`` are ``(address, port)`` as the sender gave them
    (IPv6 in its canonical form), or None when the header carries no
    usable address (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 ``UNSPEC``/``UNIX``):
    the receiver then uses the connection's own endpoints.
    """

    length: int
    version: int
    source: "tuple[str, int] | None" = None
    dest: "tuple[str, int] | None" = None


@dataclass(frozen=True)
class StaggerRule:
    """The configured bounds: ``ceiling`` is ``stagger=`` (0 turns it off)."""

    ceiling: float
    floor: float = DEFAULT_FLOOR
