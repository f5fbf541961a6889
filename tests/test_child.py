"""Children never take code or settings from the caller's directory (gbalance.system.child).

Root starting ``balance`` from a directory another user (uid 65534) can
write must not import that user's ``gbalance/__init__.py`` or ``pickle.py``
in a worker, nor run a program of theirs as a monitoring check.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

import otheruser
from conftest import eventually, free_port, read_tag, wait_listening
from gbalance.system import child

ROOT = Path(__file__).resolve().parent.parent
#: The installed entry script: unlike "python -m", it puts no cwd on the path itself.
BALANCE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "balance")


@pytest.fixture
def planted(tmp_path):
    """A directory of the other user holding a gbalance package, a pickle
    module and a ``gbcheck`` program, each appending to the marker file (in
    root's private tmp_path: only root could write it) when run.  Yields
    (directory, marker)."""
    marker = tmp_path / "marker"
    payload = (f"import os\nwith open({str(marker)!r}, 'a') as f:\n"
               f"    f.write(f'{{os.getuid()}} {{__name__}}\\n')\n")
    with otheruser.temp_dir("gbal-cwd-", 0o755) as path:
        os.chown(path, otheruser.NOBODY, otheruser.NOBODY)
        otheruser.run_code("""
            import os, sys
            d, payload = sys.argv[1], sys.argv[2]
            os.makedirs(os.path.join(d, "gbalance", "process"))
            for name in ("gbalance/__init__.py", "gbalance/process/__init__.py", "gbalance/process/worker.py",
                         "pickle.py", "base64.py"):
                with open(os.path.join(d, name), "w") as f:
                    f.write(payload)
            with open(os.path.join(d, "gbcheck"), "w") as f:
                f.write("#!/bin/sh\\n" + f"echo $(id -u) gbcheck >> {sys.argv[3]}\\n")
            os.chmod(os.path.join(d, "gbcheck"), 0o755)
        """, str(path), payload, str(marker))
        yield path, marker


def _start(args: list[str], cwd: Path, env: dict, port: int, **kw) -> subprocess.Popen:
    proc = subprocess.Popen([BALANCE_SCRIPT, "-f", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        wait_listening(port, timeout=20)
    except TimeoutError:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"balance did not start: {err.decode(errors='replace')}")
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


def test_workers_ignore_a_planted_package_in_the_callers_directory(tmp_path, backends, planted):
    otheruser.require_root()
    directory, marker = planted
    b = backends("W")
    port = free_port()
    env = dict(os.environ, BALANCE_STATE_DIR=str(tmp_path / "state"))
    env.pop("PYTHONPATH", None)
    proc = _start(["-w", "2", str(port), b.spec], directory, env, port)
    tags, cwds = [], []
    try:
        time.sleep(0.5)                       # both workers started (and imported what they import)
        cwds = [os.readlink(f"/proc/{pid}/cwd") for pid in _children(proc.pid)]
        for _ in range(8):
            with contextlib.suppress(OSError):
                tags.append(read_tag(port, timeout=3))
    finally:
        err = _stop(proc)
    assert not marker.exists(), marker.read_text()
    assert tags == ["W"] * 8 and cwds == ["/", "/"], (tags, cwds)
    assert "died" not in err, err


def test_check_commands_never_run_a_program_from_the_callers_directory(tmp_path, backends, planted):
    otheruser.require_root()
    directory, marker = planted
    b = backends("M")
    port = free_port()
    # "." and an empty entry both mean the caller's directory.
    env = dict(os.environ, BALANCE_STATE_DIR=str(tmp_path / "state"),
               PATH=".:" + os.environ.get("PATH", "/usr/bin:/bin") + ":")
    proc = _start(["-m", "command=gbcheck %H %P:interval=0.2", str(port), b.spec], directory, env, port)
    try:
        # The check fails (no such program), so the channel goes soft-disabled.
        assert eventually(lambda: "dis" in _show(port, env), timeout=10), _show(port, env)
    finally:
        err = _stop(proc)
    assert "soft-disabled by monitoring" in err, err
    assert not marker.exists(), marker.read_text()


def test_check_commands_run_in_root_with_the_start_fd_limit(tmp_path, backends):
    out = tmp_path / "check-env"
    b = backends("M")
    port = free_port()
    env = dict(os.environ, BALANCE_STATE_DIR=str(tmp_path / "state"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    start_soft = min(512, hard)
    assert start_soft < hard

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (start_soft, hard))
    spec = f'command=/bin/sh -c "echo $(pwd) $(ulimit -Sn) >> {out}":interval=0.3'
    proc = _start(["-m", spec, str(port), b.spec], tmp_path, env, port, preexec_fn=low_limit)
    try:
        assert eventually(lambda: out.exists() and out.read_text().endswith("\n"), timeout=10)
    finally:
        _stop(proc)
    cwd, limit = out.read_text().splitlines()[0].split()
    assert cwd == "/"
    assert int(limit) == start_soft


def _show(port: int, env: dict) -> str:
    r = subprocess.run([BALANCE_SCRIPT, "-c", "show", str(port)], env=env, capture_output=True,
                       text=True, timeout=20, cwd="/")
    return r.stdout + r.stderr


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_python_argv_is_isolated_and_finds_this_package(tmp_path):
    argv = child.python_argv("gbalance.system.child")
    assert argv[0] == sys.executable and argv[1] == "-I"
    # A planted gbalance in the working directory and on $PYTHONPATH is not imported.
    (tmp_path / "gbalance").mkdir()
    (tmp_path / "gbalance" / "__init__.py").write_text("raise SystemExit('planted')\n")
    code = ("import gbalance, sys; print(gbalance.__file__)")
    r = subprocess.run([sys.executable, "-I", "-c", child._BOOT.replace(
        "from {module} import main\nsys.exit(main())\n", code), json.dumps(child.inherited_path())],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(r.stdout.strip()) == os.path.realpath(os.path.join(
        child.package_parent(), "gbalance", "__init__.py"))


def test_python_argv_finds_a_package_only_on_its_own_directory():
    """A copy of gbalance outside every default path (as the other user's
    readable copy is) is still what the child imports."""
    copy = otheruser.readable_copy()
    code = ("import os, sys; sys.argv[1:1] = ['[\"%s\"]' % os.environ['D']]\n"
            + child._BOOT.replace("from {module} import main\nsys.exit(main())\n",
                                  "import gbalance; print(gbalance.__file__)"))
    r = subprocess.run([otheruser.interpreter(), "-I", "-c", code], cwd="/",
                       env=dict(os.environ, D=str(copy)), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(copy / "gbalance" / "__init__.py")


@pytest.mark.parametrize("path,want", [
    (".:/usr/bin::/bin:", "/usr/bin:/bin"),
    ("bin:/sbin", "/sbin"),
    ("", "/usr/local/bin:/usr/bin:/bin"),
    (None, "/usr/local/bin:/usr/bin:/bin"),
])
def test_safe_path_drops_entries_meaning_the_current_directory(path, want):
    assert child.safe_path(path) == want


def test_python_argv_refuses_a_strange_module_name():
    with pytest.raises(ValueError):
        child.python_argv("os; import evil")


def test_command_env_drops_relative_search_path_entries():
    env = child.command_env({"PATH": ".:/bin", "PYTHONPATH": "lib::/opt/py", "LD_LIBRARY_PATH": ".",
                             "HOME": "/root"})
    assert env == {"PATH": "/bin", "PYTHONPATH": "/opt/py", "HOME": "/root"}


def test_inherited_path_keeps_the_masters_absolute_entries_but_not_its_directory(tmp_path):
    """A master whose gevent comes from $PYTHONPATH (or an rpm's private
    directory) hands that entry on; the caller's directory, which Python put
    first for -c or -m, and relative entries are not handed on."""
    extra = tmp_path / "deps"
    extra.mkdir()
    code = "import json; from gbalance.system import child; print(json.dumps(child.inherited_path()))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([child.package_parent(), str(extra), "rel"]))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    path = json.loads(r.stdout)
    assert path[0] == child.package_parent() and str(extra) in path
    assert "" not in path and "rel" not in path and str(tmp_path) not in path
    assert all(os.path.isabs(p) for p in path)
