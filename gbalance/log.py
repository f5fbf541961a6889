"""Where messages go: stderr in the foreground, syslog once daemonized.

The ``-d`` trace is written as-is (balance's format, partial lines
included) to stderr in the foreground and line by line to syslog at debug
level when detached.
"""

from __future__ import annotations

import sys
import syslog


class Log:
    """A tiny logger with balance's two sinks."""

    def __init__(self, foreground: bool = True, ident: str = "balance"):
        self.foreground = foreground
        self._partial = ""
        if not foreground:
            syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_DAEMON)

    def _emit(self, priority: int, message: str) -> None:
        if self.foreground:
            try:
                sys.stderr.write(f"balance: {message}\n")
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
        if self.foreground:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            return
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            syslog.syslog(syslog.LOG_DEBUG, line)
