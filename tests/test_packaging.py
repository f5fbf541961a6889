"""The OS packages: one version, the instance helper, the .deb, .rpm and apt repo.

The first tests are fast and need no root: they check that the version is
defined once, and run the instance helper (shared by the init script and
the systemd units) from the tree against a private config file and state
directory.  The tests marked ``packaging`` build the real .deb, .rpm and a
flat apt repository, ``apt install gbalance`` from it (dependencies from
Debian), drive the installed init script against loopback backends, read
the installed man pages, and purge everything again: packages the install
pulled in, the apt source, /etc/balance.conf (restored if one existed) and
the Spanish locale if the test had to create it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, Backend, free_port, pid_alive, read_tag, wait_port

HELPER = ROOT / "etc" / "balance-instances"
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


# -- the instance helper, from the tree ------------------------------------------

def helper_env(tmp_path: Path, conf_text: str) -> dict:
    conf = tmp_path / "balance.conf"
    conf.write_text(conf_text)
    return dict(os.environ, BALANCE_CONF=str(conf), BALANCE_STATE_DIR=str(tmp_path / "state"),
                BALANCE_BIN=str(Path(sys.executable).parent / "balance"), PYTHONUNBUFFERED="1")


def helper(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run([sys.executable, str(HELPER), *args], env=env, timeout=timeout, check=False, cwd=ROOT)


def test_helper_reads_one_instance_per_line(tmp_path):
    env = helper_env(tmp_path, "\n".join([
        "# a comment",
        "",
        "   # indented comment",
        "8080 web1:80 web2:80 ! backup:80   # trailing comment",
        "-b 127.0.0.1 -m 'connect:interval=10' 8080 app1 % app2",
        "-6 smtp mail1 mail2",
        "8080 other",                    # same port and address as line 4
        "-f 9000 host",                   # -f is the init system's business
        "-c show 9001",                   # not a proxy
        "70000 host",                     # bad port
        "-x 9002 host",                   # unknown option
        "9003 'unterminated",
    ]) + "\n")
    done = helper(env, "list")
    assert done.returncode == 0
    assert done.stdout.splitlines() == [
        "4 8080.any 8080 web1:80 web2:80 '!' backup:80",
        "5 8080.127.0.0.1 -b 127.0.0.1 -m connect:interval=10 8080 app1 % app2",
        "6 25.any -6 smtp mail1 mail2",
    ]
    err = done.stderr
    for line, why in ((7, "already used on line 4"), (8, "-f is not allowed"), (9, "do not start a proxy"),
                      (10, "invalid port [70000]"), (11, "not a valid balance command line"),
                      (12, "No closing quotation")):
        assert re.search(rf"line {line}: .*{re.escape(why)}", err), (line, err)
    assert "Traceback" not in err


def test_generator_wants_one_template_instance_per_line(tmp_path):
    env = helper_env(tmp_path, "8080 a b\n-b ::1 8080 c\n# 9090 off\nbogus line\n")
    out = tmp_path / "gen"
    done = helper(env, "generate", str(out), str(tmp_path / "early"), str(tmp_path / "late"))
    assert done.returncode == 0, done.stderr
    wants = out / "balance.service.wants"
    links = sorted(p.name for p in wants.iterdir())
    assert links == ["balance@8080.::1.service", "balance@8080.any.service"]
    assert os.readlink(wants / links[0]) == "/lib/systemd/system/balance@.service"
    assert "line 4" in done.stderr


def test_helper_start_status_stop_exactly_its_instances(tmp_path, backends, balance):
    """Two good lines, one that fails at start, one invalid: the good ones run.

    ``stop`` ends exactly the instances of the file (found by the pid in
    their state files) and leaves another balance master alone.
    """
    a, b = backends("A"), backends("B")
    p1, p2, p3 = free_port(), free_port(), free_port()
    env = helper_env(tmp_path, f"-b 127.0.0.1 {p1} {a.spec}\n{p2} {b.spec}\n"
                               f"{p3} no-such-host.invalid\n-x 1 2\n")
    balance.state_dir = tmp_path / "state"
    balance.env["BALANCE_STATE_DIR"] = str(tmp_path / "state")
    other_port = free_port()
    other = balance.start(str(other_port), a.spec, port=other_port)
    try:
        done = helper(env, "start")
        assert done.returncode == 1
        assert f"{p3}.any: " in done.stderr and "line 3: failed (exit 65)" in done.stderr
        assert "line 4: not a valid balance command line" in done.stderr
        pids = [int(m) for m in re.findall(r"started \(pid (\d+)\)", done.stdout)]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        assert read_tag(p1) == "A" and read_tag(p2) == "B"

        again = helper(env, "start")
        assert f"{p1}.127.0.0.1: already running (pid {pids[0]})" in again.stdout
        assert f"{p2}.any: already running (pid {pids[1]})" in again.stdout

        status = helper(env, "status")
        assert status.returncode == 3, status.stdout   # line 3 does not run
        assert f"{p1}.127.0.0.1: running (pid {pids[0]})" in status.stdout
        assert f"{p3}.any: not running" in status.stdout

        stop = helper(env, "stop")
        assert stop.returncode == 0
        assert stop.stdout.count("stopped (pid") == 2
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in pids)
        assert other.p.poll() is None and read_tag(other_port) == "A"

        status = helper(env, "status")
        assert status.returncode == 3 and status.stdout.count("not running") == 3
        assert helper(env, "stop").stdout.strip() == "balance: no instance was running"
    finally:
        helper(env, "stop")


def test_helper_status_without_instances_or_file(tmp_path):
    env = helper_env(tmp_path, "# nothing\n")
    done = helper(env, "status")
    assert done.returncode == 3 and "no instances configured" in done.stdout
    env["BALANCE_CONF"] = str(tmp_path / "missing.conf")
    done = helper(env, "status")
    assert done.returncode == 4
    assert done.stderr.startswith("balance: cannot read ") and "Traceback" not in done.stderr


def test_init_script_is_lsb_and_valid_sh():
    script = (ROOT / "etc" / "init.d" / "balance").read_text()
    for field in ("Provides:", "Required-Start:", "Required-Stop:", "Default-Start:", "Default-Stop:",
                  "Short-Description:"):
        assert re.search(rf"^# {field}\s+\S", script, re.M), field
    for action in ("start", "stop", "restart", "force-reload", "status"):
        assert re.search(rf"(^|[\s|]){action}[|)]", script, re.M), action
    run(["sh", "-n", str(ROOT / "etc" / "init.d" / "balance")])
    assert os.access(ROOT / "etc" / "init.d" / "balance", os.X_OK) and os.access(HELPER, os.X_OK)


# -- the real packages ------------------------------------------------------------

def installed_packages() -> set[str]:
    out = run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\n"]).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("ii")}


def has_locale(name: str) -> bool:
    return name in run(["locale", "-a"]).stdout.split()


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
    try:
        source.write_text(sources_line + "\n")
        run(["apt-get", "update", "-qq"], env=APT_ENV, timeout=600)
        run(["apt-get", "install", "-y", "-q", "gbalance"], env=APT_ENV, timeout=900)
        if made_locale:
            run(["localedef", "-i", "es_ES", "-c", "-f", "UTF-8", "es_ES.UTF-8"], check=False)
        yield {"dist": dist, "repo": repo, "sources": sources_line, "pulled": installed_packages() - before}
    finally:
        if Path("/etc/init.d/balance").exists():
            run(["/etc/init.d/balance", "stop"], check=False)
        run(["apt-get", "purge", "-y", "-q", "gbalance"], env=APT_ENV, check=False, timeout=300)
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
    for path in ("./usr/bin/balance", "./usr/share/man/man1/balance.1.gz", "./usr/share/man/es/man1/balance.1.gz",
                 "./etc/init.d/balance", "./etc/balance.conf", "./lib/systemd/system/balance.service",
                 "./lib/systemd/system/balance@.service", "./lib/systemd/system-generators/balance-generator",
                 "./usr/lib/gbalance/balance-instances", "./usr/share/doc/gbalance/copyright",
                 "./usr/lib/python3/dist-packages/gbalance/cli.py"):
        assert path in listing, path
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
    for path in ("/usr/bin/balance", "/usr/share/man/man1/balance.1.gz", "/usr/share/man/es/man1/balance.1.gz",
                 "/etc/balance.conf", "/usr/lib/systemd/system/balance.service",
                 "/usr/lib/systemd/system/balance@.service", "/usr/lib/gbalance/balance-instances"):
        assert path in files, path
    assert any(f.endswith("/init.d/balance") for f in files)
    assert any(re.search(r"/site-packages/gbalance/cli\.py$", f) for f in files)
    scripts = run(["rpm", "-qp", "--scripts", str(rpm)]).stdout
    assert "systemctl" in scripts and "balance.service" in scripts
    assert "%config(noreplace)" in (ROOT / "rpm" / "gbalance.spec").read_text()
    lint = run(["rpmlint", "-c", str(ROOT / "rpm" / "rpmlint.toml"), str(rpm)], check=False, timeout=300)
    assert " 0 errors" in lint.stdout, lint.stdout


@pytest.mark.packaging
def test_installed_by_name_from_the_apt_repository(pkg):
    policy = run(["apt-cache", "policy", "gbalance"]).stdout
    assert f"Installed: {VERSION}" in policy and f"file:{pkg['repo']}" in policy
    assert {"python3-gevent", "python3-greenlet", "python3-docopt"} <= installed_packages()
    assert run(["/usr/bin/balance", "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"
    assert run(["head", "-1", "/usr/bin/balance"]).stdout.strip() == "#!/usr/bin/python3"
    bad = run(["/usr/bin/balance", "-x", "80"], check=False)
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
        restart = run(["/etc/init.d/balance", "restart"])
        new_pids = [int(x) for x in re.findall(r"started \(pid (\d+)\)", restart.stdout)]
        assert len(new_pids) == 2 and not set(new_pids) & set(pids)
        assert read_tag(p2) == "B"   # a fresh master: channel 0 enabled again

        stop = run(["/etc/init.d/balance", "stop"])
        assert stop.stdout.count("stopped (pid") == 2
        assert not any(pid_alive(p) for p in pids + new_pids)
        assert run(["/etc/init.d/balance", "status"], check=False).returncode == 3
        assert run(["/etc/init.d/balance", "bogus"], check=False).returncode == 2
    finally:
        run(["/etc/init.d/balance", "stop"], check=False)
        for backend in (a, b, c):
            backend.close()


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
    shutil.copy("/lib/systemd/system/balance.service", units)
    shutil.copy("/lib/systemd/system/balance@.service", units)
    (units / "balance@8080.any.service").symlink_to("balance@.service")
    done = run(["systemd-analyze", "verify", str(units / "balance.service"),
                str(units / "balance@8080.any.service")], check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    Path("/etc/balance.conf").write_text("8080 a b\n-b 127.0.0.1 8081 c\n")
    gen = tmp_path / "gen"
    run(["/lib/systemd/system-generators/balance-generator", str(gen), str(tmp_path / "e"), str(tmp_path / "l")])
    assert sorted(p.name for p in (gen / "balance.service.wants").iterdir()) == [
        "balance@8080.any.service", "balance@8081.127.0.0.1.service"]
