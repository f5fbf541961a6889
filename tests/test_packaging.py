"""The OS packages: one version, the .deb, the .rpm, the apt repo, pip.

The first tests are fast and need no root: the version is defined once,
and the init script is LSB and valid sh (the instance helper it calls is
tested in test_instances.py).  The tests marked ``packaging`` build the
real .deb, .rpm and a flat apt repository, install a stand-in for the C
balance package and then ``apt install gbalance`` over it (it must replace
it), check the relations (dpkg -I, rpm -qp), lintian, rpmlint and
systemd-analyze, drive the installed init script against loopback
backends (start, status, stop; restart and a .deb upgrade hand every
instance over with ``balance -r``), read the installed man pages, install
from pyproject.toml alone with pip in a fresh venv, and purge everything
again: packages the install pulled in, the apt source, /etc/balance.conf
(restored if one existed) and the Spanish locale if the test had to create
it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, Backend, eventually, free_port, pid_alive, read_line, read_tag, wait_port

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "gbalance" / "__init__.py").read_text()).group(1)
APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")


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


# -- the real packages ------------------------------------------------------------

def installed_packages() -> set[str]:
    out = run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\n"]).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("ii")}


def has_locale(name: str) -> bool:
    return name in run(["locale", "-a"]).stdout.split()


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
    os.chmod(where, 0o755)
    return out


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    """Build .deb, .rpm and apt repo; apt install gbalance; undo it all after."""
    if os.geteuid() != 0:
        pytest.fail("the packaging tests install a .deb and need root (CI runs them as root)")
    if "gbalance" in installed_packages():
        pytest.fail("gbalance is already installed on this machine; purge it first")
    dist = tmp_path_factory.mktemp("pkg") / "dist"
    # apt reads the repository as its unprivileged _apt user: pytest's temp
    # directories are private, so the repository gets a world-readable one.
    repo_parent = Path(tempfile.mkdtemp(prefix="gbalance-test-"))
    os.chmod(repo_parent, 0o755)
    repo = repo_parent / "repo"
    env = dict(os.environ, DIST_DIR=str(dist), REPO_DIR=str(repo))
    run(["sh", "packaging/build-deb.sh"], cwd=ROOT, env=env, timeout=600)
    run(["sh", "packaging/build-rpm.sh"], cwd=ROOT, env=env, timeout=600)
    sources_line = run(["sh", "packaging/build-apt-repo.sh"], cwd=ROOT, env=env).stdout.strip().splitlines()[-1]
    assert sources_line == f"deb [trusted=yes] file:{repo} ./"

    conf = Path("/etc/balance.conf")
    saved_conf = conf.read_bytes() if conf.exists() else None
    had_run_dir = Path("/run/balance").exists()
    before = installed_packages()
    source = Path(f"/etc/apt/sources.list.d/gbalance-test-{os.getpid()}.list")
    made_locale = not has_locale("es_ES.utf8")
    fake = build_fake_balance(Path(tempfile.mkdtemp(prefix="gbalance-fake-")))
    try:
        source.write_text(sources_line + "\n")
        run(["apt-get", "update", "-qq"], env=APT_ENV, timeout=600)
        # The C balance's package, as every distribution lays it out.
        run(["dpkg", "-i", str(fake)], env=APT_ENV)
        assert "balance" in installed_packages()
        install = run(["apt-get", "install", "-y", "-q", "gbalance"], env=APT_ENV, timeout=900)
        if made_locale:
            run(["localedef", "-i", "es_ES", "-c", "-f", "UTF-8", "es_ES.UTF-8"], check=False)
        yield {"dist": dist, "repo": repo, "sources": sources_line, "pulled": installed_packages() - before,
               "install": install.stdout}
    finally:
        if Path("/etc/init.d/balance").exists():
            run(["/etc/init.d/balance", "stop"], check=False)
        run(["apt-get", "purge", "-y", "-q", "gbalance"], env=APT_ENV, check=False, timeout=300)
        run(["dpkg", "--purge", "balance"], env=APT_ENV, check=False)
        shutil.rmtree(fake.parent, ignore_errors=True)
        extra = sorted(installed_packages() - before)
        if extra:
            run(["apt-get", "purge", "-y", "-q", *extra], env=APT_ENV, check=False, timeout=300)
        source.unlink(missing_ok=True)
        mangled = str(repo).strip("/").replace("/", "_")
        for f in Path("/var/lib/apt/lists").glob(f"*{mangled}*"):
            f.unlink(missing_ok=True)
        if saved_conf is not None:
            conf.write_bytes(saved_conf)
        if not had_run_dir:
            shutil.rmtree("/run/balance", ignore_errors=True)
        shutil.rmtree(repo_parent, ignore_errors=True)
        if made_locale and has_locale("es_ES.utf8"):
            run(["localedef", "--delete-from-archive", "es_ES.utf8"], check=False)


@pytest.mark.packaging
def test_deb_installs_everything_and_is_lintian_clean(pkg):
    deb = pkg["dist"] / f"gbalance_{VERSION}_all.deb"
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    for path in ("./usr/sbin/balance", "./usr/bin/balance -> ../sbin/balance", "./usr/share/man/man1/balance.1.gz",
                 "./usr/share/man/es/man1/balance.1.gz", "./etc/init.d/balance", "./etc/balance.conf",
                 "./lib/systemd/system/balance.service", "./lib/systemd/system/balance@.service",
                 "./lib/systemd/system/balance-metrics.service", "./lib/systemd/system/balance-metrics.timer",
                 "./lib/systemd/system-generators/balance-generator", "./usr/lib/tmpfiles.d/balance.conf",
                 "./usr/lib/gbalance/balance-instances", "./usr/share/doc/gbalance/copyright",
                 "./usr/share/doc/gbalance/examples/gbalance.conf.example",
                 "./usr/lib/python3/dist-packages/gbalance/cli.py",
                 "./usr/lib/python3/dist-packages/gbalance/instances.py"):
        assert path in listing, path
    info = run(["dpkg", "-I", str(deb)]).stdout
    for relation in (" Provides: balance\n", " Conflicts: balance\n", " Replaces: balance\n",
                     " Homepage: https://"):
        assert relation in info, relation
    control = (ROOT / "debian" / "control").read_text()
    assert "pybuild-plugin-pyproject" in control and "Standards-Version: 4.6.2" in control
    conffiles = run(["dpkg-query", "--control-show", "gbalance", "conffiles"]).stdout
    assert "/etc/balance.conf" in conffiles and "/etc/init.d/balance" in conffiles
    depends = run(["dpkg-query", "-W", "-f", "${Depends}", "gbalance"]).stdout
    assert "python3-gevent" in depends and "python3-docopt" in depends
    lint = run(["lintian", "--fail-on", "error,warning", str(deb)], check=False, timeout=600)
    tags = [line for line in lint.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert lint.returncode == 0 and not tags, lint.stdout + lint.stderr


@pytest.mark.packaging
def test_rpm_lists_same_files_with_systemd_scriptlets(pkg):
    rpm = pkg["dist"] / f"gbalance-{VERSION}-1.noarch.rpm"
    files = run(["rpm", "-qlp", str(rpm)]).stdout.split()
    for path in ("/usr/sbin/balance", "/usr/bin/balance", "/usr/share/man/man1/balance.1.gz",
                 "/usr/share/man/es/man1/balance.1.gz", "/etc/balance.conf", "/usr/lib/systemd/system/balance.service",
                 "/usr/lib/systemd/system/balance@.service", "/usr/lib/systemd/system/balance-metrics.timer",
                 "/usr/lib/tmpfiles.d/balance.conf", "/usr/lib/gbalance/balance-instances"):
        assert path in files, path
    assert not any("init.d" in f for f in files), "no SysV script in the rpm"
    assert "balance = 3.58" in run(["rpm", "-qp", "--provides", str(rpm)]).stdout.splitlines()
    assert "balance < 3.58" in run(["rpm", "-qp", "--conflicts", str(rpm)]).stdout.splitlines()
    assert "balance < 3.58" in run(["rpm", "-qp", "--obsoletes", str(rpm)]).stdout.splitlines()
    spec = (ROOT / "rpm" / "gbalance.spec").read_text()
    assert "Release:        1%{?dist}" in spec and "%pyproject_wheel" in spec and "%pyproject_install" in spec
    assert any(re.search(r"/site-packages/gbalance/cli\.py$", f) for f in files)
    scripts = run(["rpm", "-qp", "--scripts", str(rpm)]).stdout
    assert "systemctl" in scripts and "balance.service" in scripts
    assert re.search(r"posttrans scriptlet.*\n(.*\n)*.*systemctl reload balance.service", scripts), scripts
    assert "%config(noreplace)" in (ROOT / "rpm" / "gbalance.spec").read_text()
    lint = run(["rpmlint", "-c", str(ROOT / "rpm" / "rpmlint.toml"), str(rpm)], check=False, timeout=300)
    assert " 0 errors" in lint.stdout, lint.stdout


@pytest.mark.packaging
def test_installed_by_name_from_the_apt_repository(pkg):
    policy = run(["apt-cache", "policy", "gbalance"]).stdout
    assert f"Installed: {VERSION}" in policy and f"file:{pkg['repo']}" in policy
    assert {"python3-gevent", "python3-greenlet", "python3-docopt"} <= installed_packages()
    # The fake C balance was replaced: its package is gone, the path is ours.
    assert "balance" not in installed_packages()
    assert "Removing balance" in pkg["install"] or "balance*" in pkg["install"], pkg["install"]
    assert run(["/usr/sbin/balance", "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"
    assert run(["/usr/bin/balance", "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"
    assert run(["dpkg-query", "-S", "/usr/sbin/balance"]).stdout.startswith("gbalance: ")
    assert run(["head", "-1", "/usr/sbin/balance"]).stdout.strip() == "#!/usr/bin/python3"
    assert os.stat("/run/balance").st_mode & 0o7777 == 0o755 and os.stat("/run/balance").st_uid == 0
    bad = run(["/usr/sbin/balance", "-x", "80"], check=False)
    assert bad.returncode == 64 and "unknown option -x" in bad.stderr


@pytest.mark.packaging
def test_init_script_runs_two_instances_from_balance_conf(pkg):
    a, b, c = Backend("A"), Backend("B"), Backend("C")
    p1, p2 = free_port(), free_port()
    Path("/etc/balance.conf").write_text(f"# test instances\n-b 127.0.0.1 {p1} {a.spec}\n\n"
                                         f"{p2} {b.spec} ! {c.spec}   # with failover\n")
    try:
        start = run(["/etc/init.d/balance", "start"])
        pids = [int(x) for x in re.findall(r"started \(pid (\d+)\)", start.stdout)]
        assert len(pids) == 2, start.stdout
        status = run(["/etc/init.d/balance", "status"], check=False)
        assert status.returncode == 0, status.stdout
        assert f"{p1}.127.0.0.1: running (pid {pids[0]})" in status.stdout
        assert f"{p2}.any: running (pid {pids[1]})" in status.stdout
        wait_port(p1)
        assert read_tag(p1) == "A" and read_tag(p2) == "B"

        show = run(["/usr/bin/balance", "-c", "show", str(p2)]).stdout
        assert re.search(rf"^\s+0\s+RR\s+0\s+ENA\s+127\.0\.0\.1\s+{b.port}\s", show, re.M), show
        assert run(["/usr/bin/balance", "-c", "disable 0", str(p2)]).stdout.strip() == "channel 0 disabled"
        assert read_tag(p2) == "C"
        version = run(["/usr/bin/balance", "-b", "127.0.0.1", "-c", "version", str(p1)]).stdout
        assert f"This is balance {VERSION}" in version

        again = run(["/etc/init.d/balance", "start"])
        assert again.stdout.count("already running") == 2
        stop = run(["/etc/init.d/balance", "stop"])
        assert stop.stdout.count("stopped (pid") == 2
        assert not any(pid_alive(p) for p in pids)
        assert run(["/etc/init.d/balance", "status"], check=False).returncode == 3
        assert run(["/etc/init.d/balance", "bogus"], check=False).returncode == 2
    finally:
        run(["/etc/init.d/balance", "stop"], check=False)
        for backend in (a, b, c):
            backend.close()


@contextlib.contextmanager
def init_script_master_with_a_held_link():
    """One /etc/balance.conf line (on loopback, to a backend tagged ``A``), started
    by the installed init script, and a client link held open through it.

    Yields (port, master pid, held socket); stops the instances and the
    backend afterwards.
    """
    a = Backend("A")
    p1 = free_port()
    Path("/etc/balance.conf").write_text(f"-b 127.0.0.1 {p1} {a.spec}\n")
    try:
        old = int(re.search(r"started \(pid (\d+)\)", run(["/etc/init.d/balance", "start"]).stdout).group(1))
        held = socket.create_connection(("127.0.0.1", p1), timeout=10)
        assert read_line(held) == "A"
        yield p1, old, held
    finally:
        run(["/etc/init.d/balance", "stop"], check=False)
        a.close()


@pytest.mark.packaging
def test_init_script_restart_hands_over_without_refusing_or_cutting(pkg):
    """restart = "balance -r <line>" per line (the -r contract of the stop/restart work).

    A connection held open across the restart keeps working on the old
    master, which exits once it closes; connects during the restart are
    never refused; afterwards the new master answers.
    """
    with init_script_master_with_a_held_link() as (p1, old, held):
        restart = run(["/etc/init.d/balance", "restart"], timeout=60)
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
        status = run(["/etc/init.d/balance", "status"])
        assert f"running (pid {new})" in status.stdout


@pytest.mark.packaging
def test_installed_man_pages_english_and_spanish(pkg):
    assert run(["man", "-w", "balance"]).stdout.strip() == "/usr/share/man/man1/balance.1.gz"
    env = dict(os.environ, MANWIDTH="80", PAGER="cat")

    def plain(text: str) -> str:   # drop the overstrike bold and underline
        return re.sub(r".\x08", "", text)

    en = plain(run(["man", "balance"], env=dict(env, LANG="C.UTF-8", LC_ALL="C.UTF-8")).stdout)
    assert "NAME" in en and "CONTROL SHELL" in en and "BALANCE_STATE_DIR" in en
    es = plain(run(["man", "balance"], env=dict(env, LANG="es_ES.UTF-8", LC_ALL="es_ES.UTF-8")).stdout)
    assert "NOMBRE" in es and "CONSOLA DE CONTROL" in es and "MONITORIZACIÓN" in es
    whatis = run(["whatis", "balance"], env=dict(env, LANG="C.UTF-8", LC_ALL="C.UTF-8")).stdout
    assert whatis.startswith("balance (1)") and "load-balancing TCP proxy" in whatis


@pytest.mark.packaging
def test_installed_systemd_units_verify_and_generator(pkg, tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    for unit in ("balance.service", "balance@.service", "balance-metrics.service", "balance-metrics.timer"):
        shutil.copy(f"/lib/systemd/system/{unit}", units)
    (units / "balance@8080.any.service").symlink_to("balance@.service")
    done = run(["systemd-analyze", "verify", str(units / "balance.service"), str(units / "balance@8080.any.service"),
                str(units / "balance-metrics.service"), str(units / "balance-metrics.timer")],
               check=False, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr
    template = (units / "balance@.service").read_text()
    for setting in ("Type=notify", "NotifyAccess=exec", "ExecReload=/usr/lib/gbalance/balance-instances replace %i",
                    "TimeoutStopSec=45", "SyslogIdentifier=balance", "ReloadPropagatedFrom=balance.service",
                    "KillMode=mixed"):
        assert re.search(rf"^{re.escape(setting)}$", template, re.M), setting
    tmpfiles = Path("/usr/lib/tmpfiles.d/balance.conf").read_text()
    assert re.search(r"^d /run/balance 0755 root root -$", tmpfiles, re.M)
    Path("/etc/balance.conf").write_text("8080 a b\n-b 127.0.0.1 8081 c\n")
    gen = tmp_path / "gen"
    run(["/lib/systemd/system-generators/balance-generator", str(gen), str(tmp_path / "e"), str(tmp_path / "l")])
    assert sorted(p.name for p in (gen / "balance.service.wants").iterdir()) == [
        "balance@8080.any.service", "balance@8081.127.0.0.1.service"]
    target = os.readlink(gen / "balance.service.wants" / "balance@8080.any.service")
    assert target == "/lib/systemd/system/balance@.service" and os.path.exists(target)


@pytest.mark.packaging
def test_pip_install_from_pyproject_alone(tmp_path):
    """README's quick start: "pip install ." in a fresh venv, from a tree with no setup.py."""
    assert not (ROOT / "setup.py").exists() and not (ROOT / "setup.cfg").exists()
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gbalance.__version__"}
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
    assert "License: GPL-2.0-or-later" in show


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

    This container's policy-rc.d forbids service actions; the upgrade runs in
    a private mount namespace with an allowing one bound over it (the host's
    file is untouched).  The connection held across the upgrade keeps
    working on the old master; new connections reach the new one.
    """
    version = f"{VERSION}+uptest1"
    tree = bumped_tree(tmp_path, version)
    dist = tmp_path / "dist"
    run(["sh", str(tree / "packaging" / "build-deb.sh")], env=dict(os.environ, DIST_DIR=str(dist)), timeout=600)
    deb = dist / f"gbalance_{version}_all.deb"
    allow = tmp_path / "policy-rc.d"
    allow.write_text("#!/bin/sh\nexit 0\n")
    allow.chmod(0o755)
    with init_script_master_with_a_held_link() as (p1, old, held):
        upgrade = run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                       'mount --bind "$0" /usr/sbin/policy-rc.d && exec dpkg -i "$1"', str(allow), str(deb)],
                      env=APT_ENV, timeout=300)
        out = upgrade.stdout + upgrade.stderr
        assert re.search(rf"{p1}\.127\.0\.0\.1: restarted \(pid \d+; pid {old} drains", out), out
        assert run(["dpkg-query", "-W", "-f", "${Version}", "gbalance"]).stdout == version
        assert run(["/usr/sbin/balance", "--version"]).stdout.strip() == f"balance {version} (gbalance)"
        held.sendall(b"across the upgrade\n")
        assert read_line(held) == "across the upgrade"
        assert read_tag(p1) == "A"
        status = run(["/etc/init.d/balance", "status"]).stdout
        new = int(re.search(r"running \(pid (\d+)\)", status).group(1))
        assert new != old and pid_alive(old)
        held.close()
        assert eventually(lambda: not pid_alive(old), 30)
