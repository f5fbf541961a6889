"""The control shell's commands: the table, argument parsing and the answers.

Each command checks its arguments, reads what it shows straight from the
mapped table and asks the master (through :class:`~gbalance.shell.control.Control`)
for every change, then prints balance's answer.  The texts are balance's
and balance.fm's (``shared/spec/balance-behaviour.md``), and for every
command those programs have, nothing else: scripts compare whole outputs.
A session on a terminal (``friendly``) adds hints on the following lines;
gbalance's own commands (``metrics``, ``health``) print what they like.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from gbalance.table.channels import MAX_MAXC, Result
from gbalance.config import ShellConfig
from gbalance.shell.control import Control, MasterGone, no_master
from gbalance.errors import EX_CANTCREAT, EX_OK, EX_UNAVAILABLE, BalanceError
from gbalance.table.mailbox import NoAnswer, Op
from gbalance.shell.render import (help_text, metrics_text, monitor_status_line, monitor_table,
                             mrtg_bytes, mrtg_conns, show_text, version_text, write_atomic)
from gbalance.arguments import resolve_host
from gbalance.table.files import StateError
from gbalance.table.layout import Channel, HASH, MAXGROUPS, MON_NONE, RR
from gbalance.table.state import SharedState

DENIED = "permission denied: only the master's user may change this balance"


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
    handler: Callable[["Session", list[str]], None]


class Session:
    """One session against one master.

    ``group`` is the current group that channel commands act on, as in
    balance.  Every handler prints its answer on ``out``; ``status`` is the
    exit code a ``-c`` run ends with (0 unless writing a metrics file failed).
    ``friendly`` (``-i`` on a terminal) lets answers add a hint for a person
    after balance's text; otherwise the output is exactly balance's.
    """

    def __init__(self, state: SharedState, cfg: ShellConfig, out: TextIO,
                 control: Control | None = None, friendly: bool = False):
        self.state = state
        self.cfg = cfg
        self.out = out
        self.control = control if control is not None else Control(state)
        self.group = 0
        self.status = EX_OK
        self.friendly = friendly

    # -- helpers -------------------------------------------------------------

    def say(self, text: str) -> None:
        self.out.write(text + "\n")

    def hint(self, text: str) -> None:
        """A line for a person at a terminal, never in a script's output."""
        if self.friendly:
            self.say(text)

    def exists(self, c: int) -> bool:
        st = self.state
        return self.group < st.ngroups and 0 <= c < st.nchannels(self.group)

    def channel_arg(self, word: str, missing: str | None = None) -> int:
        """A channel number of the current group; ``missing`` is the text when there is none."""
        n = int_arg(word)
        if not self.exists(n):
            raise Usage(missing or f"no such channel {n}")
        return n

    def ask(self, op: Op, c: int = 0, a: int = 0, address: str = "", g: int | None = None) -> Result:
        """One change request for the current group; the master's result."""
        return self.control.request(op, self.group if g is None else g, c, a, address).result

    # -- commands ------------------------------------------------------------

    def cmd_help(self, args: list[str]) -> None:
        self.out.write(help_text((f"{c.name} {c.synopsis}".rstrip(), c.summary)
                                 for c in COMMANDS if c.summary))

    def cmd_assign(self, args: list[str]) -> None:
        need(args, 3)
        c = self.channel_arg(args[0], "unknown channel")
        address = host_arg(args[1])
        port = port_arg(args[2])
        result = self.ask(Op.ASSIGN, c, port, address)
        self.say({Result.OK: "channel reassigned",
                  Result.NOT_DISABLED: "channel must be disabled to assign new address",
                  Result.NO_CHANNEL: "unknown channel"}.get(result, message(result)))

    def cmd_create(self, args: list[str]) -> None:
        need(args, 2)
        address = host_arg(args[0])
        port = port_arg(args[1])
        result = self.ask(Op.CREATE, 0, port, address)
        self.say("channel created" if result == Result.OK else message(result))

    def cmd_disable(self, args: list[str]) -> None:
        self._switch(args, Op.DISABLE, "disabled")

    def cmd_enable(self, args: list[str]) -> None:
        self._switch(args, Op.ENABLE, "enabled")

    def _switch(self, args: list[str], op: Op, word: str) -> None:
        need(args, 1)
        c = self.channel_arg(args[0])
        result = self.ask(op, c)
        if result == Result.OK:
            self.say(f"channel {c} {word}")
        elif result == Result.ALREADY:
            self.say(f"channel {c} already {word}")
        elif result == Result.NO_CHANNEL:
            self.say(f"no such channel {c}")
        else:
            self.say(message(result))

    def cmd_group(self, args: list[str]) -> None:
        """Select group G; one without channels answers ``unknown group``
        and is still selected, so that ``create`` can add its first channel."""
        need(args, 1)
        g = int_arg(args[0])
        if not 0 <= g < MAXGROUPS:
            raise Usage("value out of range")
        self.group = g
        if g >= self.state.ngroups or self.state.nchannels(g) == 0:
            self.say("unknown group")
            self.hint(f"(group {g} has no channels; create adds one to it)")

    def _set_type(self, args: list[str], kind: int) -> None:
        need(args, 0)
        result = self.ask(Op.GROUP_TYPE, 0, kind)
        if result != Result.OK:
            self.say(message(result))
            return
        self.say(f"group {self.group} set to {'hash' if kind == HASH else 'round robin'}")

    def cmd_hash(self, args: list[str]) -> None:
        self._set_type(args, HASH)

    def cmd_rr(self, args: list[str]) -> None:
        self._set_type(args, RR)

    def cmd_kill(self, args: list[str]) -> None:
        need(args, 0)
        self.control.kill()
        self.say("shutdown complete, exiting.")
        if self.control.draining:
            self.hint(f"(master process {self.control.draining} no longer accepts; it exits when"
                      " its open connections end or its -g grace period is over)")
        raise Quit(EX_OK)

    def cmd_maxc(self, args: list[str]) -> None:
        need(args, 2)
        c = self.channel_arg(args[0], "unknown channel")
        m = int_arg(args[1])
        if not 0 <= m <= MAX_MAXC:
            raise Usage("value out of range")
        result = self.ask(Op.MAXC, c, m)
        if result == Result.OK:
            self.say(f"maxc of channel {c} changed to {m}")
        else:
            self.say("unknown channel" if result == Result.NO_CHANNEL else message(result))

    def cmd_metrics(self, args: list[str]) -> None:
        """``metrics``: print; ``metrics FILE``: replace FILE atomically (for node_exporter)."""
        if len(args) > 1:
            raise Usage("syntax error")
        text = metrics_text(self.state, self.cfg.port, self.cfg.bind)
        if not args:
            self.out.write(text)
            return
        try:
            write_atomic(args[0], text)
        except OSError as exc:
            sys.stderr.write(f"balance: cannot write metrics to {printable(args[0])}: "
                             f"{exc.strerror or exc}\n")
            self.status = EX_CANTCREAT

    def no_monitor(self) -> None:
        self.say("no monitor process running")
        self.hint("(start the master with -m to use monitoring)")

    def cmd_monitor(self, args: list[str]) -> None:
        st = self.state
        if st.monitor == MON_NONE:
            self.no_monitor()
            return
        if len(args) != 1 or args[0].lower() not in ("enable", "disable", "show"):
            raise Usage("syntax error")
        action = args[0].lower()
        if action == "show":
            self.say(monitor_status_line(st))
            if self.friendly:
                self.out.write(monitor_table(st))
            return
        result = self.ask(Op.MONITOR, 0, 1 if action == "enable" else 0)
        if result == Result.OK:
            self.say(f"monitor is now {action}d")
        elif result == Result.ALREADY:
            self.say(f"monitor is already {action}d")
        elif result == Result.NO_MONITOR:
            self.no_monitor()
        else:
            self.say(message(result))

    def cmd_health(self, args: list[str]) -> None:
        """gbalance's own: balance.fm's monitor line, then each channel's checks."""
        need(args, 0)
        st = self.state
        if st.monitor == MON_NONE:
            self.no_monitor()
            return
        self.say(monitor_status_line(st))
        self.out.write(monitor_table(st))

    def _mrtg(self, args: list[str]) -> Channel:
        need(args, 2)
        g, c = int_arg(args[0]), int_arg(args[1])
        if not 0 <= g < min(self.state.ngroups, MAXGROUPS):
            raise Usage("unknown group")
        if not 0 <= c < self.state.nchannels(g):
            raise Usage("unknown channel")
        return self.state.channel(g, c)

    def cmd_mrtg_bytes(self, args: list[str]) -> None:
        self.out.write(mrtg_bytes(self._mrtg(args)))

    def cmd_mrtg_conns(self, args: list[str]) -> None:
        self.out.write(mrtg_conns(self._mrtg(args)))

    def cmd_quit(self, args: list[str]) -> None:
        raise Quit(EX_OK)

    def cmd_reset(self, args: list[str]) -> None:
        need(args, 1)
        c = self.channel_arg(args[0])
        result = self.ask(Op.RESET, c)
        if result == Result.OK:
            self.say(f"channel {c} counters reset")
        else:
            self.say(f"no such channel {c}" if result == Result.NO_CHANNEL else message(result))

    def cmd_show(self, args: list[str]) -> None:
        need(args, 0)
        self.out.write(show_text(self.state))

    def cmd_version(self, args: list[str]) -> None:
        need(args, 0)
        self.out.write(version_text())

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
            self.say("syntax error")
            self.hint(f"(unknown command {printable(words[0][:40])}: type help for a list)")
            return
        if not self.state.master_alive():
            self.gone()
        try:
            command.handler(self, words[1:])
        except Usage as exc:
            self.say(str(exc))
        except PermissionError:
            self.say(DENIED)
        except MasterGone:
            self.gone()
        except (NoAnswer, StateError) as exc:
            self.say(f"no answer from the master: {exc}")

    def gone(self) -> None:
        sys.stderr.write(f"balance: {no_master(self.cfg)} any more (pid {self.state.pid} exited)\n")
        raise Quit(EX_UNAVAILABLE)


