"""The OS packages: one version, the .deb, the .rpm, the apt repo, pip.

The first tests are fast and need no root: the version is defined once,
and the init script is LSB and valid sh (the instance helper it calls is
tested in test_instances.py).  The tests marked ``packaging`` build the
real .deb, .rpm and a flat apt repository on the host (in temporary
directories) and check them (dpkg -I, rpm -qp, lintian --pedantic,
rpmlint).  Everything that installs or starts something happens in a
throwaway root (tests/throwaway_root.py: an overlay of the host's system
in a private mount namespace): a stand-in for the C balance package, then
``apt install gbalance`` over it from the apt repository (it must replace
it), the real maintainer scripts, the init script driving /etc/balance.conf
lines against loopback backends (start, status, check, stop; restart and a
.deb upgrade hand every instance over with ``balance -r``), the man pages
in English and Spanish (the locale generated in the root), systemd-analyze
on the installed units, removal and purge, and the package's own
autopkgtests (debian/tests) with autopkgtest's null runner.  The last test
checks that the host's /etc/balance.conf, dpkg database, installed gbalance
(if any), apt sources and locales are as they were.  pip installs from
pyproject.toml alone into a fresh venv.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gbalance import build

from conftest import ROOT, Backend, eventually, free_port, pid_alive, read_line, read_tag, wait_port
from throwaway_root import create_root

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "gbalance" / "__init__.py").read_text()).group(1)
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def run(cmd: list[str] | str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command (text mode); on failure show what it printed."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          shell=isinstance(cmd, str), stdin=subprocess.DEVNULL, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


# -- one version ---------------------------------------------------------------

def test_version_is_defined_once_and_used_everywhere():
    changelog = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"gbalance ({VERSION}) "), changelog
    spec = (ROOT / "rpm" / "gbalance.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(VERSION)}$", spec, re.M)
    for page in ("balance.1", "balance.es.1"):
        th = next(line for line in (ROOT / "man" / page).read_text().splitlines() if line.startswith(".TH"))
        assert f'"gbalance {VERSION}"' in th, (page, th)
    out = run([sys.executable, "-m", "gbalance", "--version"], cwd=ROOT).stdout
    assert out.strip() == f"balance {VERSION} (gbalance)"


def test_build_scripts_refuse_version_drift(tmp_path):
    """A tree whose changelog says another version does not build."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "dist", "repo", "*.egg-info",
                                                              "__pycache__", ".pytest_cache", "build"))
    changelog = tree / "debian" / "changelog"
    changelog.write_text(changelog.read_text().replace(f"gbalance ({VERSION})", "gbalance (9.9.9)", 1))
    done = run(["sh", str(tree / "packaging" / "build-deb.sh")], check=False,
               env=dict(os.environ, DIST_DIR=str(tmp_path / "dist")))
    assert done.returncode != 0
    assert "version drift" in done.stderr and "debian/changelog=9.9.9" in done.stderr
    spec = tree / "rpm" / "gbalance.spec"
    spec.write_text(spec.read_text().replace(f"Version:        {VERSION}", "Version:        9.9.9"))
    done = run(["sh", str(tree / "packaging" / "build-rpm.sh")], check=False,
               env=dict(os.environ, DIST_DIR=str(tmp_path / "dist")))
    assert done.returncode != 0 and "version drift" in done.stderr
    assert not (tmp_path / "dist").exists()


# -- the init script ------------------------------------------------------------

def test_init_script_is_lsb_and_valid_sh():
    script = (ROOT / "etc" / "init.d" / "balance").read_text()
    for field in ("Provides:", "Required-Start:", "Required-Stop:", "Default-Start:", "Default-Stop:",
                  "Short-Description:"):
        assert re.search(rf"^# {field}\s+\S", script, re.M), field
    for action in ("start", "stop", "restart", "reload", "force-reload", "status"):
        assert re.search(rf"(^|[\s|]){action}[|)]", script, re.M), action
    run(["sh", "-n", str(ROOT / "etc" / "init.d" / "balance")])
    assert os.access(ROOT / "etc" / "init.d" / "balance", os.X_OK)


# -- the real packages, in a throwaway root ---------------------------------------
#
# Everything that installs, configures or starts something runs in a
# throwaway root (tests/throwaway_root.py): an overlay of the host's own
# system in a private mount namespace, thrown away at the end.  The host's
# /etc, /usr and dpkg database are never written, and a gbalance installed
# on the host does not matter (it is purged inside the root first).  The
# builds (dpkg-buildpackage, rpmbuild) and the checks of the built files
# (lintian, rpmlint, dpkg-deb) run on the host in temporary directories.

