"""Health checks (``-m``): soft-disable failing channels, re-enable passing ones.

The monitor runs inside the master's gevent hub.  Every ``interval`` it
reads the table afresh (the shell may have created or re-pointed channels),
starts one greenlet per channel that is not hard-disabled and runs that
channel's check chain: ``connect`` and ``command=`` checks in order, stopping
at the first failure.  Each result is applied as soon as it is known:

* ``fall`` consecutive failures soft-disable an enabled channel (unless
  ``nodisable``);
* ``rise`` consecutive passes re-enable a soft-disabled channel (unless
  ``noenable``); any pass clears the channel's *suspect* mark;
* hard-disabled channels are never checked nor touched;
* while the shell has monitoring disabled nothing changes at all;
* a channel whose address in the file is not a numeric address is not
  checked (the server hard-disables it).

The state changes themselves are :class:`~gbalance.table.channels.Channels`'.
A ``command=`` check runs directly when it is plain words; when it needs
``/bin/sh``, ``%H`` and ``%P`` are substituted shell-quoted.  Commands run
in ``/`` with a ``$PATH`` that never means the current directory and the
soft descriptor limit the master started with (:mod:`gbalance.system.child`).

Checks never outlive their round: whatever is still running at the end of
the interval (a connect that hangs, a command that hangs) fails and is
stopped, command processes are killed with their whole process group.  A
round that ends after the next tick skips that tick, as balance.fm does.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.pool
import gevent.socket
import gevent.subprocess

from gbalance.table.channels import Channels
from gbalance.system.child import SAFE_CWD, command_env, safe_path
from gbalance.system.limits import restore_start_limit
from gbalance.log import Log
from gbalance.clock import REAL, Clock
from gbalance.monitor.monspec import Check, CheckKind, MonitorSpec
from gbalance.table.layout import C_PORT, ENABLED, MAXCHANNELS, MAXGROUPS, MON_ENABLED, slot
from gbalance.table.state import SharedState

#: Characters that only mean something to a shell: a command containing one
#: of them runs under ``/bin/sh -c``, any other is executed directly.
SHELL_CHARS = re.compile(r"[|&;<>()$`\\\"'*?\[#~\n]")
#: How many lines (and characters per line) of a command's output are logged.
OUTPUT_LINES = 20
OUTPUT_WIDTH = 200
#: At most this much of a check's output is kept (the rest is read and dropped).
OUTPUT_BYTES = 64 * 1024
READ_CHUNK = 65536
#: Time allowed to reap a command after it was killed.
REAP_GRACE = 2.0


@dataclass(frozen=True)
class Target:
    """One channel as it was when its checks started."""

    group: int
    channel: int
    address: str
    port: int

    @property
    def where(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"group {self.group} channel {self.channel} {host}:{self.port}"


def expand(template: str, address: str, port: int, quote: bool = False) -> str:
    """Substitute ``%H`` (address), ``%P`` (port) and ``%%``; other ``%x`` stay as written.

    With ``quote`` the address and port are quoted for ``/bin/sh``.
    """
    host, num = (shlex.quote(address), shlex.quote(str(port))) if quote else (address, str(port))

    def repl(m: re.Match) -> str:
        return {"%H": host, "%P": num, "%%": "%"}.get(m.group(0), m.group(0))
    return re.sub(r"%.", repl, template)


def check_argv(template: str, address: str, port: int) -> tuple[str, list[str]]:
    """The command line (for log messages) and the argv that runs one check."""
    line = expand(template, address, port)
    argv = command_argv(line)
    if argv[:2] == ["/bin/sh", "-c"]:
        argv = ["/bin/sh", "-c", expand(template, address, port, quote=True)]
    return line, argv


def command_argv(line: str) -> list[str]:
    """The argv to run ``line``: direct when it is plain words, else via ``/bin/sh -c``.

    A shell is used only when the line needs one: redirections, pipes,
    quoting, globbing, variables, or a first word that is no program on
    ``$PATH`` (a shell builtin such as ``exit``, or an assignment).
    """
    words = line.split()
    if not words or SHELL_CHARS.search(line) or "=" in words[0]:
        return ["/bin/sh", "-c", line]
    if "/" not in words[0] and shutil.which(words[0], path=safe_path(os.environ.get("PATH"))) is None:
        return ["/bin/sh", "-c", line]
    return words


class Monitor:
    """Periodic checks of every channel; see the module docstring."""

    def __init__(self, state: SharedState, spec: MonitorSpec, connect_timeout: float, log: Log,
                 source: dict[int, tuple] | None = None, channels: Channels | None = None,
                 clock: Clock = REAL, proxy_header: Callable[[socket.socket], bytes] | None = None):
        self.state = state
        #: -P: ``socket -> PROXY header`` sent right after a check's connect.
        self.proxy_header = proxy_header
        #: Intervals are measured and waited for on this clock (a test's fake one).
        self.clock = clock
        self.q = state.q
        self.channels = channels if channels is not None else Channels(state)
        self.spec = spec
        self.connect_timeout = connect_timeout
        self.log = log
        self.source = source or {}
        self._greenlet: gevent.Greenlet | None = None
        self._checks = gevent.pool.Group()
        self._was_enabled = True
        self._overrunning = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start checking (the first round runs at once)."""
        if self._greenlet is None:
            spec = self.spec
            self.log.info(f"monitoring every {spec.interval:g}s: {len(spec.checks)} check(s),"
                          f" rise {spec.rise}, fall {spec.fall}"
                          f"{'' if spec.enable else ', noenable'}{'' if spec.disable else ', nodisable'}")
            self._greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        """Stop checking; running checks are cancelled and their commands killed."""
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=REAP_GRACE + 1)
            self._greenlet = None
        self._checks.kill(block=True, timeout=REAP_GRACE + 1)

    # -- scheduling ----------------------------------------------------------

    def _loop(self) -> None:
        interval, clock = self.spec.interval, self.clock
        next_at = clock.now()
        while True:
            delay = next_at - clock.now()
            if delay > 0:
                clock.sleep(delay)
            started = clock.now()
            if self.state.monitor == MON_ENABLED:
                self._was_enabled = True
                self.run_round(started + interval)
            elif self._was_enabled:
                self._was_enabled = False
                self._clear_suspects()
            finished = clock.now()
            next_at = self._next_tick(started, finished, interval)

    def _next_tick(self, started: float, finished: float, interval: float) -> float:
        """The start of the next round; ticks that passed during an overrun are skipped."""
        next_at = started + interval
        if finished <= next_at:
            self._overrunning = False
            return next_at
        skipped = math.ceil((finished - next_at) / interval)
        if not self._overrunning:
            self.log.warning(f"monitoring: checks took {finished - started:.2f}s, longer than the"
                             f" interval of {interval:g}s; skipping {skipped} interval(s)")
        self._overrunning = True
        return next_at + skipped * interval

    def targets(self) -> list[Target]:
        """Every channel that may be checked now, read fresh from the table."""
        st = self.state
        found = []
        for g in range(min(st.ngroups, MAXGROUPS)):
            for c in range(min(st.nchannels(g), MAXCHANNELS)):
                if not self.channels.checkable(g, c):
                    continue
                where = self.channels.address_of(g, c)
                if where is not None:
                    found.append(Target(g, c, *where))
        return found

    def run_round(self, deadline: float) -> None:
        """Check all channels in parallel; return when all are done or the deadline passed."""
        for target in self.targets():
            self._checks.spawn(self._check_channel, target, deadline)
        # Each check stops itself at the deadline; the slack covers reaping.
        self._checks.join(timeout=max(0.0, deadline - self.clock.now()) + REAP_GRACE + 1)
        self._checks.kill(block=False)

    # -- one channel -----------------------------------------------------------

    def _check_channel(self, target: Target, deadline: float) -> None:
        reason = None
        for check in self.spec.checks:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                reason = "checks did not finish within the interval"
                break
            if check.kind is CheckKind.CONNECT:
                reason = self._connect(target, check, remaining)
            else:
                reason = self._command(target, check, remaining)
            if reason is not None:
                break
        self.apply(target, reason)

    def _connect(self, target: Target, check: Check, remaining: float) -> str | None:
        """None when a TCP connect to the channel succeeds, else why not."""
        limit = check.timeout if check.timeout is not None else self.connect_timeout
        cut = not limit or limit > remaining
        wait = remaining if cut else limit
        family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
        addr = (target.address, target.port, 0, 0) if family == socket.AF_INET6 else (target.address, target.port)
        sock = gevent.socket.socket(family, socket.SOCK_STREAM)
        # A connect pending past the stagger delay marks the channel suspect
        # at once, as a client's would: routing skips it before the check ends.
        marker = gevent.spawn_later(self.spec.stagger, self._mark_suspect, target) \
            if self.spec.stagger > 0 else None
        try:
            src = self.source.get(family)
            if src is not None:
                sock.bind(src)
            sock.settimeout(wait)
            sock.connect(addr)
            if self.proxy_header is not None:   # -P: a backend expecting a header gets one
                sock.sendall(self.proxy_header(sock))
        except socket.timeout:
            if cut:
                return "connect check still pending at the end of the interval"
            return f"connect timed out after {wait:g}s"
        except OSError as exc:
            return f"connect failed: {exc.strerror or exc}"
        finally:
            if marker is not None:
                marker.kill(block=False)
            sock.close()
        return None

    def _mark_suspect(self, target: Target) -> None:
        if not self._still_same(target) or not self.channels.mark_suspect(target.group, target.channel):
            return
        self.log.warning(f"{target.where} suspect: connect check still pending after"
                         f" {self.spec.stagger:g}s, new connections skip it")

    def _command(self, target: Target, check: Check, remaining: float) -> str | None:
        """None when the command exits with a passing code, else why not."""
        line, argv = check_argv(check.command, target.address, target.port)
        try:
            proc = gevent.subprocess.Popen(argv, stdin=gevent.subprocess.DEVNULL,
                                           stdout=gevent.subprocess.PIPE,
                                           stderr=gevent.subprocess.STDOUT,
                                           start_new_session=True, close_fds=True,
                                           cwd=SAFE_CWD, env=command_env(),
                                           preexec_fn=restore_start_limit)
        except OSError as exc:
            return f"cannot run {argv[0]}: {exc.strerror or exc}"
        killed = False
        try:
            out, finished = read_bounded(proc, remaining)
            if finished:
                try:
                    proc.wait(timeout=REAP_GRACE)
                except gevent.subprocess.TimeoutExpired:
                    finished = False   # closed its output but still runs
            if not finished:
                killed = True
                _kill_group(proc)
                try:
                    proc.wait(timeout=REAP_GRACE)
                except gevent.subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                gevent.spawn(_reap, proc)
            elif proc.stdout is not None:
                proc.stdout.close()
        self._log_output(target, out)
        code = proc.returncode
        if killed or code is None:    # (None: not reaped, so killed as well)
            return f"command {line!r} still running at the end of the interval (killed)"
        if code in check.passes:
            return None
        if code < 0:
            return f"command {line!r} died of signal {-code}"
        return f"command {line!r} exited with {code}"

    def _log_output(self, target: Target, out: bytes | None) -> None:
        """Send a command's output to the log (never to the master's stdout)."""
        if not out:
            return
        lines = out.decode("utf-8", "replace").splitlines()
        for text in lines[:OUTPUT_LINES]:
            self.log.info(f"{target.where} check output: {text[:OUTPUT_WIDTH]}")
        if len(lines) > OUTPUT_LINES:
            self.log.info(f"{target.where} check output: ({len(lines) - OUTPUT_LINES} more lines)")

    # -- results ------------------------------------------------------------

    def apply(self, target: Target, reason: str | None) -> None:
        """Record one chain's result (None = passed) and change the channel's state if due."""
        if not self._still_same(target):
            return
        if reason is None:
            self._passed(target)
        else:
            self._failed(target, reason)

    def _still_same(self, target: Target) -> bool:
        """False when monitoring was switched off or the channel changed meanwhile."""
        st = self.state
        g, c = target.group, target.channel
        return (st.monitor == MON_ENABLED and g < st.ngroups and c < st.nchannels(g)
                and st.address(g, c) == target.address and self.q[slot(g, c, C_PORT)] == target.port
                and self.channels.checkable(g, c))

    def _passed(self, target: Target) -> None:
        spec = self.spec
        out = self.channels.check_passed(target.group, target.channel, spec.rise, spec.enable)
        if out.unsuspected:
            self.log.info(f"{target.where} no longer suspect: checks pass")
        if out.changed:
            self.log.warning(f"{target.where} enabled by monitoring: checks pass ({out.count} in a row)")
        elif out.counting:
            self.log.info(f"{target.where} check passed ({out.count} of {spec.rise} to enable)")

    def _failed(self, target: Target, reason: str) -> None:
        spec = self.spec
        enabled = self.channels.status(target.group, target.channel) == ENABLED
        out = self.channels.check_failed(target.group, target.channel, spec.fall, spec.disable)
        if out.changed:
            self.log.warning(f"{target.where} soft-disabled by monitoring: {reason}"
                             f" ({out.count} failed check{'s' if out.count > 1 else ''} in a row)")
        elif out.counting:
            self.log.info(f"{target.where} check failed: {reason} ({out.count} of {spec.fall} to disable)")
        elif enabled and not spec.disable and out.count == 1:
            self.log.info(f"{target.where} check failed: {reason} (nodisable: stays enabled)")

    def _clear_suspects(self) -> None:
        """Monitoring was switched off: nothing would clear suspect marks, so drop them now."""
        self.channels.clear_suspects()


def read_bounded(proc: gevent.subprocess.Popen, timeout: float,
                 limit: int = OUTPUT_BYTES) -> tuple[bytes, bool]:
    """Read a check's output until it closes it or ``timeout`` passes.

    At most ``limit`` bytes are kept; the rest is read and dropped, so a
    command that floods its output neither fills the master's memory nor
    blocks on a full pipe.  Returns the kept bytes and whether the output
    ended (EOF) in time.
    """
    kept = bytearray()
    stream = proc.stdout
    fd = stream.fileno()
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(kept), False
        try:
            gevent.socket.wait_read(fd, timeout=left)
        except gevent.socket.timeout:
            return bytes(kept), False
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            continue
        except OSError:
            return bytes(kept), True
        if not chunk:
            return bytes(kept), True
        room = limit - len(kept)
        if room > 0:
            kept += chunk[:room]


def _kill_group(proc: gevent.subprocess.Popen) -> None:
    """Kill a check command and everything it started (it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except OSError:
            pass


def _reap(proc: gevent.subprocess.Popen) -> None:
    try:
        proc.wait(timeout=REAP_GRACE)
    except gevent.subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdout,):
        if stream is not None:
            stream.close()

