#!/usr/bin/env python3
"""A setup.py for the tools and people that call one; pyproject.toml stays the metadata.

Everything a package index or pip shows (name, description, dependencies,
entry points, URLs) is in pyproject.toml.  This file adds only what needs
code or must work with both setuptools 66 (Debian bookworm's pybuild) and
current setuptools from PyPI, without a deprecation warning from either
(pyproject.toml declares both fields "dynamic"):

* the version, read from gbalance/__init__.py, the one place it is defined;
* the license: an SPDX expression, as ``license_expression`` (PEP 639,
  setuptools 77 and later) or as the older ``license`` text field;

* the optional compiled hot path: the modules listed in
  gbalance/build.py (COMPILED_MODULES) are compiled with Cython (0.29, as
  in Debian bookworm, or later; pure-Python mode, the .py files unchanged)
  when Cython and a C compiler are there and GBALANCE_PURE=1 is not set; a
  module that fails to compile is left out with a warning (an error with
  GBALANCE_REQUIRE_COMPILED=1, as debian/rules sets).  The .py modules
  always ship, so every install runs, compiled or pure (``python3 -m
  gbalance.build`` says which);

plus the stdeb route (``make deb-stdeb``; README, "Packages"):

* ``python3 setup.py --command-packages=stdeb.command bdist_deb`` (or
  ``sdist_dsc``) builds a .deb from stdeb.cfg, in deb_dist/ or the
  ``--dist-dir`` given; the Debian description and homepage are those of
  debian/control, read here, never written;
* ``debianize`` and the ``--debian-dir-only`` mode are refused: they write
  debian/changelog, control and rules over the hand-made debian/ that
  ``make deb`` builds from.
"""
from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

import setuptools
from setuptools import setup

HERE = Path(__file__).resolve().parent
LICENSE = "GPL-2.0-or-later"
# stdeb commands that (re)write ./debian, and the option that makes sdist_dsc do so.
WRITES_DEBIAN_DIR = ("debianize", "--debian-dir-only")
STDEB_LAST_PARAGRAPH = """\
This build of the package (made with stdeb) installs /usr/sbin/balance,
the C balance's path, with a /usr/bin/balance link and the manual page in
English and Spanish, and replaces the balance package.  The init script,
/etc/balance.conf and the systemd units come with the build from the
source's debian/ directory."""


def refuse_debian_dir_writers(argv: list[str]) -> None:
    """Exit 64 with one line when a command would write ./debian."""
    for arg in argv[1:]:
        if arg in WRITES_DEBIAN_DIR or arg.startswith("--debian-dir-only="):
            sys.stderr.write(f"setup.py: '{arg}' would overwrite the hand-made debian/ "
                             "(debian/rules, control, changelog); use 'make deb' for debian/ "
                             "or 'make deb-stdeb' for the stdeb .deb\n")
            raise SystemExit(64)


def version() -> str:
    text = (HERE / "gbalance" / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if not found:
        raise SystemExit("setup.py: no __version__ = \"...\" line in gbalance/__init__.py")
    return found.group(1)


#: Cython directives: annotations are documentation, never C types (a ``str``
#: annotation would refuse a StrEnum, an ``int`` one a bool...); the .pxd
#: files are where types come from.
CYTHON_DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}
#: The oldest Cython that translates the modules (Debian bookworm's cython3 is 0.29.32).
MIN_CYTHON = (0, 29)


