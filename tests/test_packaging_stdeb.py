"""The stdeb route (``make deb-stdeb``): setup.py + stdeb.cfg -> the same gbalance .deb.

The .deb is built once per module by packaging/build-stdeb.sh (stdeb's
``sdist_dsc`` + ``bdist_deb`` in a temporary copy of the tree).  It must
leave the checkout's debian/ as it was, carry debian/control's relations,
homepage, maintainer and synopsis, have the /usr/sbin layout and both man
pages of the debian/ build, pass lintian without an error or warning
(pedantic), and its build log must show no build-backend warning.  Then it
is installed with apt in a throwaway root (tests/throwaway_root.py: the
host's /etc, /usr and dpkg database are never touched) over a stand-in for
the C balance package, which it must replace; there it proxies to a
loopback backend, answers ``-c`` and ``-i``, and shows both man pages.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, Backend, free_port, read_tag, wait_port
from test_packaging_build import backend_warnings

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "gbalance" / "__init__.py").read_text()).group(1)
REVISION = re.search(r"^Debian-Version:\s*(\S+)", (ROOT / "stdeb.cfg").read_text(), re.M).group(1)
DEB = f"gbalance_{VERSION}-{REVISION}_all.deb"

pytestmark = pytest.mark.packaging


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def tree_digest() -> dict[str, str]:
    """sha256 of every file under debian/, and which build leftovers the checkout has."""
    files = {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((ROOT / "debian").rglob("*")) if p.is_file()}
    files["leftovers"] = " ".join(sorted(p.name for p in ROOT.iterdir()
                                         if p.name in ("deb_dist", "build") or p.name.endswith((".egg-info", ".tar.gz"))))
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    dist = tmp_path_factory.mktemp("stdeb") / "dist"
    before = tree_digest()
    out = run(["sh", "packaging/build-stdeb.sh"], cwd=ROOT, env=dict(os.environ, DIST_DIR=str(dist)), timeout=900)
    assert out.stdout.strip().splitlines()[-1] == str(dist / DEB)
    return {"dist": dist, "deb": dist / DEB, "before": before, "after": tree_digest()}


def control_field(text: str, name: str) -> str:
    """A field of a control stanza (continuation lines joined)."""
    m = re.search(rf"^{name}:[ \t]*(.*(?:\n[ \t].*)*)", text, re.M)
    assert m, (name, text)
    return m.group(1)


def relations(value: str) -> set[str]:
    return {r.strip() for r in value.replace("\n", " ").split(",") if r.strip()}


def test_stdeb_build_leaves_the_checkout_and_its_debian_dir_alone(built):
    assert built["after"] == built["before"]


def test_stdeb_deb_has_debian_controls_relations_homepage_and_description(built):
    info = run(["dpkg-deb", "-f", str(built["deb"])]).stdout
    source = (ROOT / "debian" / "control").read_text()
    binary = source[source.index("\nPackage: gbalance\n"):]
    assert control_field(info, "Package") == "gbalance"
    assert control_field(info, "Version") == f"{VERSION}-{REVISION}"
    assert control_field(info, "Architecture") == "all"
    for field in ("Maintainer", "Section", "Homepage"):
        assert control_field(info, field) == control_field(source, field), field
    assert control_field(info, "Homepage").startswith("https://")
    for field in ("Conflicts", "Replaces", "Provides"):
        assert relations(control_field(info, field)) == relations(control_field(binary, field)), field
    wanted = {r for r in relations(control_field(binary, "Depends")) if not r.startswith("${")}
    got = relations(control_field(info, "Depends"))
    assert wanted <= got and "python3:any (>= 3.11~)" in got, got
    synopsis, *body = control_field(info, "Description").splitlines()
    assert synopsis == control_field(binary, "Description").splitlines()[0]
    assert body and all(line.startswith(" ") and not line.startswith("  ") for line in body), body
    text = "\n".join(body)
    assert "None" not in info and "UNKNOWN" not in info
    assert "made with stdeb" in text and "/usr/sbin/balance" in text


def test_stdeb_deb_layout_is_the_debian_dir_one(built):
    listing = run(["dpkg-deb", "-c", str(built["deb"])]).stdout
    for path in ("./usr/sbin/balance", "./usr/bin/balance -> ../sbin/balance", "./usr/share/man/man1/balance.1.gz",
                 "./usr/share/man/es/man1/balance.1.gz", "./usr/share/doc/gbalance/copyright",
                 "./usr/lib/python3/dist-packages/gbalance/cli.py",
                 "./usr/lib/python3/dist-packages/gbalance/process/worker.py"):
        assert path in listing, path
    assert "balance-instances" not in listing          # no init script or units to call it
    assert re.search(r"^-rwxr-xr-x root/root .* \./usr/sbin/balance$", listing, re.M)
    unpacked = Path(run(["mktemp", "-d"]).stdout.strip())
    try:
        run(["dpkg-deb", "-x", str(built["deb"]), str(unpacked)])
        assert (unpacked / "usr/sbin/balance").read_text().splitlines()[0] == "#!/usr/bin/python3"
        copyright_ = (unpacked / "usr/share/doc/gbalance/copyright").read_text()
        assert copyright_ == (ROOT / "debian" / "copyright").read_text()
    finally:
        run(["rm", "-rf", str(unpacked)])


def test_stdeb_deb_is_lintian_clean(built):
    lint = run(["lintian", "--pedantic", "-I", "--fail-on", "error,warning", str(built["deb"])], check=False,
               timeout=600)
    tags = [line for line in lint.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert lint.returncode == 0 and not tags, lint.stdout + lint.stderr


def test_stdeb_build_log_has_no_build_backend_warning(built):
    log = (built["dist"] / "gbalance-stdeb-build.log").read_text()
    assert "dpkg-buildpackage: info: binary-only upload" in log
    assert backend_warnings(log) == [], "\n".join(backend_warnings(log))


def fake_c_balance(where: Path) -> Path:
    """A package named balance that owns /usr/sbin/balance, as distributions ship the C one."""
    pkg = where / "balance-pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/sbin").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: balance\nVersion: 3.57-1\nArchitecture: all\n"
                                        "Maintainer: test <test@example.invalid>\nDescription: stand-in C balance\n")
    tool = pkg / "usr/sbin/balance"
    tool.write_text("#!/bin/sh\necho 'this is the C balance'\n")
    tool.chmod(0o755)
    deb = where / "balance_3.57-1_all.deb"
    run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)])
    return deb


def test_stdeb_deb_installs_with_apt_replaces_c_balance_and_proxies(built, tmp_path):
    from throwaway_root import create_root

    fake = fake_c_balance(tmp_path)
    with create_root() as root:
        root.write("/tmp/balance_3.57-1_all.deb", fake.read_bytes())
        root.run(["dpkg", "-i", "/tmp/balance_3.57-1_all.deb"])
        assert root.run(["/usr/sbin/balance"]).stdout == "this is the C balance\n"
        install = root.install_debs([built["deb"]], "gbalance")
        installed = root.installed()
        assert installed.get("gbalance") == f"{VERSION}-{REVISION}" and "balance" not in installed, install.stdout
        assert {"python3-gevent", "python3-docopt", "python3-greenlet"} <= set(installed)
        assert root.run(["dpkg-query", "-S", "/usr/sbin/balance"]).stdout.startswith("gbalance: ")
        for cmd in ("/usr/sbin/balance", "/usr/bin/balance", "balance"):
            assert root.run([cmd, "--version"]).stdout.strip() == f"balance {VERSION} (gbalance)"

        a, b = Backend("A"), Backend("B")
        port = free_port()
        try:
            # Detaches (the C balance's default); state in the root's /run.
            root.run(["balance", "-b", "127.0.0.1", str(port), a.spec, b.spec])
            wait_port(port)
            assert sorted(read_tag(port) for _ in range(4)) == ["A", "A", "B", "B"]
            show = root.run(["balance", "-b", "127.0.0.1", "-c", "show", str(port)]).stdout
            assert re.search(rf"^\s+0\s+RR\s+\d+\s+ENA\s+127\.0\.0\.1\s+{a.port}\s", show, re.M), show
            assert root.run(["balance", "-b", "127.0.0.1", "-c", "disable 0", str(port)]).stdout.strip() \
                == "channel 0 disabled"
            assert read_tag(port) == "B"
            shell = root.run(["balance", "-b", "127.0.0.1", "-i", str(port)], input="version\nquit\n")
            assert f"This is balance {VERSION}" in shell.stdout, shell.stdout + shell.stderr
        finally:
            a.close()
            b.close()

        def page(*args: str, lang: str = "C.UTF-8") -> str:
            out = root.run(["man", *args, "balance"], env={"MANWIDTH": "80", "PAGER": "cat", "LANG": lang,
                                                          "LC_ALL": lang}).stdout
            return re.sub(r".\x08", "", out)

        assert root.run(["man", "-w", "balance"]).stdout.strip() == "/usr/share/man/man1/balance.1.gz"
        assert "CONTROL SHELL" in page()
        assert "CONSOLA DE CONTROL" in page("-L", "es")
