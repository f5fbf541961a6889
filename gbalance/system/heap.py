"""The start-up heap of a serving process, kept out of the garbage collector's way.

A proxied connection's objects (link, flows, watchers, sockets) are freed
by reference counting when it ends: they form no cycles, so a stream of
short connections never triggers a collection (tests/test_heap.py checks
both).  Collections happen while connections are *held* (each open
connection adds tracked objects) and a full one walks every tracked object,
the twenty thousand or so that importing gevent, the package and building
the server left behind included.  Those live as long as the process, so
:func:`freeze_startup` collects once and then moves them into the
permanent generation (:func:`gc.freeze`): later collections skip them.
The thresholds stay CPython's, so garbage is still found as soon as before.
"""

from __future__ import annotations

import gc


def freeze_startup() -> int:
    """Collect the start-up garbage, then freeze what is left; how many objects that is.

    Call once, when the process is about to serve (its server, timers and
    signal handlers built).  Freezing twice is harmless.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
