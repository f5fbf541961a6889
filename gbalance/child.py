"""Starting child processes that take nothing from the caller's directory.

balance is often started by root from wherever root happens to be; that
directory may belong to another user.  Every process the package starts
therefore runs in ``/`` (:data:`SAFE_CWD`), and:

* a Python child (a worker) runs ``python -I``: no current directory, no
  script directory, no ``PYTHON*`` variable and no user site directory on
  its path.  It imports the same gbalance as its master: the package's
  parent directory is put on its path only when the default path (site
  packages, an editable install's hook) would not find that very package;
* a command (a monitoring check) gets a ``$PATH`` (and ``$PYTHONPATH``,
  ``$LD_LIBRARY_PATH``...) without empty or relative entries (each means
  "the current directory") and the soft descriptor limit the master
  started with (:mod:`gbalance.limits` raises the master's own), so a
  program using ``select()`` works as it would from a shell.
"""

from __future__ import annotations

import os
import sys

import gbalance

#: The working directory of every child process.
SAFE_CWD = "/"

#: Run in the child before anything else: find the master's gbalance (argv[1]).
_BOOT = """\
import os, sys, importlib.util
d = sys.argv.pop(1)
s = importlib.util.find_spec("gbalance")
if s is None or s.origin is None or os.path.realpath(os.path.dirname(s.origin)) != \
        os.path.realpath(os.path.join(d, "gbalance")):
    sys.path.insert(0, d)
from {module} import main
sys.exit(main())
"""


def package_parent() -> str:
    """The directory holding this gbalance package (absolute)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(gbalance.__file__)))


def python_argv(module: str, *args: str) -> list[str]:
    """argv that runs ``module.main()`` of this package in an isolated interpreter."""
    if not module.replace(".", "").replace("_", "").isalnum():
        raise ValueError(f"not a module name: {module!r}")
    return [sys.executable, "-I", "-c", _BOOT.format(module=module), package_parent(), *args]


def safe_path(path: str | None) -> str:
    """``$PATH`` without the entries that name the current directory."""
    kept = [p for p in (path or "").split(os.pathsep) if p.startswith("/")]
    return os.pathsep.join(kept) or "/usr/local/bin:/usr/bin:/bin"


#: Search paths whose empty or relative entries would mean the current directory.
SEARCH_PATHS = ("PYTHONPATH", "LD_LIBRARY_PATH", "PERL5LIB", "RUBYLIB")


def command_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a command: the master's, with a safe ``$PATH`` and
    no empty or relative entry in the other search paths."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = safe_path(env.get("PATH"))
    for name in SEARCH_PATHS:
        if name in env:
            kept = os.pathsep.join(p for p in env[name].split(os.pathsep) if p.startswith("/"))
            if kept:
                env[name] = kept
            else:
                del env[name]
    return env
