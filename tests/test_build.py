"""gbalance.build and the optional Cython build (setup.py, packaging/gen-pxd.py).

``make test`` runs the suite twice where a compiler is present: all of it
against the compiled modules, then the per-connection files against the
pure ones, with ``GBALANCE_EXPECT`` saying which build must be loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Backend, free_port, read_tag
from test_e2e_workers import start_workers

import gbalance
from gbalance import build

ROOT = Path(__file__).resolve().parent.parent
GEN_PXD = ROOT / "packaging" / "gen-pxd.py"


def loaded_extensions(pid: int) -> set[str]:
    """The gbalance extension modules mapped into process ``pid``."""
    pkg = os.path.dirname(os.path.abspath(gbalance.__file__))
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if pkg in line and line.rstrip().endswith(".so")}


def test_this_process_runs_the_build_make_test_asked_for():
    kind = build.kind()
    assert kind != "partly compiled", [m for m in build.COMPILED_MODULES if not build.is_compiled(m)]
    expect = os.environ.get("GBALANCE_EXPECT")
    if expect:
        assert kind == expect


def test_python_m_gbalance_build_names_the_build_and_each_file():
    r = subprocess.run([sys.executable, "-m", "gbalance.build"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == build.kind()
    assert len(lines) == 1 + len(build.COMPILED_MODULES)
    for name, line in zip(build.COMPILED_MODULES, lines[1:]):
        assert line.startswith(f"  {name}: ")
        assert line.endswith(".py") != build.is_compiled(name)


def test_a_worker_loads_the_same_build_as_its_master(balance):
    """Workers run ``python -I``: they must still find the compiled modules."""
    backend = Backend("W")
    try:
        port = free_port()
        proc, workers = start_workers(balance, 2, str(port), backend.spec, port=port)
        assert read_tag(port) == "W"
        for worker in workers:
            mapped = loaded_extensions(worker)
            if build.kind() == "compiled":
                assert {Path(p).name.split(".")[0] for p in mapped} == {m.rsplit(".", 1)[1] for m in
                                                                        build.COMPILED_MODULES}
            else:
                assert mapped == set()
    finally:
        backend.close()


def record_classes(module: str) -> dict[str, type]:
    """The dataclasses and NamedTuples a listed module defines or exports."""
    mod = importlib.import_module(module)
    return {name: obj for name, obj in vars(mod).items() if isinstance(obj, type) and
            (dataclasses.is_dataclass(obj) or (issubclass(obj, tuple) and hasattr(obj, "_fields")))}


def record_fields(cls: type) -> tuple[str, ...]:
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return cls._fields


def test_no_compiled_module_defines_a_dataclass_or_namedtuple():
    """Cython 0.29 (bookworm's, make deb) makes no class __annotations__:
    such a class compiled there has no fields.  They live in records.py."""
    for module in build.COMPILED_MODULES:
        tree = ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                marks = [ast.unparse(d) for d in node.decorator_list + node.bases]
                assert not [m for m in marks if "dataclass" in m or "NamedTuple" in m or "TypedDict" in m], \
                    (module, node.name, marks)


#: The record classes the compiled modules use, with their fields.
RECORDS = {
    "gbalance.proxy.connect": {"Connected": ("sock", "group", "channel", "client_watcher", "server_watcher",
                                             "early", "reset", "sent")},
    "gbalance.proxy.proxyproto": {"Received": ("length", "version", "source", "dest")},
    "gbalance.proxy.stagger": {"StaggerRule": ("ceiling", "floor")},
    "gbalance.table.channels": {"Step": ("to", "suspect"),
                                "Fired": ("before", "after", "changed", "suspect_set", "suspect_cleared"),
                                "CheckOutcome": ("count", "changed", "unsuspected", "counting")},
    "gbalance.system.limits": {"FdLimit": ("before", "after", "hard"),
                               "ConnLimit": ("conns", "pipes", "nofile", "overcommitted")},
}


def check_records() -> dict[str, dict[str, tuple[str, ...]]]:
    """What :data:`RECORDS` says, as this process's build has it."""
    return {m: {n: record_fields(c) for n, c in record_classes(m).items()} for m in RECORDS}


def test_every_record_class_of_the_compiled_modules_has_its_fields():
    """In both runs of make test (compiled with Cython 3, then pure)."""
    assert check_records() == RECORDS
    for module in build.COMPILED_MODULES:
        for name, cls in record_classes(module).items():
            assert record_fields(cls), (module, name)


def _gen_pxd_tree(tmp_path: Path) -> Path:
    """A copy of gen-pxd.py and the modules it reads, to change safely."""
    (tmp_path / "packaging").mkdir()
    shutil.copy(GEN_PXD, tmp_path / "packaging")
    for f in (ROOT / "gbalance").rglob("*.p*"):
        if f.suffix in (".py", ".pxd"):
            dest = tmp_path / f.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    return tmp_path


def test_the_pxd_files_match_the_classes_slots():
    r = subprocess.run([sys.executable, str(GEN_PXD), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_changed_slot_makes_the_pxd_check_fail_until_regenerated(tmp_path):
    root = _gen_pxd_tree(tmp_path)
    fwd = root / "gbalance" / "proxy" / "forward.py"
    text = fwd.read_text()
    assert '__slots__ = ("link", ' in text
    fwd.write_text(text.replace('__slots__ = ("link", ', '__slots__ = ("link", "extra", ', 1))
    script = str(root / "packaging" / "gen-pxd.py")
    r = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "gbalance/proxy/forward.pxd" in r.stderr
    assert subprocess.run([sys.executable, script], timeout=60).returncode == 0
    assert "    cdef public object extra\n" in (root / "gbalance" / "proxy" / "forward.pxd").read_text()
    assert subprocess.run([sys.executable, script, "--check"], timeout=60).returncode == 0


def _setup(tmp_path: Path, *args: str, pure: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GBALANCE_PURE"}
    if pure:
        env["GBALANCE_PURE"] = "1"
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.so", "__pycache__",
                                                             "*.egg-info", "bench", "tests"))
    return subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=src, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.packaging
def test_gbalance_pure_1_builds_only_the_pure_modules(tmp_path):
    lib = tmp_path / "lib"
    r = _setup(tmp_path, "build", "--build-lib", str(lib), pure=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(lib.rglob("*.so")) == []
    assert list(lib.rglob("*.pxd")) == []      # build input, never installed
    assert (lib / "gbalance" / "proxy" / "forward.py").is_file()


@pytest.mark.packaging
def test_with_cython_every_listed_module_is_compiled_and_the_py_files_still_ship(tmp_path):
    import Cython  # noqa: F401  (make packaging and make test install it: make cython)
    lib = tmp_path / "lib"
    r = _setup(tmp_path, "build", "--build-lib", str(lib), pure=False)
    assert r.returncode == 0, r.stderr[-2000:]
    for module in build.COMPILED_MODULES:
        path = lib.joinpath(*module.split("."))
        assert path.with_suffix(".py").is_file(), module
        assert list(path.parent.glob(path.name + ".*.so")), module
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(lib)!r}); "
                          "from gbalance.build import kind; print(kind())"], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "compiled", out.stderr