def host_snapshot() -> dict[str, object]:
    """What the packaging tests must leave as they found it on the host."""
    def digest(path: str) -> str | None:
        p = Path(path)
        if p.is_symlink():
            return "-> " + os.readlink(p)
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        return "dir" if p.is_dir() else None

    listing = run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package} ${Version}\n"]).stdout
    files = run(["dpkg-query", "-L", "gbalance"], check=False).stdout.split()
    watched = ["/etc/balance.conf", "/etc/init.d/balance", "/usr/sbin/balance", "/usr/bin/balance",
               "/usr/sbin/policy-rc.d", "/var/lib/dpkg/status", "/usr/lib/locale/locale-archive",
               "/run/balance", "/etc/rc2.d/S01balance"]
    return {
        "dpkg -l": listing,
        "files": {f: digest(f) for f in sorted(set(files + watched))},
        "apt sources": sorted(os.listdir("/etc/apt/sources.list.d")),
        "locales": run(["locale", "-a"]).stdout,
        "balance processes": sorted(pid for pid in os.listdir("/proc") if pid.isdigit()
                                    and _cmdline(pid).startswith(("/usr/sbin/balance", "/usr/bin/python3 /usr/sbin/balance"))),
    }


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def host_before():
    """The host as the packaging tests found it (checked by the last test)."""
    return host_snapshot()


def build_fake_balance(where: Path) -> Path:
    """A tiny package named balance owning /usr/sbin/balance and man1/balance.1.gz."""
    root = where / "balance"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr" / "sbin").mkdir(parents=True)
    (root / "usr" / "share" / "man" / "man1").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: balance\nVersion: 3.57-1\nArchitecture: all\nMaintainer: test <test@example.invalid>\n"
        "Description: stand-in for the C balance\n")
    tool = root / "usr" / "sbin" / "balance"
    tool.write_text("#!/bin/sh\necho 'this is the C balance'\n")
    tool.chmod(0o755)
    subprocess.run(f"echo '.TH BALANCE 1' | gzip -9n > {root}/usr/share/man/man1/balance.1.gz", shell=True, check=True)
    out = where / "balance_3.57-1_all.deb"
    run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(out)])
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, host_before):
    """The .deb, the .rpm and the flat apt repository, built on the host into temporary dirs."""
    if os.geteuid() != 0:
        pytest.fail("the packaging tests need root for their throwaway root (CI runs them as root)")
    top = tmp_path_factory.mktemp("pkg")
    dist, repo = top / "dist", top / "repo"
    # The default build (no profile): compiled with the host's cython3, so
    # every install test below runs the extension modules.
    env = dict(os.environ, DIST_DIR=str(dist), REPO_DIR=str(repo))
    for name in ("GBALANCE_COMPILED", "GBALANCE_PURE", "DEB_BUILD_PROFILES"):
        env.pop(name, None)
    run(["sh", "packaging/build-deb.sh"], cwd=ROOT, env=env, timeout=600)
    run(["sh", "packaging/build-rpm.sh"], cwd=ROOT, env=env, timeout=600)
    sources_line = run(["sh", "packaging/build-apt-repo.sh"], cwd=ROOT, env=env).stdout.strip().splitlines()[-1]
    assert sources_line == f"deb [trusted=yes] file:{repo} ./"
    return {"dist": dist, "repo": repo, "deb": dist / f"gbalance_{VERSION}_{ARCH}.deb",
            "fake": build_fake_balance(top)}


@pytest.fixture(scope="module")
def pkg(built):
    """A throwaway root with the stand-in C balance, then ``apt install gbalance`` over it.

    The repository that build-apt-repo.sh made is copied into the root and
    used as it is; the Spanish locale is generated inside the root.
    """
    root = create_root()
    try:
        shutil.copytree(built["repo"], root.file("/srv/gbalance-repo"))
        root.write("/etc/apt/sources.list.d/gbalance.list", "deb [trusted=yes] file:/srv/gbalance-repo ./\n")
        root.run(["apt-get", "update", "-qq", "-o", "Dir::Etc::sourcelist=/etc/apt/sources.list.d/gbalance.list",
                  "-o", "Dir::Etc::sourceparts=-", "-o", "APT::Get::List-Cleanup=0"])
        shutil.copy(built["fake"], root.file("/srv/balance_3.57-1_all.deb"))
        root.run(["dpkg", "-i", "/srv/balance_3.57-1_all.deb"])
        before = root.installed()
        assert "balance" in before and "gbalance" not in before
        install = root.apt_install("gbalance")
        root.run(["localedef", "-i", "es_ES", "-c", "-f", "UTF-8", "es_ES.UTF-8"])
        yield {**built, "root": root, "pulled": set(root.installed()) - set(before), "install": install.stdout}
    finally:
        root.close()


