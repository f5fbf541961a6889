"""Exit codes (sysexits) and the one exception type that carries them.

Every failure a user of ``balance`` can cause ends as a
:class:`BalanceError`, which ``cli.main`` turns into a line on stderr and an
exit code, so no path shows a Python traceback.  Other code catches it only
to say it in its own words (a ``-m`` spec, a shell command's address,
``balance-instances``' configuration errors) or to clean up and raise it
again (a hand-over).
"""

EX_OK = 0
EX_USAGE = 64        # bad command line, bad port, too many channels
EX_DATAERR = 65      # unknown or invalid host address
EX_UNAVAILABLE = 69  # empty/too many groups, bad -m spec, no master process
EX_SOFTWARE = 70     # internal error (a bug)
EX_OSERR = 71        # cannot listen, address in use, state directory unusable
EX_CANTCREAT = 73    # cannot write an output file (balance -c "metrics FILE")
EX_NOPERM = 77       # permission denied on the state file


class BalanceError(Exception):
    """An error with a user-facing message and an exit code."""

    def __init__(self, message: str, code: int = EX_USAGE):
        super().__init__(message)
        self.message = message
        self.code = code
