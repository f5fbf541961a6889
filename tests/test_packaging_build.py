"""The Python build: pyproject.toml + the setup.py shim, with old and new setuptools.

The wheel is built twice from a copy of the tree: by pip with its isolated
build environment, which takes the newest setuptools from PyPI, and by
Debian bookworm's own setuptools 66 the way pybuild runs it (``python3 -m
build --no-isolation``, ``make deb``).  Neither build may print a
deprecation or any other warning category of the build backend (the
license form that the newest setuptools wants, an SPDX string, is an error
for setuptools 66; see setup.py).  Both wheels carry the version of
gbalance/__init__.py and the license.  The fast tests check the shim
itself: it refuses the stdeb commands that write debian/, with one line
and exit 64, and leaves the tree as it was.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "gbalance" / "__init__.py").read_text()).group(1)
SYSTEM_PYTHON = "/usr/bin/python3"
# Python warning categories as the backend prints them ("...Warning: text"),
# and setuptools' boxed notices ("WARNING `project.license` ...") - not the
# lowercase "warning: build_py: byte-compiling is disabled" of
# $PYTHONDONTWRITEBYTECODE.
BACKEND_WARNING = re.compile(r"Deprecat|SetuptoolsWarning|BuildBackendWarning|_BetaConfiguration|\w+Warning:|^WARNING ",
                             re.M)
IGNORE = shutil.ignore_patterns(".git", ".venv", "dist", "deb_dist", "repo", "*.egg-info", "__pycache__",
                                ".pytest_cache", "build")


def run(cmd: list[str], timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def tree_copy(where: Path) -> Path:
    tree = where / "tree"
    shutil.copytree(ROOT, tree, ignore=IGNORE)
    return tree


def metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(f"gbalance-{VERSION}.dist-info/METADATA").decode()


def backend_warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if BACKEND_WARNING.search(line)]


# -- the shim -------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--command-packages=stdeb.command", "debianize"],
    ["debianize"],
    ["--command-packages=stdeb.command", "sdist_dsc", "--debian-dir-only"],
])
def test_shim_refuses_commands_that_write_debian_dir(tmp_path, argv):
    tree = tree_copy(tmp_path)
    before = {p.name: p.read_bytes() for p in (tree / "debian").iterdir() if p.is_file()}
    done = run([sys.executable, "setup.py", *argv], cwd=tree, check=False)
    assert done.returncode == 64, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup.py: ") and "debian/" in lines[0], done.stderr
    assert "make deb-stdeb" in lines[0] and "Traceback" not in done.stderr
    after = {p.name: p.read_bytes() for p in (tree / "debian").iterdir() if p.is_file()}
    assert after == before
    assert not (tree / "deb_dist").exists() and not list(tree.glob("*.egg-info"))


def test_shim_gives_the_version_of_the_package(tmp_path):
    tree = tree_copy(tmp_path)
    assert run([sys.executable, "setup.py", "--version"], cwd=tree).stdout.strip() == VERSION


def test_pyproject_leaves_license_and_version_to_setup_py():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert set(project["dynamic"]) == {"version", "license"}
    assert "license" not in project and "license-files" not in project
    assert not any(c.startswith("License ::") for c in project["classifiers"])
    # [tool.setuptools] makes setuptools 66 warn that it is "beta".
    assert "setuptools" not in meta.get("tool", {})
    assert project["urls"]["Homepage"].startswith("https://")


# -- two real builds ---------------------------------------------------------------

@pytest.mark.packaging
def test_wheel_builds_without_warnings_with_newest_setuptools(tmp_path):
    """pip's isolated build (``pip wheel .``) with the newest setuptools on PyPI."""
    tree = tree_copy(tmp_path)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    out = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_NO_BUILD_ISOLATION", "PYTHONPATH")}
    done = run([str(venv / "bin" / "pip"), "wheel", "-v", "--no-deps", "--no-cache-dir", "-w", str(out), str(tree)],
               env=env, timeout=900)
    log = done.stdout + done.stderr
    used = re.findall(r"Successfully installed setuptools-(\d+)\.", log)
    assert used and int(used[-1]) >= 77, "the isolated build did not take a current setuptools:\n" + log[-3000:]
    assert backend_warnings(log) == [], "\n".join(backend_warnings(log))
    meta = metadata(out / f"gbalance-{VERSION}-py3-none-any.whl")
    assert f"\nVersion: {VERSION}\n" in meta
    assert "\nLicense-Expression: GPL-2.0-or-later\n" in meta and "\nLicense-File: COPYING\n" in meta
    assert "Classifier: License" not in meta