@pytest.mark.packaging
def test_deb_installs_everything_and_is_lintian_clean(pkg):
    deb = pkg["deb"]
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ("./usr/sbin/balance", "./usr/bin/balance -> ../sbin/balance", "./usr/share/man/man1/balance.1.gz",
                 "./usr/share/man/es/man1/balance.1.gz", "./etc/init.d/balance", "./etc/balance.conf",
                 "./lib/systemd/system/balance.service", "./lib/systemd/system/balance@.service",
                 "./lib/systemd/system/balance-metrics.service", "./lib/systemd/system/balance-metrics.timer",
                 "./lib/systemd/system-generators/balance-generator", "./usr/lib/tmpfiles.d/balance.conf",
                 "./usr/lib/gbalance/balance-instances", "./usr/share/doc/gbalance/copyright",
                 "./usr/share/doc/gbalance/examples/gbalance.conf.example",
                 "./usr/lib/python3/dist-packages/gbalance/cli.py",
                 "./usr/lib/python3/dist-packages/gbalance/service/instances.py"):
        assert path in listing, path
    info = run(["dpkg", "-I", str(deb)]).stdout
    for relation in (" Provides: balance\n", " Conflicts: balance\n", " Replaces: balance\n",
                     " Homepage: https://"):
        assert relation in info, relation
    control = (ROOT / "debian" / "control").read_text()
    assert "pybuild-plugin-pyproject" in control and "Standards-Version: 4.6.2" in control
    root = pkg["root"]
    conffiles = root.run(["dpkg-query", "--control-show", "gbalance", "conffiles"]).stdout
    assert "/etc/balance.conf" in conffiles and "/etc/init.d/balance" in conffiles
    depends = root.run(["dpkg-query", "-W", "-f", "${Depends}", "gbalance"]).stdout
    assert "python3-gevent" in depends and "python3-docopt" in depends
    # Pedantic, with infos: nothing but the one explained override is left
    # (the extension modules included: hardening flags, stripped, shlibs).
    lint = run(["lintian", "--pedantic", "-I", "--show-overrides", "--fail-on", "error,warning", str(deb)],
               check=False, timeout=600)
    tags = [line for line in lint.stdout.splitlines() if re.match(r"[EWIPXO]: ", line)]
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # (and the compiled modules' recv/send into run-time-sized buffers, which
    # _FORTIFY_SOURCE cannot check: debian/gbalance.lintian-overrides)
    unfortified = [f"O: gbalance: hardening-no-fortify-functions [usr/lib/python3/dist-packages/gbalance/proxy/{m}]"
                   for m in sorted(re.findall(r"/gbalance/proxy/((?:connect|forward|server)\.[\w.-]+\.so)$", listing, re.M))]
    assert len(unfortified) == 3, unfortified
    assert sorted(tags) == sorted(["O: gbalance: manual-page-for-system-command [usr/sbin/balance]", *unfortified]), \
        lint.stdout


@pytest.mark.packaging
def test_deb_is_compiled_for_this_architecture_and_runs_compiled(pkg):
    """Plain make deb compiles the hot path with bookworm's cython3 (0.29): an arch .deb
    with one extension module per listed module (beside its .py), no build
    input (.pxd, .c), and the installed python3 loads the compiled modules."""
    deb = pkg["deb"]
    info = run(["dpkg", "-I", str(deb)]).stdout
    assert f" Architecture: {ARCH}\n" in info, info
    depends = re.search(r"^ Depends: (.*)$", info, re.M).group(1)
    assert "libc6" in depends and "python3 (<< 3." in depends, depends    # shlibs and the ABI
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    site = "./usr/lib/python3/dist-packages/"
    for module in build.COMPILED_MODULES:
        path = site + module.replace(".", "/")
        assert re.search(rf" {re.escape(path)}\.cpython-3\d+-[\w-]+\.so$", listing, re.M), module
        assert f" {path}.py\n" in listing, module
    assert not re.search(r"\.(pxd|c|pyx)$", listing, re.M), listing
    root = pkg["root"]
    out = root.run(["python3", "-m", "gbalance.build"], cwd="/").stdout.splitlines()
    assert out[0] == "compiled", out
    assert all(line.endswith(".so") for line in out[1:]), out


@pytest.mark.packaging
def test_gbalance_pure_1_make_deb_builds_the_pure_modules_only(tmp_path):
    """The pkg.gbalance.pure profile: no extension module, no cython3 needed."""
    dist = tmp_path / "dist"
    out = run(["sh", "packaging/build-deb.sh"], cwd=ROOT, env=dict(os.environ, DIST_DIR=str(dist), GBALANCE_PURE="1"),
              timeout=600).stdout
    deb = dist / f"gbalance_{VERSION}_{ARCH}.deb"
    assert out.strip().splitlines()[-1] == str(deb)
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    assert not re.search(r"\.(so|pxd|c)$", listing, re.M), listing
    buildinfo = next(dist.glob("*.buildinfo")).read_text()
    assert "pkg.gbalance.pure" in buildinfo, buildinfo     # its Environment: DEB_BUILD_PROFILES


