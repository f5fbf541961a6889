#!/usr/bin/env python3
"""Pure vs compiled (Cython) hot path: what each proxied short connection costs.

Builds the package twice into a temporary directory with setup.py (once
with GBALANCE_PURE=1, once with Cython), then for each build:

* **instructions**: ``balance -f PORT nginx`` (one process) runs under
  ``valgrind --tool=callgrind``; after 200 warm-up connections the counters
  are zeroed, N short connections (``GET /100b``, ``Connection: close``,
  one after the other) are made, the counters dumped: user-space
  instructions per connection, independent of other load on the machine;
* **CPU**: the same without valgrind, pinned to CPU 0 (client and nginx on
  CPU 1): utime and stime of the process per connection, from /proc,
  interleaved runs, medians.  Noisy when the machine is shared.

Usage: bench/compiled.py [--conns N] [--runs R] [--build-python PY]
``--build-python /usr/bin/python3`` compiles with that interpreter's Cython
(Debian bookworm's cython3 0.29, what ``make deb`` ships) instead of the
venv's; the result names the Cython version either way.
Writes bench/results/compiled.json and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib import (LOAD_CPU, PROXY_CPU, PYTHON, ROOT, BenchError, Workdir, cpus_available,  # noqa: E402
                 free_port, pin, start_nginx, stop, wait_listening)

REQUEST = b"GET /100b HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
_HZ = os.sysconf("SC_CLK_TCK")


def connections(port: int, n: int) -> None:
    """``n`` short connections, one after the other, each reply checked."""
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(REQUEST)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        if not got.endswith(b"a" * 99 + b"\n"):
            raise BenchError(f"wrong reply through the proxy: {got[-60:]!r}")


def build(work: Path, kind: str, python: str = PYTHON) -> Path:
    """The package built by setup.py (run by ``python``) into work/kind; checks it is the build asked for."""
    lib = work / kind
    env = {k: v for k, v in os.environ.items() if k != "GBALANCE_PURE"}
    if kind == "pure":
        env["GBALANCE_PURE"] = "1"
    # A copy of the tree: setup.py keeps Cython's .c files in build/cython,
    # which another Cython's build must not reuse.
    src = work / f"src-{kind}"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.so", "__pycache__",
                                                             "*.egg-info", "bench", "tests", "repo", "rpmbuild"))
    r = subprocess.run([python, "setup.py", "-q", "build", "--build-base", str(work / f"build-{kind}"),
                        "--build-lib", str(lib)], cwd=src, env=env, capture_output=True, text=True)
    if r.returncode:
        raise BenchError(f"setup.py build ({kind}) failed: {r.stderr.strip()[-300:]}")
    got = subprocess.run([PYTHON, "-I", "-c", f"import sys; sys.path.insert(0, {str(lib)!r}); "
                          "from gbalance.build import kind; print(kind())"],
                         capture_output=True, text=True).stdout.strip()
    if got != kind:
        raise BenchError(f"the {kind} build loads as {got!r} (is Cython installed? make cython)")
    return lib


def proxy_cmd(port: int, backend: int) -> list[str]:
    return [PYTHON, "-m", "gbalance", "-f", str(port), f"127.0.0.1:{backend}"]


def proxy_env(lib: Path, state: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(lib), BALANCE_STATE_DIR=str(state))


def instructions(work: Path, lib: Path, backend: int, n: int) -> float:
    """User-space instructions per connection (callgrind Ir), after a warm-up."""
    out = work / f"cg-{lib.name}"
    port = free_port()
    state = work / f"state-cg-{lib.name}"
    state.mkdir(exist_ok=True)
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *proxy_cmd(port, backend)],
                         env=proxy_env(lib, state), cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, p, timeout=180)
        connections(port, 200)
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True, capture_output=True)
        connections(port, n)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True, capture_output=True)
    finally:
        stop(p, grace=60)
    for dump in glob.glob(f"{out}.{p.pid}.*"):
        text = Path(dump).read_text(errors="replace")
        if "Trigger: dump" in text:
            return int(re.search(r"^summary: (\d+)", text, re.M).group(1)) / n
    raise BenchError("callgrind wrote no dump")


def cpu(work: Path, lib: Path, backend: int, n: int, run: int) -> tuple[float, float]:
    """(user, system) CPU µs per connection of the pinned proxy."""
    port = free_port()
    state = work / f"state-{lib.name}-{run}"
    state.mkdir()
    p = subprocess.Popen(pin(PROXY_CPU) + proxy_cmd(port, backend), env=proxy_env(lib, state), cwd=work,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, p)
        connections(port, 300)

        def sample() -> tuple[int, int]:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]), int(fields[12])
        u0, s0 = sample()
        connections(port, n)
        u1, s1 = sample()
    finally:
        stop(p)
    return 1e6 * (u1 - u0) / _HZ / n, 1e6 * (s1 - s0) / _HZ / n


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=1000, help="connections per measurement (default 1000)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved CPU runs per build (default 3)")
    ap.add_argument("--build-python", default=PYTHON,
                    help="interpreter whose Cython compiles the compiled build (default: the venv's)")
    args = ap.parse_args(argv)
    if cpus_available():
        os.sched_setaffinity(0, {LOAD_CPU})
    work = Workdir()
    nginx = None
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "conns": args.conns, "runs": args.runs,
                    "loadavg_start": os.getloadavg()[0]}
    try:
        libs = {kind: build(work.path, kind, PYTHON if kind == "pure" else args.build_python)
                for kind in ("pure", "compiled")}
        result["cython"] = subprocess.run([args.build_python, "-c", "import Cython; print(Cython.__version__)"],
                                          capture_output=True, text=True).stdout.strip()
        nginx, backend = start_nginx(work.path)
        for kind, lib in libs.items():
            result.setdefault(kind, {})["instructions_per_conn"] = round(instructions(work.path, lib, backend,
                                                                                      args.conns))
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in libs}
        for run in range(args.runs):
            for kind in (("pure", "compiled") if run % 2 == 0 else ("compiled", "pure")):
                samples[kind].append(cpu(work.path, libs[kind], backend, 4 * args.conns, run))
        for kind, got in samples.items():
            result[kind]["user_us"] = round(statistics.median(u for u, _ in got), 1)
            result[kind]["sys_us"] = round(statistics.median(s for _, s in got), 1)
            result[kind]["cpu_us"] = round(statistics.median(u + s for u, s in got), 1)
    finally:
        stop(nginx)
        work.close()
    result["loadavg_end"] = os.getloadavg()[0]
    pure, comp = result["pure"], result["compiled"]
    result["instructions_ratio"] = round(comp["instructions_per_conn"] / pure["instructions_per_conn"], 3)
    result["cpu_ratio"] = round(comp["cpu_us"] / pure["cpu_us"], 3) if pure["cpu_us"] else None
    print(f"{'per connection':<16}{'instructions':>14}{'user µs':>10}{'sys µs':>9}{'CPU µs':>9}")
    for kind in ("pure", "compiled"):
        r = result[kind]
        print(f"{kind:<16}{r['instructions_per_conn']:>14,}{r['user_us']:>10}{r['sys_us']:>9}{r['cpu_us']:>9}")
    print(f"compiled with Cython {result['cython']}")
    print(f"compiled/pure: instructions {result['instructions_ratio']}, CPU {result['cpu_ratio']} "
          f"(load average {result['loadavg_start']:.2f} -> {result['loadavg_end']:.2f})")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as exc:
        sys.stderr.write(f"compiled: {exc}\n")
        sys.exit(1)
