"""Which build of the hot path this process runs: compiled (Cython) or pure Python.

:data:`COMPILED_MODULES` is the one list of the modules ``setup.py`` may
compile with Cython (pure-Python mode: the ``.py`` files are the source,
unchanged; a ``.pxd`` beside one declares its ``__slots__`` classes as
extension types).  The ``.py`` modules always ship too, so an install
without a compiler, or one built with ``GBALANCE_PURE=1``, runs them.

``python3 -m gbalance.build`` prints ``compiled``, ``pure`` or
``partly compiled`` and the file each listed module was loaded from.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

#: Dotted names of the per-connection modules setup.py compiles when it can.
COMPILED_MODULES: tuple[str, ...] = (
    "gbalance.proxy.server",
    "gbalance.proxy.connect",
    "gbalance.proxy.forward",
    "gbalance.proxy.watchers",
    "gbalance.proxy.routing",
    "gbalance.table.counters",
    "gbalance.table.channels",
    "gbalance.proxy.stagger",
    "gbalance.system.limits",
    "gbalance.proxy.proxyproto",
)


def is_compiled(module: str) -> bool:
    """True when ``module`` was loaded from an extension module (.so)."""
    path = getattr(importlib.import_module(module), "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def kind() -> str:
    """``compiled`` (every listed module), ``pure`` (none) or ``partly compiled``."""
    flags = [is_compiled(m) for m in COMPILED_MODULES]
    return "compiled" if all(flags) else "pure" if not any(flags) else "partly compiled"


def main() -> int:
    lines = [kind()] + [f"  {name}: {importlib.import_module(name).__file__}" for name in COMPILED_MODULES]
    try:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:      # e.g. piped into head: the reader has what it wanted
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