@pytest.mark.packaging
def test_rpm_lists_same_files_with_systemd_scriptlets(built):
    rpm_arch = run(["rpm", "--eval", "%{_arch}"]).stdout.strip()
    rpm = built["dist"] / f"gbalance-{VERSION}-1.{rpm_arch}.rpm"
    files = run(["rpm", "-qlp", str(rpm)]).stdout.split()
    for path in ("/usr/bin/balance", "/usr/share/man/man1/balance.1.gz",
                 "/usr/share/man/es/man1/balance.1.gz", "/etc/balance.conf", "/usr/lib/systemd/system/balance.service",
                 "/usr/lib/systemd/system/balance@.service", "/usr/lib/systemd/system/balance-metrics.timer",
                 "/usr/lib/tmpfiles.d/balance.conf", "/usr/libexec/gbalance/balance-instances",
                 run(["rpm", "--eval", "%{_libdir}/gbalance/gbalance/cli.py"]).stdout.strip()):
        assert path in files, path
    assert not any("init.d" in f for f in files), "no SysV script in the rpm"
    assert not any("site-packages" in f for f in files), "private modules, no python(abi) pin"
    assert "balance = 3.58" in run(["rpm", "-qp", "--provides", str(rpm)]).stdout.splitlines()
    assert "balance < 3.58" in run(["rpm", "-qp", "--conflicts", str(rpm)]).stdout.splitlines()
    assert run(["rpm", "-qp", "--obsoletes", str(rpm)]).stdout.strip() == ""
    spec = (ROOT / "rpm" / "gbalance.spec").read_text()
    assert "Release:        1%{?dist}" in spec and "%{_libexecdir}/gbalance" in spec
    scripts = run(["rpm", "-qp", "--scripts", str(rpm)]).stdout
    assert "systemctl" in scripts and "balance.service" in scripts
    assert re.search(r"posttrans scriptlet.*\n(.*\n)*.*systemctl reload balance.service", scripts), scripts
    assert "%config(noreplace)" in (ROOT / "rpm" / "gbalance.spec").read_text()
    lint = run(["rpmlint", "-c", str(ROOT / "rpm" / "rpmlint.toml"), str(rpm)], check=False, timeout=300)
    assert " 0 errors" in lint.stdout, lint.stdout