@pytest.mark.packaging
def test_the_sdist_carries_the_pxd_files_so_it_can_build_compiled(tmp_path):
    import tarfile

    r = _setup(tmp_path, "sdist", "-d", str(tmp_path / "sdist"), pure=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (archive,) = (tmp_path / "sdist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    pxds = {str(p.relative_to(ROOT)) for p in (ROOT / "gbalance").rglob("*.pxd")}
    assert pxds and pxds <= names
    assert "packaging/gen-pxd.py" in names and "gbalance/build.py" in names
    assert not [n for n in names if n.endswith((".so", ".c"))]


@pytest.mark.packaging
def test_debians_cython_0_29_compiles_every_module_with_its_record_fields(tmp_path):
    """bookworm's cython3 (what make deb builds with), GBALANCE_REQUIRE_COMPILED=1:
    every listed module translates and compiles, and the record classes keep
    their fields when the compiled modules are loaded."""
    debian_python = "/usr/bin/python3"
    version = subprocess.run([debian_python, "-c", "import Cython; print(Cython.__version__)"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, "make deps installs Debian's cython3"
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.so", "__pycache__",
                                                             "*.egg-info", "bench"))
    env = {k: v for k, v in os.environ.items() if k != "GBALANCE_PURE"}
    env.update(GBALANCE_REQUIRE_COMPILED="1", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    r = subprocess.run([debian_python, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    check = ("import sys, json; sys.path[:0] = ['tests', '.']; import test_build; "
             "from gbalance import build; print(json.dumps([build.kind(), test_build.check_records()]))")
    out = subprocess.run([sys.executable, "-c", check], cwd=src, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    kind, records = json.loads(out.stdout)
    assert kind == "compiled", version.stdout
    assert records == {m: {n: list(f) for n, f in fields.items()} for m, fields in RECORDS.items()}