def compiled_modules() -> list[str]:
    """gbalance.build.COMPILED_MODULES, read without importing the package."""
    tree = ast.parse((HERE / "gbalance" / "build.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "COMPILED_MODULES":
            return list(ast.literal_eval(node.value))
    raise SystemExit("setup.py: no COMPILED_MODULES in gbalance/build.py")


def extensions() -> list:
    """The Cython extensions to build, or none (pure build).

    With GBALANCE_REQUIRE_COMPILED=1 (debian/rules) a module that cannot be
    compiled fails the build instead of being left pure.
    """
    if os.environ.get("GBALANCE_PURE") == "1":
        return []
    required = os.environ.get("GBALANCE_REQUIRE_COMPILED") == "1"

    def pure(why: str) -> list:
        if required:
            raise SystemExit(f"setup.py: {why} (GBALANCE_REQUIRE_COMPILED=1)")
        sys.stderr.write(f"setup.py: {why}: building the pure-Python modules only\n")
        return []

    try:
        import Cython
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        return pure("no Cython") if required else []
    if tuple(int(n) for n in re.findall(r"\d+", Cython.__version__)[:2]) < MIN_CYTHON:
        return pure(f"Cython {Cython.__version__} is older than {'.'.join(map(str, MIN_CYTHON))}")
    built = []
    for name in compiled_modules():
        ext = Extension(name, [str(Path(*name.split(".")).with_suffix(".py"))], optional=not required)
        try:
            built += cythonize([ext], compiler_directives=CYTHON_DIRECTIVES, build_dir="build/cython",
                               quiet=True)
        except Exception as exc:   # Cython could not translate it: that module stays pure
            if required:
                raise SystemExit(f"setup.py: {name} is not compiled ({type(exc).__name__}: {exc})")
            sys.stderr.write(f"setup.py: {name} is not compiled ({type(exc).__name__}: {exc}); "
                             "its pure-Python module is used\n")
    return built


def license_field() -> dict[str, str]:
    major = int(re.match(r"\d+", setuptools.__version__).group())
    return {"license_expression": LICENSE} if major >= 77 else {"license": LICENSE}


def debian_control_description() -> tuple[str, str, str] | None:
    """(synopsis, extended description, homepage) of the gbalance stanza of debian/control."""
    try:
        text = (HERE / "debian" / "control").read_text(encoding="utf-8")
    except OSError:
        return None
    homepage = re.search(r"^Homepage:\s*(\S+)$", text, re.M)
    stanza = re.search(r"^Package: gbalance\n(?:.+\n)*?Description: (.+)\n((?: .*\n?)*)", text, re.M)
    if not stanza or not homepage:
        return None
    paragraphs = "\n".join(line[1:] for line in stanza.group(2).splitlines()).split("\n.\n")
    # The last paragraph is about the files of the debian/ build (the init
    # script, units, /etc/balance.conf); this one has the command only.
    body = "\n\n".join(paragraphs[:-1] + [STDEB_LAST_PARAGRAPH])
    return stanza.group(1).strip(), body, homepage.group(1)


def stdeb_commands() -> dict[str, type]:
    """stdeb's sdist_dsc with debian/control's description and debhelper compat 13."""
    try:
        from stdeb.command.sdist_dsc import sdist_dsc
    except ImportError:       # stdeb not installed: nothing to adapt
        return {}

    class gbalance_sdist_dsc(sdist_dsc):
        def initialize_options(self) -> None:
            super().initialize_options()
            self.compat = 13    # stdeb's default, 9, is deprecated; the command line still wins

        def get_debinfo(self):
            # PKG-INFO (written by egg_info) keeps pyproject's texts; only
            # the Debian control file gets debian/control's.
            self.run_command("egg_info")
            meta = self.distribution.metadata
            saved = meta.description, meta.long_description, meta.url
            found = debian_control_description()
            if found:
                meta.description, meta.long_description, meta.url = found
            try:
                return super().get_debinfo()
            finally:
                meta.description, meta.long_description, meta.url = saved

    return {"sdist_dsc": gbalance_sdist_dsc}


if __name__ == "__main__":
    refuse_debian_dir_writers(sys.argv)
    cmdclass = stdeb_commands() if any("stdeb" in arg or arg in ("sdist_dsc", "bdist_deb") for arg in sys.argv) else {}
    # The .pxd files are build input (the sdist has them, MANIFEST.in), not installed.
    setup(version=version(), packages=setuptools.find_packages(include=["gbalance", "gbalance.*"]), cmdclass=cmdclass,
          ext_modules=extensions(), exclude_package_data={"": ["*.pxd"]}, **license_field())
