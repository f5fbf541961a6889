"""The master's workers (``-w N``, N > 1): start, watch, restart, drain.

:class:`WorkerPool` stands where the single process's
:class:`~gbalance.proxy.server.BalanceServer` stands in the master: both are
:class:`~gbalance.process.serving.Serving`, the few methods the master's stop logic uses (``start``, ``stop_accepting``,
``drain``, ``reset_all``, ``open_count``, ``finish``), so draining,
the ``-g`` grace period, the shell's ``kill`` and the ``-r`` hand-over work
unchanged: the master only passes them on as signals.

The master keeps the listening socket open itself (it never accepts on
it): connections waiting in the backlog stay there while a worker is
replaced, and ``-r`` hands over that one socket as with ``-w 1``.  Every
worker accepts from the same socket, but only the first ones are asked to
at any time: the pool samples the accept queue and the workers' counters
every :data:`~gbalance.process.steering.TICK` seconds and lets
:class:`~gbalance.process.steering.Steering` decide how many accept, so
one busy worker takes batches of clients instead of two half-busy ones
waking for each (see that module).

A worker that dies while the master serves is logged and replaced, in the
same counter row; its row's open-connection counts are zeroed first (its
connections died with it; its totals and bytes stay counted).  One that
dies again within a second of starting is restarted after a growing pause
(up to :data:`MAX_BACKOFF` seconds), never in a busy loop.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent import subprocess

from gbalance.system.child import SAFE_CWD, python_argv
from gbalance.clock import REAL, Clock
from gbalance.config import ProxyConfig
from gbalance.log import Log
from gbalance.table.layout import (C_C, C_TOTALC, G_NCHANNELS, H_ACCEPTING, H_NGROUPS, MAXCHANNELS, MAXGROUPS,
                                   gslot, row_offset, row_sum, slot)
from gbalance.table.state import SharedState
from gbalance.process.steering import TICK, Sample, Steering
from gbalance.system.backlog import accept_queue_length
from gbalance.process.worker import STEER_SIGNAL, WORKER_ENV, WorkerSpec, encode_spec

if TYPE_CHECKING:
    from gevent import Greenlet
    from gevent.event import Event

#: How long the master waits for a new worker to say it is ready.
READY_TIMEOUT = 15.0
#: Longest pause before restarting a worker that keeps dying.
MAX_BACKOFF = 5.0
#: How long the master waits for its workers when it exits, before SIGKILL.
EXIT_WAIT = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def describe_exit(code: int) -> str:
    """'exit status 1' or 'signal 9 (SIGKILL)' from a Popen return code."""
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class Seat:
    """One worker's seat in the pool (its counter row): the process in it now and
    its restart bookkeeping.  (Not a slot of the state file.)"""

    __slots__ = ("index", "proc", "started", "backoff", "ready", "watcher")

    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = 0.1
        self.ready: Event | None = None
        self.watcher: Greenlet | None = None

    def restart_delay(self, lived: float) -> float:
        """The pause before replacing a worker that died after ``lived``
        seconds: none after a second or more of life (the back-off starts
        over), else the back-off, which then doubles up to MAX_BACKOFF."""
        if lived >= 1.0:
            self.backoff = 0.1
            return 0.0
        delay = self.backoff
        self.backoff = min(MAX_BACKOFF, self.backoff * 2)
        return delay


class WorkerPool:
    """N worker processes serving one listener for one master."""

    def __init__(self, cfg: ProxyConfig, state: SharedState, listener: socket.socket, log: Log,
                 source: dict[int, tuple[Any, ...]],
                 clock: Clock = REAL):
        #: Worker lifetimes and restart pauses are measured on this clock.
        self.clock = clock
        self.cfg = cfg
        self.state = state
        self.listener = listener
        self.log = log
        self.source = source
        self.n = cfg.workers
        self.loop = gevent.get_hub().loop
        self.seats = [Seat(i) for i in range(self.n)]
        self.stopping = False
        self._on_drained: Callable[[], None] | None = None
        self.steering = Steering(self.n)
        self._steer_timer: Any = None

    # -- starting -------------------------------------------------------------

    def start(self) -> None:
        """Start every worker and wait (bounded) until each says it is ready."""
        self.state.q[H_ACCEPTING] = self.steering.accepting
        self._steer_timer = self.loop.timer(TICK, TICK)
        self._steer_timer.start(self._steer)
        for s in self.seats:
            self._spawn(s)
        deadline = time.monotonic() + READY_TIMEOUT
        for s in self.seats:
            if s.ready is not None:
                s.ready.wait(max(0.0, deadline - time.monotonic()))

    def _spawn(self, s: Seat) -> None:
        from gevent.event import Event

        r, w = os.pipe()
        spec = WorkerSpec(index=s.index, rows=self.n, cfg=self.cfg, source=self.source,
                          state_path=self.state.path, state_fd=self.state.fd,
                          listen_fd=self.listener.fileno(), ready_fd=w, master_pid=os.getpid())
        env = dict(os.environ)
        env[WORKER_ENV] = encode_spec(spec)
        try:
            # An isolated interpreter in "/" importing the master's own gbalance
            # (never the caller's directory: see gbalance.system.child).  In a process
            # group of its own: a Ctrl-C on the terminal reaches the master
            # only, which passes it on (so no worker is seen dying first).
            s.proc = subprocess.Popen(python_argv("gbalance.process.worker", str(s.index)), env=env,
                                      cwd=SAFE_CWD, pass_fds=(spec.state_fd, spec.listen_fd, w),
                                      close_fds=True, process_group=0)
        except OSError as exc:
            os.close(r)
            os.close(w)
            self.log.error(f"cannot start worker {s.index}: {exc.strerror}")
            s.proc = None
            s.watcher = gevent.spawn_later(s.backoff, self._retry, s)
            s.backoff = min(MAX_BACKOFF, s.backoff * 2)
            return
        os.close(w)
        s.started = self.clock.now()
        s.ready = Event()
        s.watcher = gevent.spawn(self._watch, s, s.proc, r, s.ready)

    def _retry(self, s: Seat) -> None:
        if not self.stopping:
            self._spawn(s)

    def _watch(self, s: Seat, proc: subprocess.Popen, ready_fd: int, ready: Event) -> None:
        """Wait for the worker to be ready, then for it to end; replace it if it died."""
        from gevent.socket import wait_read

        try:
            try:
                wait_read(ready_fd, timeout=READY_TIMEOUT)
                os.read(ready_fd, 1)
            except Exception:
                pass
        finally:
            os.close(ready_fd)
            ready.set()
        code = proc.wait()
        if s.proc is proc:
            s.proc = None
        self._zero_row(s.index)
        if not self.stopping and s.index < self.steering.accepting:
            # Its share of the clients goes to the next worker now, not at the next sample.
            self._set_accepting(self.steering.grow(f"worker {s.index} died", self.clock.now()))
        if self.stopping:
            self._check_drained()
            return
        delay = s.restart_delay(self.clock.now() - s.started)
        self.log.warning(f"worker {s.index} (pid {proc.pid}) died ({describe_exit(code)});"
                         f" starting a replacement{f' in {delay:g} seconds' if delay else ''}")
        if delay:
            self.clock.sleep(delay)
        if not self.stopping:
            self._spawn(s)

    def _zero_row(self, index: int) -> None:
        """A dead worker's open connections died with it: zero its open counts."""
        q = self.state.q
        off = row_offset(index)
        for g in range(min(q[H_NGROUPS], MAXGROUPS)):
            for c in range(min(q[gslot(g, G_NCHANNELS)], MAXCHANNELS)):
                q[slot(g, c, C_C) + off] = 0

    # -- steering: which workers accept -------------------------------------------

    def sample(self) -> Sample:
        """The accept queue, and each worker's accepted and open connections (and CPU, when due)."""
        q = self.state.q
        n = self.n
        accepted = [0] * n
        held = [0] * n
        for g in range(min(q[H_NGROUPS], MAXGROUPS)):
            for c in range(min(q[gslot(g, G_NCHANNELS)], MAXCHANNELS)):
                total, now_open = slot(g, c, C_TOTALC), slot(g, c, C_C)
                for w in range(n):
                    off = row_offset(w)
                    accepted[w] += q[total + off]
                    held[w] += q[now_open + off]
        now = self.clock.now()
        cpu = self._cpu_seconds() if self.steering.cpu_due(now) else None
        return Sample(now, accept_queue_length(self.listener), tuple(accepted), tuple(held), cpu)

    def _cpu_seconds(self) -> "float | None":
        """User and system CPU seconds of every live worker (None if one cannot be read)."""
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read(4096).rsplit(b")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                return None
        return total / _CLOCK_TICKS

    def _steer(self) -> None:
        if self.stopping:
            if self._steer_timer is not None:
                self._steer_timer.stop()
            return
        steering = self.steering
        a = steering.decide(self.sample())
        if steering.nudge and self.state.q[H_ACCEPTING] == a:
            self._nudge(a)
        self._set_accepting(a)

    def _nudge(self, a: int) -> None:
        """Clients wait and no worker took one: the ``a`` accepting workers look
        at the listener once (the same signal: each reads the number, finds it
        accepts, and tries an accept)."""
        if self.cfg.debug:
            self.log.info(f"{self.steering.why}: the {a} accepting workers look at the listener again")
        self._signal(STEER_SIGNAL, a)

    def _set_accepting(self, a: int) -> None:
        """Publish the number of accepting workers; tell the workers if it changed
        (those that accept then also look at the listener once)."""
        q = self.state.q
        if q[H_ACCEPTING] == a:
            return
        q[H_ACCEPTING] = a
        if self.cfg.debug:
            self.log.info(f"{a} of {self.n} workers accept: {self.steering.why}")
        self._signal(STEER_SIGNAL)

    # -- what the master's stop logic asks ---------------------------------------

    @property
    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.seats if s.proc is not None]

    @property
    def open_count(self) -> int:
        """Open connections (and pending connects) of every worker."""
        q = self.state.q
        total = 0
        for g in range(min(q[H_NGROUPS], MAXGROUPS)):
            for c in range(min(q[gslot(g, G_NCHANNELS)], MAXCHANNELS)):
                total += row_sum(q, slot(g, c, C_C), self.n)
        return total

    def _signal(self, sig: int, first: "int | None" = None) -> None:
        """Send ``sig`` to every live worker (or to the ``first`` ones only)."""
        for s in self.seats[:first]:
            proc = s.proc
            if proc is not None and proc.returncode is None:
                try:
                    proc.send_signal(sig)
                except OSError:
                    pass

    def stop_accepting(self) -> None:
        """Every worker stops accepting and drains (SIGTERM); none is restarted."""
        if not self.stopping:
            self.stopping = True
            if self._steer_timer is not None:
                self._steer_timer.stop()
            for s in self.seats:
                if s.proc is None and s.watcher is not None:
                    s.watcher.kill(block=False)     # a pending restart
            self._signal(signal.SIGTERM)

    def drain(self, on_drained: Callable[[], None]) -> None:
        """Close the master's copy of the listener; ``on_drained`` once every worker exited."""
        self.stop_accepting()
        try:
            self.listener.close()
        except OSError:
            pass
        self._on_drained = on_drained
        self._check_drained()

    def _check_drained(self) -> None:
        if self._on_drained is not None and not self.pids:
            callback, self._on_drained = self._on_drained, None
            callback()

    def reset_all(self) -> int:
        """Tell every worker to reset what it has open and exit (SIGINT)."""
        count = self.open_count
        self.stopping = True
        self._on_drained = None
        self._signal(signal.SIGINT)
        return count

    def finish(self) -> None:
        """At the master's exit: wait (bounded) for the workers, then kill what is left."""
        self.stopping = True
        deadline = time.monotonic() + EXIT_WAIT
        for s in self.seats:
            proc = s.proc
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning(f"worker {s.index} (pid {proc.pid}) did not stop: killed")
                proc.kill()
                proc.wait(timeout=1.0)
