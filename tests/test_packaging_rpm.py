"""The rpm for Fedora (``make rpm``): relations, layout, rpmlint, and a run of the installed files.

No Fedora here: the rpm is built with Debian's rpm, its relations are
checked against Fedora's package names (no ``python(abi)`` pin, which made
the old rpm installable nowhere), rpmlint must find nothing in the binary
or the source rpm, and the rpm is installed with ``rpm -i --root`` into a
throwaway directory (its own rpm database; the host's /usr and dpkg are not
touched).  There the installed launcher, run by its own ``#!/usr/bin/python3
-sP`` line with only gevent and docopt added to the path, proxies to a
loopback backend from the installed private modules (workers included),
answers ``-c`` and ``-i``, and ``rpm -e --root`` takes it all away again.
Last, in a throwaway root (a copy of this host, tests/throwaway_root.py),
``rpm -i`` and ``rpm -e`` run the scriptlets for real: bytecode for the
root's python3 after installing, nothing left after erasing.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT, Backend, free_port, pid_alive, read_tag, wait_listening

from gbalance import build

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "gbalance" / "__init__.py").read_text()).group(1)
#: The rpm is for this machine's architecture: the per-connection modules are compiled.
RPM_ARCH = subprocess.run(["rpm", "--eval", "%{_arch}"], capture_output=True, text=True, check=True).stdout.strip()
RPM = f"gbalance-{VERSION}-1.{RPM_ARCH}.rpm"
#: The modules' private directory (the architecture's libdir, not /usr/share).
APPDIR = subprocess.run(["rpm", "--eval", "%{_libdir}/gbalance"], capture_output=True, text=True,
                        check=True).stdout.strip()
SRPM = f"gbalance-{VERSION}-1.src.rpm"
HELPER = "/usr/libexec/gbalance/balance-instances"

pytestmark = pytest.mark.packaging


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=kw.pop("stdin", subprocess.DEVNULL),
                          **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rpm") / "dist"
    run(["sh", "packaging/build-rpm.sh"], cwd=ROOT, env=dict(os.environ, DIST_DIR=str(out)), timeout=600)
    return out


def query(dist: Path, what: str, pkg: str = RPM) -> list[str]:
    return run(["rpm", "-qp", f"--{what}", str(dist / pkg)]).stdout.splitlines()


def test_rpm_requires_fedora_packages_and_no_interpreter_version(dist):
    requires = query(dist, "requires")
    assert not [r for r in requires if r.startswith("python(abi)")], requires
    for name in ("python3 >= 3.11", "python3-gevent", "python3-docopt", "python3-greenlet", "/usr/bin/python3"):
        assert name in requires, (name, requires)
    # Nothing Debian-only, nothing versioned to this build host's Python.
    assert not [r for r in requires if re.search(r"python3\.\d+|dist-packages|site-packages", r)], requires
    assert "balance = 3.58" in query(dist, "provides")
    assert query(dist, "conflicts") == ["balance < 3.58"]
    assert query(dist, "obsoletes") == []
    assert run(["rpm", "-qp", "--qf", "%{ARCH} %{LICENSE}", str(dist / RPM)]).stdout == f"{RPM_ARCH} GPL-2.0-or-later"


def test_rpm_layout_private_modules_and_libexec_helper(dist):
    files = query(dist, "list")
    for path in ("/usr/bin/balance", HELPER, f"{APPDIR}/gbalance/cli.py",
                 f"{APPDIR}/gbalance/process/worker.py", "/usr/share/man/man1/balance.1.gz",
                 "/usr/share/man/es/man1/balance.1.gz", "/etc/balance.conf", "/usr/lib/systemd/system/balance.service",
                 "/usr/lib/systemd/system/balance@.service", "/usr/lib/systemd/system-generators/balance-generator",
                 "/usr/lib/tmpfiles.d/balance.conf"):
        assert path in files, path
    # Current Fedora merged /usr/sbin into /usr/bin: one command file, no link loop.
    assert not [f for f in files if f.startswith(("/usr/sbin", "/usr/lib/gbalance", "/usr/lib/python",
                                                   "/usr/share/gbalance"))], files
    # One extension module per compiled module, beside its .py; no build input.
    for module in build.COMPILED_MODULES:
        path = f"{APPDIR}/{module.replace('.', '/')}"
        assert f"{path}.py" in files and [f for f in files if re.fullmatch(rf"{re.escape(path)}\.cpython-3\d+-[\w-]+\.so", f)], module
    assert not [f for f in files if f.endswith((".pxd", ".c"))], files
    assert not [f for f in files if f.endswith(".pyc") or "dist-info" in f], files
    assert not any("init.d" in f for f in files)
    scripts = run(["rpm", "-qp", "--scripts", str(dist / RPM)]).stdout
    assert re.search(rf"postinstall scriptlet.*\n(.*\n)*.*-m compileall -q -f {APPDIR}/gbalance", scripts)
    assert re.search(rf"preuninstall scriptlet.*\n(.*\n)*.*rm -rf {APPDIR}/gbalance/__pycache__", scripts)
    assert "systemctl reload balance.service" in scripts
    spec = (ROOT / "rpm" / "gbalance.spec").read_text()
    assert "/usr/lib/gbalance" not in spec.replace("s|/usr/lib/gbalance/balance-instances|", "")
    assert "%{_libexecdir}/gbalance/balance-instances" in spec and not re.search(r"^Obsoletes:", spec, re.M)


def test_rpmlint_finds_nothing_in_binary_and_source_rpm(dist):
    assert SRPM in os.listdir(dist)
    lint = run(["rpmlint", "-c", str(ROOT / "rpm" / "rpmlint.toml"), str(dist / RPM), str(dist / SRPM)],
               check=False, timeout=300)
    assert "2 packages and 0 specfiles checked; 0 errors, 0 warnings" in lint.stdout, lint.stdout + lint.stderr


@pytest.fixture
def root(dist, tmp_path):
    """The rpm installed with ``rpm -i --root`` (its own database), erased afterwards."""
    r = tmp_path / "root"
    r.mkdir()
    # No shell or python3 in the directory: the scriptlets (bytecode,
    # systemctl) cannot run there; their text is checked above.
    run(["rpm", "--root", str(r), "-i", "--nodeps", "--noscripts", str(dist / RPM)], timeout=120)
    yield r
    run(["rpm", "--root", str(r), "-e", "--noscripts", "gbalance"], check=False)


def test_installed_rpm_units_call_the_libexec_helper(root):
    for unit in ("balance.service", "balance@.service", "balance-metrics.service"):
        text = (root / "usr/lib/systemd/system" / unit).read_text()
        assert HELPER in text and "/usr/lib/gbalance" not in text, unit
    generator = (root / "usr/lib/systemd/system-generators/balance-generator").read_text()
    assert f"exec {HELPER} generate" in generator


def test_installed_rpm_proxies_with_workers_and_answers_the_control_commands(root, tmp_path):
    assert run(["rpm", "--root", str(root), "-q", "gbalance"]).stdout.strip() == f"gbalance-{VERSION}-1.{RPM_ARCH}"
    balance = root / "usr/bin/balance"
    assert balance.read_text().splitlines()[0] == "#!/usr/bin/python3 -sP"
    # The launcher's own interpreter line; only gevent and docopt (this
    # venv's, built for the same CPython 3.11) are added to the path.
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": site, "BALANCE_STATE_DIR": str(tmp_path / "state"),
           "LC_ALL": "C.UTF-8"}
    cwd = tmp_path / "elsewhere"      # not the checkout: nothing to pick up from
    cwd.mkdir()
    alone = run(["/usr/bin/python3", "-sP", "-c", "import gbalance"], env=env, cwd=cwd, check=False)
    assert alone.returncode == 1 and "No module named 'gbalance'" in alone.stderr, "gbalance outside the root"
    assert run([str(balance), "--version"], env=env, cwd=cwd).stdout.strip() == f"balance {VERSION} (gbalance)"
    usage = run([str(root / HELPER.lstrip("/"))], env=env, cwd=cwd, check=False)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: balance-instances"), usage.stderr

    a = Backend("A")
    port = free_port()
    master = subprocess.Popen([str(balance), "-f", "-w", "2", "-b", "127.0.0.1", str(port), a.spec], env=env, cwd=cwd,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(port, timeout=30)
        assert [read_tag(port) for _ in range(6)] == ["A"] * 6
        show = run([str(balance), "-b", "127.0.0.1", "-c", "show", str(port)], env=env, cwd=cwd).stdout
        assert re.search(rf"^\s+0\s+RR\s+\d+\s+ENA\s+127\.0\.0\.1\s+{a.port}\s", show, re.M), show
        shell = run([str(balance), "-b", "127.0.0.1", "-i", str(port)], env=env, cwd=cwd, stdin=None,
                    input="version\nquit\n")
        assert f"This is balance {VERSION}" in shell.stdout, shell.stdout + shell.stderr
        # Two workers, started by the master from the installed modules.
        workers = run(["pgrep", "-P", str(master.pid)], check=False).stdout.split()
        assert len(workers) == 2, workers
        for pid in workers:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            # An isolated interpreter handed the master's module path, the
            # rpm's private directory first (gbalance.system.child).
            assert cmdline[:3] == [b"/usr/bin/python3", b"-I", b"-c"], cmdline
            assert json.loads(cmdline[4])[0] == f"{root}{APPDIR}", cmdline
            assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        # The one gbalance on that path is the installed one: Python cached
        # its bytecode there (no PYTHONDONTWRITEBYTECODE in this environment).
        pkg = root / APPDIR.lstrip("/") / "gbalance"
        assert {"cli", "worker", "layout"} <= {p.name.split(".")[0] for p in pkg.glob("**/__pycache__/*")}
        # ... and its per-connection modules are the compiled ones.
        for pid in workers:
            with open(f"/proc/{pid}/maps") as maps:
                mapped = {Path(line.split()[-1]).name.split(".")[0] for line in maps if str(pkg) in line
                          and line.rstrip().endswith(".so")}
            assert mapped == {m.rsplit(".", 1)[1] for m in build.COMPILED_MODULES}, (pid, mapped)
    finally:
        if master.poll() is None:
            os.kill(master.pid, signal.SIGTERM)
        try:
            master.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            os.kill(master.pid, signal.SIGKILL)
            master.communicate()
        a.close()
    assert not pid_alive(master.pid)


def test_rpm_erase_from_the_root_leaves_nothing(dist, tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    run(["rpm", "--root", str(r), "-i", "--nodeps", "--noscripts", str(dist / RPM)])
    assert (r / APPDIR.lstrip("/") / "gbalance/cli.py").exists()
    run(["rpm", "--root", str(r), "-e", "--noscripts", "gbalance"])
    # Only the root's own rpm database is left (Debian's rpm keeps it in
    # ~/.rpmdb, Fedora's in /usr/lib/sysimage/rpm): inside the root.
    dbpath = run(["rpm", "--eval", "%_dbpath"]).stdout.strip().lstrip("/")
    assert (r / dbpath).is_dir()
    left = [str(p.relative_to(r)) for p in r.rglob("*") if p.is_file() and not p.is_relative_to(r / dbpath)]
    assert left == [], left
    assert not (r / APPDIR.lstrip("/")).exists() and not (r / "usr/libexec/gbalance").exists()


def test_rpm_scriptlets_compile_and_clean_up_in_a_throwaway_root(dist):
    """rpm -i and rpm -e with their scriptlets, in a throwaway root (tests/throwaway_root.py).

    The root is a copy of this Debian host, so the scriptlets run with a real
    /bin/sh and /usr/bin/python3: %post compiles the private modules for that
    python3, the installed balance proxies (Debian's gevent and docopt stand
    in for Fedora's), and %preun leaves nothing behind on erase.
    """
    from throwaway_root import create_root

    with create_root() as root:
        root.write(f"/tmp/{RPM}", (dist / RPM).read_bytes())
        root.run(["rpm", "-i", "--nodeps", f"/tmp/{RPM}"])
        pkg = root.file(f"{APPDIR}/gbalance")
        compiled = {p.name for p in pkg.glob("**/__pycache__/*")}
        assert {"cli.cpython-311.pyc", "worker.cpython-311.pyc", "instances.cpython-311.pyc"} <= compiled, compiled
        assert root.run(["rpm", "-q", "gbalance"]).stdout.strip() == f"gbalance-{VERSION}-1.{RPM_ARCH}"
        root.apt_install("python3-gevent", "python3-docopt")
        assert root.run(["balance", "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"
        a = Backend("A")
        port = free_port()
        try:
            root.run(["balance", "-b", "127.0.0.1", str(port), a.spec])
            wait_listening(port, timeout=30)
            assert read_tag(port) == "A"
            show = root.run(["balance", "-b", "127.0.0.1", "-c", "show", str(port)]).stdout
            assert re.search(rf"^\s+0\s+RR\s+\d+\s+ENA\s+127\.0\.0\.1\s+{a.port}\s", show, re.M), show
        finally:
            a.close()
        root.kill_processes()
        root.run(["rpm", "-e", "gbalance"])
        for gone in (APPDIR, "/usr/libexec/gbalance", "/usr/bin/balance",
                     "/usr/lib/systemd/system/balance@.service"):
            assert not root.file(gone).exists(), gone
