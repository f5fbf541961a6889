"""Starting child processes that take nothing from the caller's directory.

balance is often started by root from wherever root happens to be; that
directory may belong to another user.  Every process the package starts
therefore runs in ``/`` (:data:`SAFE_CWD`), and:

* a Python child (a worker) runs ``python -I``: no current directory, no
  script directory, no ``PYTHON*`` variable and no user site directory on
  its path.  It imports the same code as its master: it is handed the
  master's own module search path (:func:`inherited_path`: absolute
  entries only, less the entry Python put first for ``python -m`` or
  ``-c``, which is the caller's directory), with the package's parent
  directory first, so an rpm's private module directory or gevent on the
  master's ``$PYTHONPATH`` are found as the master found them;
* a command (a monitoring check) gets a ``$PATH`` (and ``$PYTHONPATH``,
  ``$LD_LIBRARY_PATH``...) without empty or relative entries (each means
  "the current directory") and the soft descriptor limit the master
  started with (:mod:`gbalance.system.limits` raises the master's own), so a
  program using ``select()`` works as it would from a shell.
"""

from __future__ import annotations

import json
import os
import sys

import gbalance

#: The working directory of every child process.
SAFE_CWD = "/"

#: Run in the child before anything else: take the master's path (argv[1], JSON).
_BOOT = """\
import sys, json
p = json.loads(sys.argv.pop(1))
sys.path[:] = p + [e for e in sys.path if e not in p]
from {module} import main
sys.exit(main())
"""


def package_parent() -> str:
    """The directory holding this gbalance package (absolute)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(gbalance.__file__)))


def inherited_path() -> list[str]:
    """The master's module search path as a child should get it.

    Only absolute entries are kept (a relative one means the current
    directory).  Unless the master ran with ``-P``/``-I``, Python put one
    entry first itself: the script's directory, or for ``python -m`` and
    ``-c`` the caller's directory, which is dropped.  The package's parent
    directory comes first.
    """
    entries = list(sys.path)
    if entries and not sys.flags.safe_path and not sys.flags.isolated:
        argv0 = sys.argv[0] if sys.argv else ""
        script_dir = os.path.dirname(os.path.realpath(argv0)) if argv0 not in ("", "-c", "-m") else None
        first = entries[0]
        if (first == "" or script_dir is None or os.path.realpath(first) != script_dir
                or argv0.endswith("__main__.py")):
            entries = entries[1:]
    parent = package_parent()
    kept = [parent]
    for entry in entries:
        if os.path.isabs(entry) and entry not in kept:
            kept.append(entry)
    return kept


def python_argv(module: str, *args: str) -> list[str]:
    """argv that runs ``module.main()`` of this package in an isolated interpreter."""
    if not module.replace(".", "").replace("_", "").isalnum():
        raise ValueError(f"not a module name: {module!r}")
    return [sys.executable, "-I", "-c", _BOOT.format(module=module), json.dumps(inherited_path()), *args]


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
