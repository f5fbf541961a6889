"""The control shell: ``balance -i`` (interactive) and ``balance -c cmd``.

The shell never talks to the master over a socket.  It maps the master's
state file read-only for what it shows and asks the master, through a
mailbox in the same file, for every change (see :mod:`gbalance.table.mailbox`);
the master applies it before its next connection.  Whoever may write the
state file (the master's user) may steer the master; everybody who may read
it may ``show`` it.

The work is split by job: :mod:`gbalance.shell.commands` (the command table,
parsing and answers), :mod:`gbalance.shell.render` (tables, MRTG, metrics),
:mod:`gbalance.shell.control` (finding and asking the master) and this module
(reading lines and running a session).

Output goes to stdout and is flushed after every command, so the shell
works in pipes, from cron and MRTG, and over ``ssh host balance -i 80``
without a terminal.  Line editing and history are only switched on when
stdin is a terminal; hints after balance's answers and the ``monitor show``
table only when stdin and stdout both are (never for ``-c``).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from gbalance.shell.commands import COMMANDS, Quit, Session
from gbalance.shell.completion import install_completion
from gbalance.config import ShellConfig
from gbalance.shell.control import open_master
from gbalance.errors import EX_OK
from gbalance.shell.render import banner

__all__ = ["COMMANDS", "Session", "interactive", "one_command", "run_shell"]

#: Longer than any valid command (a 253-character host name included).
MAX_LINE = 512

HISTORY_FILE = "~/.balance_history"
HISTORY_LENGTH = 1000


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


def interactive(shell: Session) -> int:
    """The ``-i`` loop: prompt, read, execute, until EOF, quit or kill."""
    out = shell.out
    out.write(banner(shell.state))
    reader = LineReader(out)
    if reader.tty:
        install_completion(shell, COMMANDS)   # Tab completion (gbalance/completion.py)
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


def one_command(shell: Session, command: str) -> int:
    """``-c``: run one command; exit 0 even when it printed an error message."""
    if len(command) > MAX_LINE:
        shell.say(f"line too long (more than {MAX_LINE} characters), ignored")
        return EX_OK
    try:
        shell.execute(command)
    except Quit as q:
        return q.code
    return shell.status


def run_shell(cfg: ShellConfig) -> int:
    """Entry point for ``-i`` and ``-c``; returns the exit code."""
    state = open_master(cfg)
    # Hints and the richer tables are for a person at a terminal; -c, and
    # -i in a pipe or over ssh without a tty, print exactly balance's texts.
    friendly = cfg.command is None and sys.stdin.isatty() and sys.stdout.isatty()
    shell = Session(state, cfg, sys.stdout, friendly=friendly)
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
