"""Bulk rows: one iperf3 stream through each contender, both directions.

Contenders: a direct connection, gbalance, HAProxy copying (``nosplice``)
and HAProxy with ``option splice-auto``.  Each figure is the median of
``runs`` interleaved rounds (the order rotates each round); the proxy runs
on CPU 0, iperf3 (client and server) on CPU 1.  Beside Gbit/s, the proxy's
CPU seconds (utime+stime of its process tree) per GB moved are recorded:
that figure holds up when other work shares the machine and rates do not.

Two more figures per run say *why* one contender streams faster than
another here (bench/FINDINGS, "Why splice loses on this machine kind"):

* ``load_s_per_gb``: busy seconds of the load core (iperf3's client and
  server, and the kernel work done on their behalf) per GB.  The load core
  is the bottleneck of every proxied run (it is 90-97 % busy while the
  proxy's core idles), so throughput follows this figure, not the proxy's
  own CPU;
* ``sleeps_per_mb``: how often the proxy went to sleep per MB moved (its
  voluntary context switches).  Each sleep costs the other core a
  cross-core wake-up, which on a virtual machine is an interrupt sent
  through the hypervisor.
"""

from __future__ import annotations

from collections.abc import Callable

from lib import (LOAD_CPU, PROXY_CPU, BenchError, Direct, GBalance, HAProxy, cpu_busy_seconds, iperf3_stream,
                 median, tree_cpu_seconds, tree_sleeps)

DIRECTIONS = ("up", "down")   # up: iperf3 client -> server; down: iperf3 -R


class HAProxySplice(HAProxy):
    """HAProxy as :class:`HAProxy` but splicing (``option splice-auto``);
    maxconn 6000: with splice it needs descriptors for pipes too."""

    name = "haproxy-splice"
    splice_lines = "    maxconn 6000\n"
    defaults_extra = "    option splice-auto\n"


CONTENDERS = {"direct": Direct, "gbalance": GBalance, "haproxy": HAProxy, "haproxy-splice": HAProxySplice}

#: One iperf3 stream through a port: (Gbit/s received, bytes received); lib.iperf3_stream.
one_stream = iperf3_stream
#: CPU seconds of a process tree (0 for the direct "proxy"); lib.tree_cpu_seconds.
_cpu_seconds = tree_cpu_seconds


def run(work, backend: int, runs: int, seconds: float, log: Callable[[str], None]) -> dict:
    """Interleaved rounds over every contender and direction; medians and ratios."""
    names = list(CONTENDERS)
    raw: dict = {n: {d: {"gbits": [], "cpu_s_per_gb": [], "load_s_per_gb": [], "sleeps_per_mb": []}
                     for d in DIRECTIONS} for n in names}
    errors = []
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            try:
                with CONTENDERS[name](work.path, backend) as proxy:
                    for d in DIRECTIONS:
                        c0, l0, s0 = _cpu_seconds(proxy.pid), cpu_busy_seconds(LOAD_CPU), tree_sleeps(proxy.pid)
                        gbits, nbytes = one_stream(proxy.port, seconds, d == "down")
                        cpu = _cpu_seconds(proxy.pid) - c0
                        load = cpu_busy_seconds(LOAD_CPU) - l0
                        sleeps = tree_sleeps(proxy.pid) - s0
                        row = raw[name][d]
                        row["gbits"].append(gbits)
                        if nbytes:
                            row["load_s_per_gb"].append(load / (nbytes / 1e9))
                        if proxy.pid is not None and nbytes:
                            row["cpu_s_per_gb"].append(cpu / (nbytes / 1e9))
                            row["sleeps_per_mb"].append(sleeps / (nbytes / 1e6))
                        log(f"round {r + 1}/{runs} bulk {d:4} {name:14} {gbits:6.2f} Gbit/s")
            except (BenchError, OSError) as exc:
                errors.append(f"bulk round {r + 1} {name}: {exc}")
                log(f"  bulk {name}: ERROR {exc}")
    med = {n: {d: {k: median(v) for k, v in raw[n][d].items()} for d in DIRECTIONS} for n in names}
    ratios = {}
    for d in DIRECTIONS:
        g = med["gbalance"][d]["gbits"]
        best = max((x for x in (med["haproxy"][d]["gbits"], med["haproxy-splice"][d]["gbits"]) if x), default=None)
        direct = med["direct"][d]["gbits"]
        ratios[d] = {"gbalance/haproxy_best": round(g / best, 3) if g and best else None,
                     "gbalance/direct": round(g / direct, 3) if g and direct else None}
    return {"raw": raw, "medians": med, "ratios": ratios, "errors": errors,
            "conditions": f"one iperf3 stream, {seconds:g} s, medians of {runs} interleaved rounds,"
                          f" proxy on CPU {PROXY_CPU}, iperf3 on CPU {LOAD_CPU}"}


def report(res: dict) -> None:
    """The bulk rows on stdout."""
    print(f"\nbulk, {res['conditions']}")
    print(f"{'contender':16}{'Gbit/s up/down':>16}{'proxy CPU s/GB':>17}{'load core s/GB':>17}"
          f"{'proxy sleeps/MB':>18}")

    def f(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    for name, row in res["medians"].items():
        def both(key, digits):
            return f"{f(row['up'].get(key), digits)}/{f(row['down'].get(key), digits)}"
        print(f"{name:16}{both('gbits', 2):>16}{both('cpu_s_per_gb', 3):>17}{both('load_s_per_gb', 3):>17}"
              f"{both('sleeps_per_mb', 2):>18}")
    for d, r in res["ratios"].items():
        print(f"gbalance {d}: {r['gbalance/haproxy_best']} x HAProxy's best mode, {r['gbalance/direct']} x direct")
