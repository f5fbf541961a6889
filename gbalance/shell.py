"""The control shell: ``balance -i`` (interactive) and ``balance -c cmd``.

The shell never talks to the master over a socket.  It maps the master's
state file (see :mod:`gbalance.state`) and edits the table under the change
lock; the master reads the table for every new connection, so a change
applies to the next connection.  That is also why permissions are simple:
whoever may write the state file may steer the master, everybody who may
read it may ``show`` it.

Output goes to stdout and is flushed after every command, so the shell
works in pipes, from cron and MRTG, and over ``ssh host balance -i 80``
without a terminal.  Line editing and history are only switched on when
stdin is a terminal.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from gbalance import __version__
from gbalance.completion import install_completion
from gbalance.config import ShellConfig
from gbalance.errors import EX_NOPERM, EX_OK, EX_UNAVAILABLE, BalanceError
from gbalance.spec import resolve_host
from gbalance.state import (C_MAXC, C_RCVD, C_SENT, C_STATUS, ENABLED, HARD_DISABLED, HASH,
                            MAXCHANNELS, MAXGROUPS, MON_DISABLED, MON_ENABLED, MON_NONE, RR,
                            SOFT_DISABLED, STATUS_NAMES, TYPE_NAMES, SharedState, StateError,
                            state_path)

#: Longer than any valid command (a 253-character host name included).
MAX_LINE = 512
#: How long ``kill`` waits for the master to let go of its state file.
KILL_WAIT = 10.0
#: Largest ``maxc`` (the C balance keeps it in an int).
MAX_MAXC = 2**31 - 1

HISTORY_FILE = "~/.balance_history"
HISTORY_LENGTH = 1000

SHOW_HEADER = ("GRP Type  #   S {addr}  port    c      totalc maxc        sent        rcvd")
SHOW_ROW = "{g:3d} {t:>4s} {c:2d} {s:>3s} {addr} {port:5d} {cur:4d} {totalc:11d} {maxc:4d} {sent:11d} {rcvd:11d}"
ADDR_WIDTH = 16


class Usage(Exception):
    """A command the user typed wrong; the message is printed as is."""


class Quit(Exception):
    """Leave the shell (``quit``, ``kill``, or the master went away)."""

    def __init__(self, code: int = EX_OK):
        super().__init__(code)
        self.code = code


@dataclass
class Command:
    """One shell command: its name, argument synopsis, help line and handler."""

    name: str
    synopsis: str
    summary: str
    handler: Callable[["Shell", list[str]], None]


class Shell:
    """One session against one master's state file.

    ``group`` is the current group that channel commands act on, as in
    balance.  Every handler prints its answer on ``out``.
    """

    def __init__(self, state: SharedState, cfg: ShellConfig, out: TextIO):
        self.state = state
        self.cfg = cfg
        self.out = out
        self.group = 0

    # -- helpers -------------------------------------------------------------

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def channel_arg(self, word: str) -> int:
        """A channel number of the current group, or :class:`Usage`."""
        n = int_arg(word)
        if not 0 <= n < self.state.nchannels(self.group) or self.group >= self.state.ngroups:
            raise Usage(f"no such channel {n}")
        return n

    def ensure_group(self) -> None:
        """Make the current group exist in the table (call under the change lock).

        ``group N`` may select a group that has no channels yet, as in balance,
        so that ``create`` can fill it; the table only grows when it must.
        """
        while self.state.ngroups <= self.group:
            self.state.add_group(RR)

    # -- commands ------------------------------------------------------------

    def cmd_help(self, args: list[str]) -> None:
        self.out.write(help_text())

    def cmd_assign(self, args: list[str]) -> None:
        need(args, 3)
        c = self.channel_arg(args[0])
        address = host_arg(args[1])
        port = port_arg(args[2])
        st = self.state
        with st.change():
            if st.get(self.group, c, C_STATUS) == ENABLED:
                raise Usage("channel must be disabled to assign new address")
            st.set_address(self.group, c, address, port)
            st.bump_generation()
        self.say("channel reassigned")

    def cmd_create(self, args: list[str]) -> None:
        need(args, 2)
        address = host_arg(args[0])
        port = port_arg(args[1])
        st = self.state
        with st.change():
            self.ensure_group()
            if st.nchannels(self.group) >= MAXCHANNELS:
                raise Usage("no channel slots available")
            st.add_channel(self.group, address, port, 0, status=HARD_DISABLED)
        self.say("channel created")

    def cmd_disable(self, args: list[str]) -> None:
        self._switch(args, HARD_DISABLED, "disabled")

    def cmd_enable(self, args: list[str]) -> None:
        self._switch(args, ENABLED, "enabled")

    def _switch(self, args: list[str], status: int, word: str) -> None:
        """Set a channel of the current group to ``status`` unless it already is."""
        need(args, 1)
        c = self.channel_arg(args[0])
        with self.state.change():
            if self.state.get(self.group, c, C_STATUS) == status:
                self.say(f"channel {c} already {word}")
                return
            self.state.set_status(self.group, c, status)
        self.say(f"channel {c} {word}")

    def cmd_group(self, args: list[str]) -> None:
        need(args, 1)
        g = int_arg(args[0])
        if not 0 <= g < MAXGROUPS:
            raise Usage("value out of range")
        self.group = g

    def set_type(self, kind: int) -> None:
        with self.state.change():
            self.ensure_group()
            self.state.set_group_type(self.group, kind)
        name = "hash" if kind == HASH else "round robin"
        self.say(f"group {self.group} set to {name}")

    def cmd_hash(self, args: list[str]) -> None:
        need(args, 0)
        self.set_type(HASH)

    def cmd_rr(self, args: list[str]) -> None:
        need(args, 0)
        self.set_type(RR)

    def cmd_kill(self, args: list[str]) -> None:
        need(args, 0)
        if not self.state.writable:
            raise PermissionError(errno.EACCES, "permission denied")
        kill_master(self.state)
        self.say("shutdown complete, exiting.")
        raise Quit(EX_OK)

    def cmd_maxc(self, args: list[str]) -> None:
        need(args, 2)
        c = self.channel_arg(args[0])
        m = int_arg(args[1])
        if not 0 <= m <= MAX_MAXC:
            raise Usage("value out of range")
        with self.state.change():
            self.state.put(self.group, c, C_MAXC, m)
        self.say(f"maxc of channel {c} changed to {m}")

    def cmd_metrics(self, args: list[str]) -> None:
        need(args, 0)
        self.out.write(metrics_text(self.state, self.cfg))

    def cmd_monitor(self, args: list[str]) -> None:
        if len(args) > 1:
            raise Usage("syntax error")
        action = args[0].lower() if args else "show"
        if action not in ("enable", "disable", "show"):
            raise Usage("syntax error")
        st = self.state
        if st.monitor == MON_NONE:
            self.say("monitoring is not configured (start the master with -m to use it)")
            return
        if action != "show":
            with st.change():
                st.set_monitor(MON_ENABLED if action == "enable" else MON_DISABLED)
        self.out.write(monitor_text(st))

    def mrtg(self, args: list[str]) -> tuple[int, int]:
        need(args, 2)
        g, c = int_arg(args[0]), int_arg(args[1])
        if not 0 <= g < self.state.ngroups:
            raise Usage("unknown group")
        if not 0 <= c < self.state.nchannels(g):
            raise Usage("unknown channel")
        return g, c

    def cmd_mrtg_bytes(self, args: list[str]) -> None:
        g, c = self.mrtg(args)
        ch = self.state.channel(g, c)
        self.out.write(f"{ch.rcvd}\n{ch.sent}\nUNKNOWN\ngroup {g} channel {c}\n")

    def cmd_mrtg_conns(self, args: list[str]) -> None:
        g, c = self.mrtg(args)
        ch = self.state.channel(g, c)
        self.out.write(f"{ch.totalc}\nUNKNOWN\nUNKNOWN\ngroup {g} channel {c}\n")

    def cmd_quit(self, args: list[str]) -> None:
        raise Quit(EX_OK)

    def cmd_reset(self, args: list[str]) -> None:
        need(args, 1)
        c = self.channel_arg(args[0])
        with self.state.change():
            self.state.put(self.group, c, C_SENT, 0)
            self.state.put(self.group, c, C_RCVD, 0)
        self.say(f"channel {c} counters reset")

    def cmd_show(self, args: list[str]) -> None:
        need(args, 0)
        self.out.write(show_text(self.state))

    def cmd_version(self, args: list[str]) -> None:
        need(args, 0)
        self.out.write(f"  This is balance {__version__} (gbalance)\n"
                       f"  MAXGROUPS={MAXGROUPS}\n  MAXCHANNELS={MAXCHANNELS}\n")

    # -- dispatch --------------------------------------------------------------

    def execute(self, line: str) -> None:
        """Run one command line; a user's mistake prints a message, nothing more.

        Raises :class:`Quit` to end the session.
        """
        words = line.split()
        if not words:
            return
        command = lookup(words[0])
        if command is None:
            self.say(f"unknown command: {printable(words[0][:40])} (type help for a list)")
            return
        if not self.state.master_alive():
            sys.stderr.write(f"balance: {no_master(self.cfg)} any more (pid {self.state.pid} exited)\n")
            raise Quit(EX_UNAVAILABLE)
        try:
            command.handler(self, words[1:])
        except Usage as exc:
            self.say(str(exc))
        except PermissionError:
            self.say("permission denied: only the master's user may change this balance")


def printable(text: str) -> str:
    """Echo user input safely: no control characters back to the terminal."""
    return "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in text)


def need(args: list[str], count: int) -> None:
    """Exactly ``count`` arguments, or ``syntax error``."""
    if len(args) != count:
        raise Usage("syntax error")


def int_arg(word: str) -> int:
    """A decimal integer argument (a sign is allowed so that -1 is 'out of range')."""
    text = word[1:] if word[:1] in "+-" else word
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise Usage("syntax error")
    return int(word)


def port_arg(word: str) -> int:
    """A port number (or /etc/services name) in 1..65535."""
    if word.isascii() and word.isdigit():
        port = int(word) if len(word) <= 6 else 0
        if not 0 < port <= 65535:
            raise Usage("value out of range")
        return port
    import socket
    try:
        return socket.getservbyname(word, "tcp")
    except (OSError, UnicodeError):
        raise Usage("syntax error")


def host_arg(word: str) -> str:
    """A numeric address for a host name or literal (``[v6]`` allowed)."""
    if word.startswith("[") and word.endswith("]"):
        word = word[1:-1]
    try:
        return resolve_host(word)
    except BalanceError:
        raise Usage("invalid address")


COMMANDS: list[Command] = [
    Command("help", "", "show this list of commands (also ?)", Shell.cmd_help),
    Command("?", "", "", Shell.cmd_help),
    Command("assign", "<channel> <host> <port>", "point a disabled channel at another server",
            Shell.cmd_assign),
    Command("create", "<host> <port>", "add a channel to the current group (starts disabled)",
            Shell.cmd_create),
    Command("disable", "<channel>", "stop new connections to a channel of the current group",
            Shell.cmd_disable),
    Command("enable", "<channel>", "let a channel of the current group take connections",
            Shell.cmd_enable),
    Command("group", "<group>", "select the group that later commands act on", Shell.cmd_group),
    Command("hash", "", "route the current group by client address", Shell.cmd_hash),
    Command("kill", "", "shut the master process down and leave the shell", Shell.cmd_kill),
    Command("maxc", "<channel> <maxc>", "limit open connections of a channel (0 = no limit)",
            Shell.cmd_maxc),
    Command("metrics", "", "print all counters in Prometheus text format", Shell.cmd_metrics),
    Command("monitor", "[enable|disable|show]", "switch -m health checks on or off, or show them",
            Shell.cmd_monitor),
    Command("mrtg-bytes", "<group> <channel>", "bytes received and sent, in MRTG format",
            Shell.cmd_mrtg_bytes),
    Command("mrtg-conns", "<group> <channel>", "total connections, in MRTG format",
            Shell.cmd_mrtg_conns),
    Command("quit", "", "leave the shell", Shell.cmd_quit),
    Command("reset", "<channel>", "zero the byte counters of a channel", Shell.cmd_reset),
    Command("rr", "", "route the current group round robin", Shell.cmd_rr),
    Command("show", "", "list every channel of every group with its counters", Shell.cmd_show),
    Command("version", "", "print the version and the table limits", Shell.cmd_version),
]


def lookup(word: str) -> Command | None:
    """The first command, in help order, that ``word`` abbreviates."""
    word = word.lower()
    for command in COMMANDS:
        if command.name.startswith(word):
            return command
    return None


def help_text() -> str:
    """``available commands:`` and one line per command."""
    lines = ["available commands:"]
    for command in COMMANDS:
        if not command.summary:
            continue
        usage = f"{command.name} {command.synopsis}".rstrip()
        lines.append(f"  {usage:<32s} {command.summary}")
    return "\n".join(lines) + "\n"


# -- output formats ----------------------------------------------------------

def show_text(state: SharedState) -> str:
    """The ``show`` table: balance's exact layout, wider only for long IPv6 addresses."""
    channels = list(state.channels())
    width = max([ADDR_WIDTH] + [len(ch.address) for ch in channels])
    lines = [SHOW_HEADER.format(addr="ip-address".rjust(width))]
    for ch in channels:
        lines.append(SHOW_ROW.format(
            g=ch.group, t=TYPE_NAMES.get(state.group_type(ch.group), "?"), c=ch.index,
            s=STATUS_NAMES.get(ch.status, "???"), addr=ch.address.rjust(width), port=ch.port,
            cur=ch.c, totalc=ch.totalc, maxc=ch.maxc, sent=ch.sent, rcvd=ch.rcvd))
    return "\n".join(lines) + "\n"


