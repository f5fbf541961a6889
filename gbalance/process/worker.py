"""A worker process (``-w N``): one gevent loop serving the shared listener.

The master starts each worker as a new interpreter (``python -m
gbalance.process.worker``), never by forking itself: a fork would copy the master's
hub, its monitor, mailbox and hand-over watchers, which must run once per
instance.  A worker inherits three descriptors: the listening socket (the
same socket the master holds and hands over with ``-r``), the state file
(already mapped by the master; the worker maps the same file even after the
master gave its name up) and a pipe on which it says it is ready.  Its
settings come pickled in ``$GBALANCE_WORKER`` (from the master, of the
same user).

A worker accepts, routes, connects and forwards exactly as the single
process of ``-w 1`` does, with its own counter row (worker *i* counts in
row *i*) and its own round-robin cursor.  It does not read the mailbox,
monitor, hand over, or talk to systemd: that is the master's.

Signals (sent by the master): SIGTERM drains (stop accepting, let open
links finish, reset what is left after the ``-g`` grace period); SIGINT
(or a second SIGTERM) resets everything at once; SIGHUP is ignored;
SIGWINCH says the number of accepting workers (``H_ACCEPTING``, see
:mod:`gbalance.process.steering`) changed, or that clients wait that
nobody accepted: a worker whose row is not below the number stands by
(serves what it holds, accepts nothing) until it is; one below it tries
an accept at once (a wake-up may have been lost).  A
worker also drains when its master dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import base64
import ctypes
import os
import pickle
import signal
import socket
import sys
from typing import Any
from dataclasses import dataclass

import gevent
from gevent.event import Event

from gbalance.config import ProxyConfig
from gbalance.table.channels import Channels
from gbalance.table.counters import Counters
from gbalance.log import Log
from gbalance.table.files import StateError
from gbalance.table.layout import H_ACCEPTING
from gbalance.table.state import SharedState
from gbalance.system import heap
from gbalance.system.evloop import install_hub
from gbalance.system.exclusive import ExclusiveListener
from gbalance.wiring import build_server

#: Environment variable carrying a worker's pickled :class:`WorkerSpec`.
WORKER_ENV = "GBALANCE_WORKER"
_PR_SET_PDEATHSIG = 1
#: The master's "read H_ACCEPTING again" (ignored by default: harmless
#: before the handler is installed, or sent to a worker by a terminal).
STEER_SIGNAL = signal.SIGWINCH


@dataclass
class WorkerSpec:
    """What a worker needs from its master."""

    index: int                  # counter row and first round-robin position
    rows: int                   # the -w number: counter rows in use
    cfg: ProxyConfig
    source: dict                # -B, resolved per family
    state_path: str
    state_fd: int
    listen_fd: int
    ready_fd: int
    master_pid: int


def encode_spec(spec: WorkerSpec) -> str:
    return base64.b64encode(pickle.dumps(spec)).decode("ascii")


def decode_spec(text: str) -> WorkerSpec:
    spec = pickle.loads(base64.b64decode(text))
    if not isinstance(spec, WorkerSpec):
        raise ValueError("not a worker spec")
    return spec


def _die_with(master_pid: int) -> None:
    """Get SIGTERM (drain) when the master dies; leave at once if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != master_pid:
        raise SystemExit(0)


class Worker:
    """One worker's life: serve until told to drain or stop."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        cfg = spec.cfg
        self.cfg = cfg
        self.log = Log(foreground=cfg.foreground)
        self.state = SharedState(spec.state_path, spec.state_fd, True)
        try:
            lock_fd = self.state.open_own_lock() if spec.rows > 1 else -1
        except StateError as exc:
            self.log.warning(f"worker {spec.index}: {exc}; maxc is checked without the lock")
            lock_fd = -1
        self.counters = Counters(self.state, spec.index, spec.rows, lock_fd)
        self.listener = socket.socket(fileno=spec.listen_fd)
        self.listener.setblocking(False)
        self.server: Any = None     # set by run(); gevent objects have no stubs
        self.done: Any = None
        self.draining = False
        self.timer: Any = None

    def run(self) -> int:
        spec = self.spec
        self.done = Event()
        self.server = build_server(self.cfg, self.state, self.listener, self.log, spec.source,
                                   Channels(self.state, self.counters.lock_fd), self.counters, spec.index)
        if spec.rows > 1:
            # One worker woken per waiting client, an idle one first (Linux).
            exclusive = ExclusiveListener(self.server.loop, self.listener.fileno(),
                                          self.log.info if self.cfg.debug else None)
            self.server.on_accepting = exclusive
            self.server.on_unwatched = exclusive.withdraw
            self.server.on_closing = exclusive.withdraw_now
        gevent.signal_handler(signal.SIGTERM, self.on_sigterm)
        gevent.signal_handler(signal.SIGINT, self.stop_now)
        gevent.signal_handler(signal.SIGHUP, lambda: None)
        if spec.rows > 1:
            # Installed before the first read: no change of the number is missed.
            gevent.signal_handler(STEER_SIGNAL, self.on_steer)
            self.on_steer()
        self.server.start()
        frozen = heap.freeze_startup()
        if self.cfg.debug:
            self.log.info(f"worker {spec.index}: start-up heap frozen: {frozen} objects")
        try:
            os.write(spec.ready_fd, b"R")
        except OSError:
            pass
        os.close(spec.ready_fd)
        self.done.wait()
        self.server.finish()
        return 0

    def on_steer(self) -> None:
        """Accept, or stand by, as the master's number of accepting workers
        says; if accepting, look at the listener once (the master may have
        seen clients wait that no worker was woken for)."""
        accepting = self.state.q[H_ACCEPTING]
        standby = 0 < accepting <= self.spec.index
        self.server.set_standby(standby)
        if not standby:
            self.server.look_again()

    def on_sigterm(self) -> None:
        if self.draining:
            self.stop_now()
            return
        self.draining = True
        self.server.drain(self.done.set)
        if self.done.is_set():
            return
        grace = self.cfg.grace
        if grace <= 0:
            self.stop_now()
            return
        self.timer = self.server.loop.timer(grace)
        self.timer.start(self.stop_now)

    def stop_now(self) -> None:
        if not self.draining:
            self.draining = True
            self.server.drain(lambda: None)
        self.server.reset_all()
        self.done.set()


def main() -> int:
    """Entry point of ``python -m gbalance.process.worker`` (started by the master only)."""
    text = os.environ.pop(WORKER_ENV, "")
    if not text:
        sys.stderr.write("gbalance.process.worker: started by a balance master only\n")
        return 64
    try:
        spec = decode_spec(text)
    except Exception:
        sys.stderr.write("gbalance.process.worker: bad worker settings\n")
        return 64
    _die_with(spec.master_pid)
    install_hub()       # a worker starts no children: no fork check per loop turn
    try:
        return Worker(spec).run()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    # Run the package's module, not this copy of it named __main__: the
    # pickled spec refers to gbalance.process.worker.WorkerSpec.
    from gbalance.process.worker import main as _main
    sys.exit(_main())