@pytest.mark.packaging
def test_wheel_builds_without_warnings_with_bookworms_setuptools(tmp_path):
    """Debian's setuptools 66, as pybuild's pyproject plugin runs it for ``make deb``."""
    if not Path(SYSTEM_PYTHON).exists():
        pytest.fail(f"{SYSTEM_PYTHON} (Debian's python3) is missing")
    tree = tree_copy(tmp_path)
    probe = run([SYSTEM_PYTHON, "-c", "import setuptools, build; print(setuptools.__version__)"], check=False)
    assert probe.returncode == 0, "needs Debian's python3-setuptools and python3-build (make deps)"
    out = tmp_path / "wheels"
    env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    env.pop("PYTHONPATH", None)
    done = run([SYSTEM_PYTHON, "-m", "build", "--skip-dependency-check", "--no-isolation", "--wheel",
                "--outdir", str(out), "."], cwd=tree, env=env)
    log = done.stdout + done.stderr
    assert backend_warnings(log) == [], "\n".join(backend_warnings(log))
    # Compiled with Debian's cython3 (make deps installs it, as make deb needs): a cp311 wheel.
    (wheel,) = out.glob(f"gbalance-{VERSION}-cp3*-linux_*.whl")
    meta = metadata(wheel)
    assert f"\nVersion: {VERSION}\n" in meta
    assert "\nLicense: GPL-2.0-or-later\n" in meta and "Classifier: License" not in meta
    assert probe.stdout.strip().split(".")[0] == "66", probe.stdout


def test_setup_py_sdist_has_man_pages_and_no_debian_dir(tmp_path):
    """``python3 setup.py sdist`` (stdeb's first step) ships what the packages install, not debian/."""
    import tarfile

    tree = tree_copy(tmp_path)
    out = tmp_path / "sdist"
    done = run([SYSTEM_PYTHON, "setup.py", "-q", "sdist", "-d", str(out)], cwd=tree,
               env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin"))
    assert backend_warnings(done.stdout + done.stderr) == []
    with tarfile.open(out / f"gbalance-{VERSION}.tar.gz") as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for wanted in ("setup.py", "pyproject.toml", "COPYING", "README", "NEWS", "man/balance.1", "man/balance.es.1",
                   "packaging/stdeb-layout.sh", "gbalance/cli.py", "gbalance/process/worker.py", "PKG-INFO"):
        assert wanted in names, wanted
    assert not [n for n in names if n.startswith(("debian", "tests/", ".git"))], sorted(names)


def test_stdeb_build_refuses_version_drift(tmp_path):
    """A man page that names another version stops build-stdeb.sh before stdeb runs."""
    tree = tree_copy(tmp_path)
    page = tree / "man" / "balance.es.1"
    page.write_text(page.read_text().replace(f'"gbalance {VERSION}"', '"gbalance 9.9.9"', 1))
    done = run(["sh", str(tree / "packaging" / "build-stdeb.sh")], check=False,
               env=dict(os.environ, DIST_DIR=str(tmp_path / "dist")))
    assert done.returncode == 1 and "version drift" in done.stderr and "man/balance.es.1" in done.stderr, done.stderr
    assert not (tmp_path / "dist").exists()
