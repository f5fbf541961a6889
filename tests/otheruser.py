"""Run Python code and the balance CLI as another user (uid/gid 65534) for real.

The other user may not be able to read this clone (a checkout under a 0700
directory) nor its virtualenv, so everything it imports - gbalance itself
and its dependencies - is copied once per test session into a temporary
directory any user may read, and the interpreter is started from its real
path with ``PYTHONPATH`` pointing there.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
_ROOT = Path(__file__).resolve().parent.parent
_copy: Path | None = None


def require_root() -> None:
    if os.geteuid() != 0:
        raise AssertionError("this test must run as root to act as a second user")


def interpreter() -> str:
    """A python the other user can run: the real file behind this venv's python."""
    return os.path.realpath(sys.executable)


def readable_copy() -> Path:
    """A world-readable directory holding gbalance and what it imports (made once)."""
    global _copy
    if _copy is not None:
        return _copy
    path = Path(tempfile.mkdtemp(prefix="gbal-nobody-"))
    atexit.register(shutil.rmtree, path, True)
    shutil.copytree(_ROOT / "gbalance", path / "gbalance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("gevent", "greenlet", "zope.interface", "zope.event", "docopt"):
        mod = importlib.import_module(name)
        source = Path(mod.__file__)
        top = name.split(".")[0]
        if source.name == "__init__.py":
            pkg = source.parent
            while pkg.name != top:
                pkg = pkg.parent
            if not (path / top).exists():
                shutil.copytree(pkg, path / top, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, path / source.name)
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644 if not f.endswith(".so") else 0o755)
    _copy = path
    return path


def env(base: dict | None = None) -> dict:
    """An environment in which the other user imports the readable copy."""
    e = dict(base if base is not None else os.environ)
    e["PYTHONPATH"] = str(readable_copy())
    e.pop("PYTHONHOME", None)
    e["HOME"] = "/nonexistent"
    return e


def argv(*args: str) -> list[str]:
    """``setpriv ... python -s args``: run as the other user."""
    return SETPRIV + [interpreter(), "-s", *args]


def balance_argv(*args: str) -> list[str]:
    """The balance CLI as the other user."""
    return argv("-m", "gbalance", *args)


def run(args: list[str], base_env: dict | None = None, timeout: float = 20.0,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run ``args`` (from :func:`argv`/:func:`balance_argv`) to completion."""
    return subprocess.run(args, env=env(base_env), cwd=str(readable_copy()), text=True,
                          capture_output=True, timeout=timeout, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def popen(args: list[str], base_env: dict | None = None) -> subprocess.Popen:
    """Start ``args`` as the other user with pipes on stdin and stdout."""
    return subprocess.Popen(args, env=env(base_env), cwd=str(readable_copy()), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_code(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run the Python ``code`` (dedented) as the other user; it must succeed."""
    r = run(argv("-c", textwrap.dedent(code), *args))
    assert r.returncode == 0, r.stderr
    return r


def plant_symlink(target: str, link: str) -> None:
    """The other user makes ``link`` a symbolic link to ``target``."""
    run_code("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", target, link)


def plant_table(path: str) -> None:
    """The other user creates ``path``: a well-formed state table whose
    address field would reach a shell as root."""
    run_code("""
        import os, sys
        from gbalance.table import layout as L
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, L.FILE_SIZE)
        os.pwrite(fd, L.MAGIC, 0)
        os.pwrite(fd, L.LAYOUT_VERSION.to_bytes(8, sys.byteorder), 8)
        os.pwrite(fd, b"1.2.3.4; touch /tmp/pwned", L.ADDR_OFFSET)
    """, path)


@contextlib.contextmanager
def temp_dir(prefix: str, mode: int):
    """A new temporary directory of ``mode`` (the test's tmp_path is private to
    root, so the other user cannot reach it); removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        d.chmod(mode)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