def monitor_text(state: SharedState) -> str:
    """Whether checks run, and each channel's state as monitoring sees it."""
    from gbalance.state import C_CHANGED, C_FAILS, C_PASSES
    on = state.monitor == MON_ENABLED
    lines = [f"monitoring is {'enabled' if on else 'disabled'}"]
    channels = list(state.channels())
    width = max([ADDR_WIDTH] + [len(ch.address) for ch in channels])
    lines.append(f"GRP  #   S {'ip-address'.rjust(width)}  port suspect fails passes since")
    now = int(time.time())
    for ch in channels:
        changed = state.get(ch.group, ch.index, C_CHANGED)
        since = f"{max(0, now - changed)}s" if changed else "-"
        lines.append(f"{ch.group:3d} {ch.index:2d} {STATUS_NAMES.get(ch.status, '???'):>3s} "
                     f"{ch.address.rjust(width)} {ch.port:5d} "
                     f"{'yes' if ch.suspect else 'no':>7s} "
                     f"{state.get(ch.group, ch.index, C_FAILS):5d} "
                     f"{state.get(ch.group, ch.index, C_PASSES):6d} {since}")
    return "\n".join(lines) + "\n"


METRICS = [
    # name, type, help, channel field
    ("balance_channel_connections", "gauge", "Open client connections of a channel.", "c"),
    ("balance_channel_connections_total", "counter",
     "Connection attempts handed to a channel since it was created.", "totalc"),
    ("balance_channel_maxc", "gauge", "Connection limit of a channel (0 = no limit).", "maxc"),
    ("balance_channel_sent_bytes_total", "counter",
     "Bytes forwarded from clients to the channel's server (zeroed by reset).", "sent"),
    ("balance_channel_received_bytes_total", "counter",
     "Bytes forwarded from the channel's server to clients (zeroed by reset).", "rcvd"),
    ("balance_channel_suspect", "gauge",
     "1 while a connect to the channel has been pending too long (monitoring).", "suspect"),
]
STATE_LABELS = {ENABLED: "enabled", SOFT_DISABLED: "soft_disabled", HARD_DISABLED: "hard_disabled"}


