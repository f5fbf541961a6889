"""Where gbalance spends its time under the short-connection load.

py-spy (installed into the venv from PyPI when missing) samples the running
proxy from outside while wrk drives ``Connection: close`` requests through
it; the collapsed stacks are folded into self and inclusive time per
function.  Idle samples (the hub waiting in epoll) are left out by py-spy,
so percentages are of the time the proxy was busy.
"""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from pathlib import Path

from lib import LOAD_CPU, PYTHON, ROOT, BenchError, GBalance, pin
from measure import _wrk

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