MESSAGES = {
    Result.NO_CHANNEL: "unknown channel",
    Result.NOT_DISABLED: "channel must be disabled to assign new address",
    Result.NO_SLOTS: "no channel slots available",
    Result.OUT_OF_RANGE: "value out of range",
    Result.INVALID_ADDRESS: "invalid address",
    Result.NO_MONITOR: "no monitor process running",
    Result.NO_GROUP: "unknown group",
    Result.BAD_REQUEST: "syntax error",
}


def message(result: Result) -> str:
    """The generic text for a result a command has no special word for."""
    return MESSAGES.get(result, "syntax error")


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
    Command("help", "", "show this list of commands (also ?)", Session.cmd_help),
    Command("?", "", "", Session.cmd_help),
    Command("assign", "<channel> <host> <port>", "point a disabled channel at another server",
            Session.cmd_assign),
    Command("create", "<host> <port>", "add a channel to the current group (starts disabled)",
            Session.cmd_create),
    Command("disable", "<channel>", "stop new connections to a channel of the current group",
            Session.cmd_disable),
    Command("enable", "<channel>", "let a channel of the current group take connections",
            Session.cmd_enable),
    Command("group", "<group>", "select the group that later commands act on", Session.cmd_group),
    Command("hash", "", "route the current group by client address", Session.cmd_hash),
    Command("health", "", "each channel's checks: suspect, fails, passes, stagger (-m)",
            Session.cmd_health),
    Command("kill", "", "shut the master process down and leave the shell", Session.cmd_kill),
    Command("maxc", "<channel> <maxc>", "limit open connections of a channel (0 = no limit)",
            Session.cmd_maxc),
    Command("metrics", "[file]", "all counters in Prometheus text format (to a file: atomically)",
            Session.cmd_metrics),
    Command("monitor", "[enable|disable|show]", "control the monitor process", Session.cmd_monitor),
    Command("mrtg-bytes", "<group> <channel>", "bytes received and sent, in MRTG format",
            Session.cmd_mrtg_bytes),
    Command("mrtg-conns", "<group> <channel>", "total connections, in MRTG format",
            Session.cmd_mrtg_conns),
    Command("quit", "", "leave the shell", Session.cmd_quit),
    Command("reset", "<channel>", "zero the connection and byte counters of a channel",
            Session.cmd_reset),
    Command("rr", "", "route the current group round robin", Session.cmd_rr),
    Command("show", "", "list every channel of every group with its counters", Session.cmd_show),
    Command("version", "", "print the version and the table limits", Session.cmd_version),
]


def lookup(word: str) -> Command | None:
    """The first command, in help order, that ``word`` abbreviates."""
    word = word.lower()
    for command in COMMANDS:
        if command.name.startswith(word):
            return command
    return None