def label(value: object) -> str:
    """Escape a label value as the text exposition format requires."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(state: SharedState, cfg: ShellConfig) -> str:
    """Every counter and state in the Prometheus text exposition format (0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    bind = cfg.bind or "any"
    family("balance_up", "gauge", "1 while the master process of this instance runs.")
    out.append(f'balance_up{{port="{cfg.port}",bind="{label(bind)}",pid="{state.pid}"}} '
               f"{1 if state.master_alive() else 0}")
    mon = {MON_NONE: "none", MON_ENABLED: "enabled", MON_DISABLED: "disabled"}
    family("balance_monitoring", "gauge", "Monitoring (-m) state: 1 for the current one.")
    for value, name in mon.items():
        out.append(f'balance_monitoring{{state="{name}"}} {1 if state.monitor == value else 0}')
    family("balance_group_type", "gauge", "Routing of a group: 1 for its current type (rr or hash).")
    for g in range(state.ngroups):
        kind = state.group_type(g)
        for value, name in ((RR, "rr"), (HASH, "hash")):
            out.append(f'balance_group_type{{group="{g}",type="{name}"}} {1 if kind == value else 0}')
    channels = list(state.channels())

    def labels(ch) -> str:
        return (f'group="{ch.group}",channel="{ch.index}",'
                f'address="{label(ch.address)}",port="{ch.port}"')

    family("balance_channel_state", "gauge",
           "Channel state: 1 for the current one (enabled, soft_disabled, hard_disabled).")
    for ch in channels:
        for value, name in STATE_LABELS.items():
            out.append(f'balance_channel_state{{{labels(ch)},state="{name}"}} '
                       f"{1 if ch.status == value else 0}")
    for name, kind, text, attr in METRICS:
        family(name, kind, text)
        for ch in channels:
            out.append(f"{name}{{{labels(ch)}}} {int(getattr(ch, attr))}")
    return "\n".join(out) + "\n"


# -- the master ----------------------------------------------------------------

def no_master(cfg: ShellConfig) -> str:
    where = f"port {cfg.port}" + (f" address {cfg.bind}" if cfg.bind else "")
    return f"no master process on {where}"


def open_master(cfg: ShellConfig) -> SharedState:
    """Map the state file of the live master for ``cfg``, or raise BalanceError."""
    path = state_path(cfg.port, cfg.bind)
    if cfg.debug:
        sys.stderr.write(f"state file {path}\n")
    try:
        state = SharedState.attach(path)
    except StateError as exc:
        if exc.errno == errno.ENOENT:
            raise BalanceError(f"{no_master(cfg)} (no state file {path})", EX_UNAVAILABLE)
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise BalanceError(f"permission denied: cannot read {path}", EX_NOPERM)
        raise BalanceError(f"{no_master(cfg)} ({exc})", EX_UNAVAILABLE)
    if not state.master_alive():
        pid = state.pid
        state.close()
        raise BalanceError(f"{no_master(cfg)} (stale state file {path}, pid {pid} is gone)",
                           EX_UNAVAILABLE)
    return state


def kill_master(state: SharedState, wait: float = KILL_WAIT) -> None:
    """SIGTERM the master and wait (bounded) until it has let go of the table and exited.

    The master drops its lock while it cleans up, a moment before the process
    ends; ``shutdown complete`` should mean the process is really gone.
    """
    pid = state.pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while state.master_alive() or process_running(pid):
        if time.monotonic() > deadline:
            raise Usage(f"master process {pid} did not shut down within {wait:g} seconds")
        time.sleep(0.01)


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc/self")


# -- input ---------------------------------------------------------------------

class LineReader:
    """Command lines from stdin: readline on a terminal, plain reads otherwise.

    Plain reads write the prompt themselves (no newline) and cut overlong
    lines, so a pipe or an ssh session without a tty behaves predictably.
    """

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = sys.stdin.isatty()
        self.history: str | None = None
        if self.tty:
            self._setup_readline()

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:
            return
        self.history = os.path.expanduser(HISTORY_FILE)
        readline.set_history_length(HISTORY_LENGTH)
        try:
            readline.read_history_file(self.history)
        except OSError:
            pass

    def save(self) -> None:
        """Keep the history for the next session (best effort)."""
        if self.history:
            import readline
            try:
                readline.write_history_file(self.history)
            except OSError:
                pass

    def read(self, prompt: str) -> str | None:
        """The next line without its newline; None at EOF; ``TOO_LONG`` if cut."""
        if self.tty:
            self.out.flush()
            try:
                line = input(prompt)
            except EOFError:
                return None
            return TOO_LONG if len(line) > MAX_LINE else line
        self.out.write(prompt)
        self.out.flush()
        raw = sys.stdin.buffer.readline(MAX_LINE + 1)
        if not raw:
            return None
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while True:  # drop the rest of the overlong line
                more = sys.stdin.buffer.readline(65536)
                if not more or more.endswith(b"\n"):
                    break
            return TOO_LONG
        return raw.decode("utf-8", "replace").rstrip("\r\n")


TOO_LONG = "\0too long"


def banner(state: SharedState) -> str:
    return (f"\nbalance {__version__} (gbalance) interactive command shell\n"
            f"PID of master process is {state.pid}\n\n")


def interactive(shell: Shell) -> int:
    """The ``-i`` loop: prompt, read, execute, until EOF, quit or kill."""
    out = shell.out
    out.write(banner(shell.state))
    reader = LineReader(out)
    if reader.tty:
        install_completion(shell)   # Tab completion (gbalance/completion.py)
    try:
        while True:
            try:
                line = reader.read(f"balance[{shell.group}] ")
            except KeyboardInterrupt:
                out.write("\n")
                continue
            if line is None:
                out.write("\n")
                return EX_OK
            if line == TOO_LONG:
                shell.say(f"line too long (more than {MAX_LINE} characters), ignored")
            else:
                shell.execute(line)
            out.flush()
    except Quit as q:
        return q.code
    finally:
        out.flush()
        reader.save()


def one_command(shell: Shell, command: str) -> int:
    """``-c``: run one command; exit 0 even when it printed an error message."""
    if len(command) > MAX_LINE:
        shell.say(f"line too long (more than {MAX_LINE} characters), ignored")
        return EX_OK
    try:
        shell.execute(command)
    except Quit as q:
        return q.code
    return EX_OK


def run_shell(cfg: ShellConfig) -> int:
    """Entry point for ``-i`` and ``-c``; returns the exit code."""
    state = open_master(cfg)
    shell = Shell(state, cfg, sys.stdout)
    try:
        if cfg.command is None:
            return interactive(shell)
        return one_command(shell, cfg.command)
    except BrokenPipeError:
        # The reader went away (``balance -c show 80 | head -1``): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_OK
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        state.close()
