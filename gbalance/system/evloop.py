"""A gevent hub whose libev loop does not look for forks on every turn.

gevent always creates its loops with ``EVFLAG_FORKCHECK``: libev then calls
``getpid()`` on every loop iteration (about four times per proxied short
connection) to notice a fork nobody announced.  gbalance forks only before
its hub exists (detaching) and starts workers as new interpreters, so the
check finds nothing.  gevent takes a ready libev loop instead
(``loop(ptr=...)``); this module makes one with ``ev_loop_new`` (exported by
gevent's own libev build) without that flag.

Such a loop is not libev's *default* loop, and only the default loop can
watch child processes (gevent.subprocess): a process that starts children
(monitor checks, the worker pool) keeps gevent's usual hub.  On any
surprise (another loop backend, a missing symbol) the usual hub is kept.
"""

from __future__ import annotations

import ctypes

#: libev's EVFLAG_NOENV: ignore $LIBEV_FLAGS (gevent sets it too).
EVFLAG_NOENV = 0x01000000


def install_hub() -> bool:
    """Make this thread's hub run on a loop without the fork check.

    Call before anything creates the hub.  Returns whether it did.
    """
    try:
        from gevent import config
        from gevent._hub_local import get_hub_if_exists, set_hub
        from gevent.hub import Hub
        if get_hub_if_exists() is not None:
            return False
        corecext = __import__("gevent.libev.corecext", fromlist=["loop"])
        if config.loop is not corecext.loop:
            return False
        lib = ctypes.CDLL(corecext.__file__)
        new = lib.ev_loop_new
        new.restype = ctypes.c_void_p
        new.argtypes = [ctypes.c_uint]
        ptr = new(EVFLAG_NOENV)
        if not ptr:
            return False
        set_hub(Hub(loop=corecext.loop(ptr=ptr)))
        return True
    except Exception:  # noqa: BLE001 - any doubt: gevent's own loop
        return False