@pytest.mark.packaging
def test_installed_by_name_from_the_apt_repository(pkg):
    root = pkg["root"]
    policy = root.run(["apt-cache", "policy", "gbalance"]).stdout
    assert f"Installed: {VERSION}" in policy and "file:/srv/gbalance-repo" in policy
    installed = root.installed()
    assert {"python3-gevent", "python3-greenlet", "python3-docopt"} <= set(installed)
    # The fake C balance was replaced: its package is gone, the path is ours.
    assert "balance" not in installed
    assert "Removing balance" in pkg["install"] or "balance*" in pkg["install"], pkg["install"]
    assert root.run(["/usr/sbin/balance", "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"
    assert root.run(["/usr/bin/balance", "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"
    assert root.run(["dpkg-query", "-S", "/usr/sbin/balance"]).stdout.startswith("gbalance: ")
    assert root.read("/usr/sbin/balance").splitlines()[0] == "#!/usr/bin/python3"
    run_dir = os.stat(root.file("/run/balance"))
    assert run_dir.st_mode & 0o7777 == 0o755 and run_dir.st_uid == 0
    bad = root.run(["/usr/sbin/balance", "-x", "80"], check=False)
    assert bad.returncode == 64 and "unknown option -x" in bad.stderr


def init(root, action: str, check: bool = True) -> subprocess.CompletedProcess:
    return root.run(["/etc/init.d/balance", action], check=check, timeout=120)


@pytest.mark.packaging
def test_init_script_runs_two_instances_from_balance_conf(pkg):
    root = pkg["root"]
    a, b, c = Backend("A"), Backend("B"), Backend("C")
    p1, p2 = free_port(), free_port()
    root.write("/etc/balance.conf", f"# test instances\n-b 127.0.0.1 {p1} {a.spec}\n\n"
                                    f"{p2} {b.spec} ! {c.spec}   # with failover\n")
    try:
        start = init(root, "start")
        pids = [int(x) for x in re.findall(r"started \(pid (\d+)\)", start.stdout)]
        assert len(pids) == 2, start.stdout
        status = init(root, "status", check=False)
        assert status.returncode == 0, status.stdout
        assert f"{p1}.127.0.0.1: running (pid {pids[0]})" in status.stdout
        assert f"{p2}.any: running (pid {pids[1]})" in status.stdout
        wait_port(p1)
        assert read_tag(p1) == "A" and read_tag(p2) == "B"
        assert set(pids) <= set(root.processes())   # the daemons run inside the root

        show = root.run(["/usr/bin/balance", "-c", "show", str(p2)]).stdout
        assert re.search(rf"^\s+0\s+RR\s+0\s+ENA\s+127\.0\.0\.1\s+{b.port}\s", show, re.M), show
        assert root.run(["/usr/bin/balance", "-c", "disable 0", str(p2)]).stdout.strip() == "channel 0 disabled"
        assert read_tag(p2) == "C"
        version = root.run(["/usr/bin/balance", "-b", "127.0.0.1", "-c", "version", str(p1)]).stdout
        assert f"This is balance {VERSION}" in version

        again = init(root, "start")
        assert again.stdout.count("already running") == 2
        stop = init(root, "stop")
        # It says what it waits for, as LSB scripts do, then what stopped.
        for pid in pids:
            assert re.search(rf": stopping \(pid {pid}\); waiting up to 45 s for its open connections to close",
                             stop.stdout), stop.stdout
        assert stop.stdout.count("stopped (pid") == 2
        assert not any(pid_alive(p) for p in pids)
        assert init(root, "status", check=False).returncode == 3
        bogus = init(root, "bogus", check=False)
        assert bogus.returncode == 2 and "|check}" in bogus.stderr
    finally:
        init(root, "stop", check=False)
        for backend in (a, b, c):
            backend.close()


@pytest.mark.packaging
def test_init_script_check_validates_balance_conf_and_starts_nothing(pkg):
    root = pkg["root"]
    p1, p2 = free_port(), free_port()
    state_before = sorted(os.listdir(root.file("/run/balance")))
    root.write("/etc/balance.conf", f"{p1} 127.0.0.1:9\n-b 127.0.0.1 {p2} 127.0.0.1:9 ! 127.0.0.1:10\n")
    good = init(root, "check")
    assert good.stdout.strip() == "balance: /etc/balance.conf: 2 instance(s), every line valid", good.stdout
    root.write("/etc/balance.conf", f"{p1} 127.0.0.1:9\n{p2} --no-such-option\n")
    bad = init(root, "check", check=False)
    assert bad.returncode == 78, bad
    assert "/etc/balance.conf line 2" in bad.stderr and f"{p2} --no-such-option" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    # Nothing was started by either check.
    assert sorted(os.listdir(root.file("/run/balance"))) == state_before
    assert not root.processes()
    assert init(root, "status", check=False).returncode == 3


@contextlib.contextmanager
def init_script_master_with_a_held_link(root):
    """One /etc/balance.conf line (on loopback, to a backend tagged ``A``), started
    by the init script in the root, and a client link held open through it.

    Yields (port, master pid, held socket); stops the instances and the
    backend afterwards.
    """
    a = Backend("A")
    p1 = free_port()
    root.write("/etc/balance.conf", f"-b 127.0.0.1 {p1} {a.spec}\n")
    try:
        old = int(re.search(r"started \(pid (\d+)\)", init(root, "start").stdout).group(1))
        held = socket.create_connection(("127.0.0.1", p1), timeout=10)
        assert read_line(held) == "A"
        yield p1, old, held
    finally:
        init(root, "stop", check=False)
        a.close()


@pytest.mark.packaging
def test_init_script_restart_hands_over_without_refusing_or_cutting(pkg):
    """restart = "balance -r <line>" per line (the -r contract of the stop/restart work).

    A connection held open across the restart keeps working on the old
    master, which exits once it closes; connects during the restart are
    never refused; afterwards the new master answers.
    """
    root = pkg["root"]
    with init_script_master_with_a_held_link(root) as (p1, old, held):
        restart = init(root, "restart")
        m = re.search(rf"{p1}\.127\.0\.0\.1: restarted \(pid (\d+); pid {old} drains", restart.stdout)
        assert m, restart.stdout + restart.stderr
        new = int(m.group(1))
        for _ in range(20):   # never refused
            assert read_tag(p1) == "A"
        held.sendall(b"still here\n")
        assert read_line(held) == "still here"
        assert pid_alive(old)
        held.close()
        assert eventually(lambda: not pid_alive(old), 30) and pid_alive(new)
        assert f"running (pid {new})" in init(root, "status").stdout


GREETER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(b"S\\n")
    c.close()
"""
# systemctl start waits for balance.service (a oneshot), not for the
# instances it wants: the client retries while nothing listens (10 s at most).
GREETING = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
print(c.makefile().readline().strip())
"""


@pytest.mark.packaging
def test_init_script_start_on_a_systemd_host_picks_up_a_new_line(pkg):
    """The seed blog's workflow under systemd: edit /etc/balance.conf, then
    ``/etc/init.d/balance start``; the new line runs without a manual
    ``systemctl daemon-reload``.

    systemd really runs (pid 1 of its own pid and network namespaces in the
    throwaway root); lsb's init-functions hand the action to balance.service,
    whose instances come from the generator, which the init script re-runs
    (daemon-reload) when its units are out of date.
    """
    root = pkg["root"]
    b, p1, p2 = free_port(), free_port(), free_port()
    root.write("/etc/balance.conf", f"-b 127.0.0.1 {p1} 127.0.0.1:{b}\n")
    with root.boot_systemd() as sd:
        sd.run(["systemd-run", "--unit=greeter", "--property=Type=exec", "python3", "-c", GREETER, str(b)])
        first = sd.run(["/etc/init.d/balance", "start"])
        assert "daemon-reload" not in first.stdout, first.stdout   # the boot's generator saw the file
        assert sd.run(["python3", "-c", GREETING, str(p1)]).stdout.strip() == "S"
        root.write("/etc/balance.conf", f"-b 127.0.0.1 {p1} 127.0.0.1:{b}\n-b 127.0.0.1 {p2} 127.0.0.1:{b}\n")
        second = sd.run(["/etc/init.d/balance", "start"])
        assert "/etc/balance.conf changed; systemctl daemon-reload" in second.stdout, second.stdout
        assert sd.run(["python3", "-c", GREETING, str(p2)]).stdout.strip() == "S"
        assert sd.run(["systemctl", "is-active", f"balance@{p2}.127.0.0.1.service"],
                      check=False).stdout.strip() == "active"
        third = sd.run(["/etc/init.d/balance", "start"])   # nothing changed: no reload
        assert "daemon-reload" not in third.stdout, third.stdout
        sd.run(["systemctl", "stop", "balance.service"], timeout=120)
        assert sd.run(["systemctl", "is-active", f"balance@{p2}.127.0.0.1.service"],
                      check=False).stdout.strip() != "active"


@pytest.mark.packaging
def test_installed_man_pages_english_and_spanish(pkg):
    root = pkg["root"]
    assert root.run(["man", "-w", "balance"]).stdout.strip() == "/usr/share/man/man1/balance.1.gz"
    env = {"MANWIDTH": "80", "PAGER": "cat"}

    def plain(text: str) -> str:   # drop the overstrike bold and underline
        return re.sub(r".\x08", "", text)

    en = plain(root.run(["man", "balance"], env=env).stdout)
    assert "NAME" in en and "CONTROL SHELL" in en and "BALANCE_STATE_DIR" in en
    # The locale generated inside the root (the host has none: see host_snapshot).
    assert "es_ES.utf8" in root.run(["locale", "-a"]).stdout.split()
    es_env = dict(env, LANG="es_ES.UTF-8", LC_ALL="es_ES.UTF-8")
    es = root.run(["man", "balance"], env=es_env)
    assert "locale" not in es.stderr, es.stderr
    es = plain(es.stdout)
    assert "NOMBRE" in es and "CONSOLA DE CONTROL" in es and "MONITORIZACIÓN" in es
    assert "NOMBRE" in plain(root.run(["man", "-L", "es", "balance"], env=env).stdout)
    whatis = root.run(["whatis", "balance"]).stdout
    assert whatis.startswith("balance (1)") and "load-balancing TCP proxy" in whatis


@pytest.mark.packaging
def test_installed_systemd_units_verify_and_generator(pkg):
    root = pkg["root"]
    units = "/tmp/units"
    root.run(["mkdir", "-p", units])
    for unit in ("balance.service", "balance@.service", "balance-metrics.service", "balance-metrics.timer"):
        root.run(["cp", f"/lib/systemd/system/{unit}", units])
    root.run(["ln", "-s", "balance@.service", f"{units}/balance@8080.any.service"])
    done = root.run(["systemd-analyze", "verify", f"{units}/balance.service", f"{units}/balance@8080.any.service",
                     f"{units}/balance-metrics.service", f"{units}/balance-metrics.timer"], check=False, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr
    template = root.read("/lib/systemd/system/balance@.service")
    for setting in ("Type=notify", "NotifyAccess=exec", "ExecReload=/usr/lib/gbalance/balance-instances replace %i",
                    "TimeoutStopSec=45", "SyslogIdentifier=balance", "ReloadPropagatedFrom=balance.service",
                    "KillMode=mixed"):
        assert re.search(rf"^{re.escape(setting)}$", template, re.M), setting
    tmpfiles = root.read("/usr/lib/tmpfiles.d/balance.conf")
    assert re.search(r"^d /run/balance 0755 root root -$", tmpfiles, re.M)
    root.write("/etc/balance.conf", "8080 a b\n-b 127.0.0.1 8081 c\n")
    root.run(["/lib/systemd/system-generators/balance-generator", "/tmp/gen", "/tmp/e", "/tmp/l"])
    wants = root.file("/tmp/gen/balance.service.wants")
    assert sorted(p.name for p in wants.iterdir()) == ["balance@8080.any.service", "balance@8081.127.0.0.1.service"]
    assert os.readlink(wants / "balance@8080.any.service") == "/lib/systemd/system/balance@.service"
    assert root.file("/lib/systemd/system/balance@.service").is_file()


@pytest.mark.packaging
def test_pip_install_from_pyproject_alone(tmp_path):
    """README's quick start: "pip install ." in a fresh venv; the metadata is pyproject.toml's,
    setup.py adds only the version and the license expression."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and set(meta["project"]["dynamic"]) == {"version", "license"}
    assert "setuptools" not in meta.get("tool", {})
    assert meta["project"]["scripts"]["balance"] == "gbalance.cli:main"
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "dist", "repo", "*.egg-info",
                                                              "__pycache__", ".pytest_cache", "build"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    run([str(venv / "bin" / "pip"), "install", "-q", str(tree)], timeout=900)
    assert run([str(venv / "bin" / "balance"), "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"
    usage = run([str(venv / "bin" / "balance-instances")], check=False)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: balance-instances")
    show = run([str(venv / "bin" / "pip"), "show", "gbalance"]).stdout
    assert f"Version: {VERSION}" in show and "Requires: docopt, gevent" in show
    # pip show prints License-Expression only from pip 24.1 on: read the metadata itself.
    meta_files = list((venv / "lib").glob("python3*/site-packages/gbalance-*.dist-info/METADATA"))
    assert len(meta_files) == 1 and "License-Expression: GPL-2.0-or-later" in meta_files[0].read_text()


def bumped_tree(where: Path, version: str) -> Path:
    """A copy of the tree that says ``version`` everywhere build-deb.sh checks."""
    tree = where / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "dist", "repo", "*.egg-info",
                                                              "__pycache__", ".pytest_cache", "build"))
    init = tree / "gbalance" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{VERSION}"', f'__version__ = "{version}"'))
    spec = tree / "rpm" / "gbalance.spec"
    spec.write_text(re.sub(r"^Version:(\s+)\S+$", rf"Version:\g<1>{version}", spec.read_text(), flags=re.M))
    for page in ("balance.1", "balance.es.1"):
        p = tree / "man" / page
        p.write_text(p.read_text().replace(f'"gbalance {VERSION}"', f'"gbalance {version}"'))
    changelog = tree / "debian" / "changelog"
    changelog.write_text(f"gbalance ({version}) unstable; urgency=medium\n\n  * Upgrade test build.\n\n"
                         f" -- test <test@example.invalid>  Mon, 30 Nov 2026 12:00:00 +0000\n\n"
                         + changelog.read_text())
    return tree


@pytest.mark.packaging
def test_deb_upgrade_on_a_sysv_host_hands_over_without_cutting(pkg, tmp_path):
    """dpkg -i of a newer .deb: its postinst restarts the init script, which hands over (balance -r).

    The throwaway root's policy-rc.d allows service actions, so the real
    maintainer scripts act.  The connection held across the upgrade keeps
    working on the old master; new connections reach the new one.
    """
    root = pkg["root"]
    version = f"{VERSION}+uptest1"
    tree = bumped_tree(tmp_path, version)
    dist = tmp_path / "dist"
    run(["sh", str(tree / "packaging" / "build-deb.sh")], env=dict(os.environ, DIST_DIR=str(dist)), timeout=600)
    shutil.copy(dist / f"gbalance_{version}_{ARCH}.deb", root.file("/srv/upgrade.deb"))
    with init_script_master_with_a_held_link(root) as (p1, old, held):
        upgrade = root.run(["dpkg", "-i", "/srv/upgrade.deb"])
        out = upgrade.stdout + upgrade.stderr
        assert re.search(rf"{p1}\.127\.0\.0\.1: restarted \(pid \d+; pid {old} drains", out), out
        assert root.run(["dpkg-query", "-W", "-f", "${Version}", "gbalance"]).stdout == version
        assert root.run(["/usr/sbin/balance", "--version"]).stdout.strip() == f"balance {version} (gbalance)"
        held.sendall(b"across the upgrade\n")
        assert read_line(held) == "across the upgrade"
        assert read_tag(p1) == "A"
        new = int(re.search(r"running \(pid (\d+)\)", init(root, "status").stdout).group(1))
        assert new != old and pid_alive(old)
        held.close()
        assert eventually(lambda: not pid_alive(old), 30)


@pytest.mark.packaging
def test_remove_says_what_it_waits_for_and_purge_removes_the_config(pkg):
    """apt remove stops the running proxies through the prerm, saying for which
    master it waits and how long at most; apt purge then removes the conffiles."""
    root = pkg["root"]
    with init_script_master_with_a_held_link(root) as (p1, old, held):
        held.close()
        remove = root.run(["apt-get", "remove", "-y", "-q", "gbalance"])
        assert re.search(rf"balance {p1}\.127\.0\.0\.1: stopping \(pid {old}\); waiting up to 45 s "
                         r"for its open connections to close", remove.stdout), remove.stdout
        assert f"balance {p1}.127.0.0.1: stopped (pid {old})" in remove.stdout
        assert not pid_alive(old)
    assert not root.file("/usr/sbin/balance").exists() and root.file("/etc/balance.conf").exists()
    root.run(["apt-get", "purge", "-y", "-q", "gbalance"])
    assert not root.file("/etc/balance.conf").exists() and not root.file("/etc/init.d/balance").exists()
    assert "gbalance" not in root.installed()


@pytest.mark.packaging
def test_remove_goes_on_when_the_init_scripts_stop_fails(pkg):
    """An admin's init script whose stop fails must not make removal exit 127.

    The prerm's stop calls the error handler dh_installinit names; it was
    defined only in the postinst ("balance_not_all_started: not found").
    """
    root = pkg["root"]
    root.run(["apt-get", "install", "-y", "-q", f"gbalance={VERSION}"], timeout=300)
    script = root.read("/etc/init.d/balance")
    # An edited conffile, as an admin may leave it: stop fails.
    root.write("/etc/init.d/balance", script.replace('case "$1" in\n\tstart|stop|status|restart)',
                                                     'case "$1" in\n\tstop) echo "stop failed" >&2; exit 1 ;;\n'
                                                     '\tstart|status|restart)', 1), mode=0o755)
    assert init(root, "stop", check=False).returncode == 1
    remove = root.run(["apt-get", "remove", "-y", "-q", "gbalance"], check=False)
    said = remove.stdout + remove.stderr   # apt passes the maintainer scripts' stderr on stdout
    assert remove.returncode == 0, said
    assert "stop failed" in said and "not found" not in said and "127" not in said, said
    assert "gbalance: not every proxy of /etc/balance.conf stopped cleanly" in said, said
    assert not root.file("/usr/sbin/balance").exists()
    root.run(["apt-get", "purge", "-y", "-q", "gbalance"])


@pytest.mark.packaging
def test_autopkgtests_pass_with_the_null_runner_in_a_throwaway_root(built, tmp_path):
    """debian/tests (proxy, man in en and es, init script, removal), run by
    autopkgtest itself on the built .deb, in a fresh throwaway root.

    The null runner tests the machine it runs on, which is why it runs
    inside the root; breaks-testbed (the removal test) is allowed there
    because the whole root is thrown away afterwards.
    """
    with create_root() as root:
        src = root.file("/srv/src")
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "dist", "repo", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache", "build"))
        shutil.copy(built["deb"], root.file(f"/srv/{built['deb'].name}"))
        done = root.run(["autopkgtest", "-B", "--ignore-restrictions=breaks-testbed", "-o", "/tmp/autopkgtest-out",
                         f"/srv/{built['deb'].name}", "/srv/src", "--", "null"], check=False, timeout=600)
        summary = root.file("/tmp/autopkgtest-out/summary")
        text = summary.read_text() if summary.exists() else ""
        assert done.returncode == 0, text + done.stdout[-4000:] + done.stderr[-4000:]
        results = dict(line.split()[:2] for line in text.splitlines() if line.strip())
        assert results == {"proxy": "PASS", "man": "PASS", "initscript": "PASS", "removal": "PASS"}, text
        assert root.processes() == []   # every test stopped what it started


@pytest.mark.packaging
def test_host_is_left_as_it_was(pkg, host_before):
    """The last packaging test: after the throwaway roots are gone, the host's
    /etc/balance.conf, dpkg database, installed gbalance (if any), apt
    sources, locales and policy-rc.d are as before, and no balance runs."""
    pkg["root"].close()
    after = host_snapshot()
    for key in host_before:
        assert after[key] == host_before[key], key
