"""Where gbalance spends its time under the short-connection load.

py-spy (installed into the venv from PyPI when missing) samples the running
proxy from outside while wrk drives ``Connection: close`` requests through
it; the collapsed stacks are folded into self and inclusive time per
function.  Idle samples (the hub waiting in epoll) are left out by py-spy,
so percentages are of the time the proxy was busy.

py-spy sees Python frames only: with the compiled build (the default) the
hot path has none, so every sample lands in the hub.  The native profile
(``perf record`` on the proxy's process, no call graphs) covers both
builds and HAProxy: each sample's shared object and symbol, folded into
the kernel, the CPython interpreter, the C library, gbalance's compiled
modules, gevent and libev, HAProxy's own code and the rest, and priced in
microseconds per connection from the CPU the proxy used over the same run.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from lib import LOAD_CPU, PYTHON, ROOT, BenchError, GBalance, HAProxy, Proxy, pin, tree_cpu_seconds
from measure import _wrk, wrk_run

PYSPY = ROOT / ".venv" / "bin" / "py-spy"
RATE = 200


def ensure_pyspy() -> Path:
    """py-spy in the venv, installed with pip when missing."""
    if not PYSPY.exists():
        res = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "py-spy"], capture_output=True,
                             text=True, timeout=300)
        if res.returncode != 0 or not PYSPY.exists():
            raise BenchError("py-spy could not be installed: " + (res.stderr.strip().splitlines() or ["?"])[-1])
    return PYSPY


def profile(work: Path, nginx_port: int, seconds: float, log) -> dict:
    """Sample gbalance for ``seconds`` under wrk; top functions by self and total."""
    spy = ensure_pyspy()
    raw = work / "profile.txt"
    with GBalance(work, nginx_port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/100b"
        _wrk(url, 1)
        rate: dict = {}
        load = threading.Thread(target=lambda: rate.setdefault("rps", _safe_wrk(url, seconds + 2)), daemon=True)
        load.start()
        cmd = pin(LOAD_CPU) + [str(spy), "record", "--pid", str(proxy.pid), "--duration", str(int(seconds)),
                               "--rate", str(RATE), "--format", "raw", "--nonblocking",
                               "-o", str(raw)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        load.join(seconds + 40)
    if res.returncode != 0 or not raw.exists():
        raise BenchError("py-spy failed: " + ((res.stderr or res.stdout).strip().splitlines() or ["?"])[-1])
    result = fold(raw.read_text())
    result["rps_while_sampled"] = rate.get("rps")
    result["busy_fraction"] = result["samples"] / (RATE * seconds) if seconds else None
    return result


def _safe_wrk(url: str, seconds: float) -> float | None:
    try:
        return _wrk(url, seconds)
    except BenchError:
        return None


def fold(text: str, top: int = 20) -> dict:
    """Self and inclusive sample shares per function from collapsed stacks."""
    self_c: Counter = Counter()
    line_c: Counter = Counter()
    incl_c: Counter = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        lined = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")
                 and not f.startswith("thread ")]
        if not lined:
            continue
        frames = [_no_line(f) for f in lined]
        total += n
        self_c[frames[-1]] += n
        line_c[lined[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    pct = (lambda c: round(100.0 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "self": [(f, pct(c)) for f, c in self_c.most_common(top)],
        "self_lines": [(f, pct(c)) for f, c in line_c.most_common(top)],
        "inclusive": [(f, pct(c)) for f, c in incl_c.most_common(top)],
    }


def _no_line(frame: str) -> str:
    """``func (pkg/file.py:12)`` -> ``func (pkg/file.py)``."""
    head, sep, line = frame.rpartition(":")
    return head + ")" if sep and line.rstrip(")").isdigit() else frame


def _short(frame: str) -> str:
    """``func (/long/path/pkg/file.py)`` -> ``func (pkg/file.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    return f"{name} ({'/'.join(parts[-2:])})" if where else name


# -- native profile (perf) -------------------------------------------------------------

#: Sampling frequency of ``perf record`` (Hz, per CPU the proxy runs on).
PERF_HZ = 999
#: Groups of the native profile, in print order.
GROUPS = ("kernel", "CPython", "libc", "gbalance compiled", "gevent/libev", "HAProxy", "other")


def compiled_build() -> bool:
    """Whether the venv's gbalance runs its compiled hot path."""
    res = subprocess.run([PYTHON, "-m", "gbalance.build"], capture_output=True, text=True, timeout=60, cwd="/")
    return res.returncode == 0 and res.stdout.splitlines()[:1] == ["compiled"]


def _own_modules() -> set[str]:
    """Stems of gbalance's compiled modules (``forward`` for forward.cpython-311-….so)."""
    return {p.name.split(".", 1)[0] for p in (ROOT / "gbalance").rglob("*.so")} | \
        {p.stem for p in (ROOT / "gbalance").rglob("*.pxd")}


def group_of(dso: str, own: set[str]) -> str:
    """Which part of the process a shared object is."""
    name = dso.strip().rsplit("/", 1)[-1]
    if name.startswith("[kernel") or name in ("[vdso]", "[vsyscall]"):
        return "kernel"
    if name.startswith("libpython") or name in ("python3", "python3.11", "python"):
        return "CPython"
    if name.startswith(("libc.so", "libc-", "ld-linux", "libpthread", "libm.so")):
        return "libc"
    if name == "haproxy":
        return "HAProxy"
    stem = name.split(".", 1)[0]
    if ".cpython-" in name and stem in own:
        return "gbalance compiled"
    if stem in ("corecext", "_corecext", "_greenlet", "libev") or stem.startswith("_gevent_c") or "gevent" in name:
        return "gevent/libev"
    return "other"


def fold_perf(text: str, own: set[str], top: int = 20) -> dict:
    """Shares by group and the top symbols from ``perf report -t '|' --sort dso,sym``."""
    groups: Counter = Counter()
    symbols: list[tuple[str, float]] = []
    for line in text.splitlines():
        if line.startswith("#") or line.count("|") < 2:
            continue
        pct, dso, sym = (f.strip() for f in line.split("|", 2))
        try:
            share = float(pct.rstrip("%"))
        except ValueError:
            continue
        groups[group_of(dso, own)] += share
        symbols.append((f"{sym.split('] ', 1)[-1]} ({dso.rsplit('/', 1)[-1]})", share))
    total = sum(groups.values())
    scale = 100.0 / total if total else 0.0
    symbols.sort(key=lambda x: -x[1])
    return {"groups": {g: round(groups[g] * scale, 1) for g in GROUPS},
            "symbols": [(name, round(share * scale, 2)) for name, share in symbols[:top]]}


def native_profile(work: Path, nginx_port: int, seconds: float, log, compiled: bool) -> dict:
    """perf's samples of gbalance (no -w) and of HAProxy (1 thread) under the
    same wrk load: shares and µs per connection by part of the process."""
    if shutil.which("perf") is None:
        raise BenchError("perf is not installed (linux-perf)")
    own = _own_modules()
    out: dict = {"compiled": compiled}
    for name, cls in (("gbalance", GBalance), ("haproxy", HAProxy)):
        log(f"profile: perf on {name} under wrk ...")
        out[name] = _perf_one(cls(work, nginx_port), work / f"perf-{name}.data", seconds, own)
    return out


def _perf_one(proxy: Proxy, data: Path, seconds: float, own: set[str]) -> dict:
    with proxy:
        url = f"http://127.0.0.1:{proxy.port}/100b"
        _wrk(url, 1)
        got: dict = {}

        def load() -> None:
            try:
                got["rate"], got["requests"] = wrk_run(url, seconds + 1)
            except BenchError as exc:
                got["error"] = str(exc)

        cpu0 = tree_cpu_seconds(proxy.pid)
        t = threading.Thread(target=load, daemon=True)
        t.start()
        time.sleep(0.5)
        rec = subprocess.run(pin(LOAD_CPU) + ["perf", "record", "-q", "-F", str(PERF_HZ), "-p", str(proxy.pid),
                                              "-o", str(data), "--", "sleep", str(seconds)],
                             capture_output=True, text=True, timeout=seconds + 60)
        t.join(seconds + 40)
        cpu1 = tree_cpu_seconds(proxy.pid)
    if rec.returncode != 0 or not data.exists():
        raise BenchError("perf record failed: " + ((rec.stderr or rec.stdout).strip().splitlines() or ["?"])[-1])
    if "error" in got or not got.get("requests"):
        raise BenchError("wrk failed under perf: " + got.get("error", "no requests"))
    rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym",
                          "-t", "|"], capture_output=True, text=True, timeout=300)
    if rep.returncode != 0:
        raise BenchError("perf report failed: " + (rep.stderr.strip().splitlines() or ["?"])[-1])
    out = fold_perf(rep.stdout, own)
    out["cpu_us_per_conn"] = 1e6 * (cpu1 - cpu0) / got["requests"]
    out["rate"] = got["rate"]
    out["us_per_conn"] = {g: round(out["cpu_us_per_conn"] * pct / 100.0, 1) for g, pct in out["groups"].items()}
    return out
