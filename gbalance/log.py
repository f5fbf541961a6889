"""Where messages go: stderr in the foreground, syslog once daemonized.

The ``-d`` trace is written as-is (balance's format, partial lines
included) to stderr in the foreground and line by line to syslog at debug
level when detached.

Under systemd (``$JOURNAL_STREAM`` names the device and inode of our
stderr) every stderr line starts with its syslog priority, ``<N>``, which
journald reads and strips (``SyslogLevelPrefix=``, on by default), so
``journalctl -p warning -t balance`` finds warnings and errors; the
``balance:`` prefix is left out there because the journal names the
program itself.  Detached, syslog carries the priority and the ident
``balance``.
"""

from __future__ import annotations

import os
import sys
import syslog
from typing import TextIO
from syslog import LOG_ERR as LOG_ERR, LOG_INFO as LOG_INFO, LOG_WARNING as LOG_WARNING  # re-exported


def journal_stderr(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream systemd gave us."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def stderr_line(priority: int, message: str, journal: bool | None = None) -> str:
    """One stderr line: ``<N>message`` for the journal, else ``balance: message``."""
    if journal is None:
        journal = journal_stderr()
    if journal:
        return "".join(f"<{priority}>{line}\n" for line in message.split("\n"))
    return f"balance: {message}\n"


def write_stderr(priority: int, message: str) -> None:
    """Write one message line to stderr (never raises)."""
    try:
        sys.stderr.write(stderr_line(priority, message))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class Log:
    """A tiny logger with balance's two sinks."""

    def __init__(self, foreground: bool = True, ident: str = "balance"):
        self.foreground = foreground
        self._partial = ""
        self.journal = foreground and journal_stderr()
        if not foreground:
            syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_DAEMON)

    def _emit(self, priority: int, message: str) -> None:
        if self.foreground:
            try:
                sys.stderr.write(stderr_line(priority, message, self.journal))
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        else:
            syslog.syslog(priority, message)

    def info(self, message: str) -> None:
        self._emit(syslog.LOG_INFO, message)

    def warning(self, message: str) -> None:
        self._emit(syslog.LOG_WARNING, message)

    def error(self, message: str) -> None:
        self._emit(syslog.LOG_ERR, message)

    def trace(self, text: str) -> None:
        """Debug trace text, possibly a partial line (``trying ... ``)."""
        if self.foreground and not self.journal:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            return
        # Syslog and the journal take whole lines, each with its priority.
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            if self.foreground:
                try:
                    sys.stderr.write(f"<{syslog.LOG_DEBUG}>{line}\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            else:
                syslog.syslog(syslog.LOG_DEBUG, line)
