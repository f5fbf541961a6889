"""Issue 11's figures: CPU per connection, rate per core, worker spread, scale, memory.

Under the same wrk load (``Connection: close``, 100-byte file from nginx):

* **CPU per connection**: utime+stime of the proxy's whole process tree
  (from /proc, master and workers, or HAProxy's threads) over the measured
  run, divided by the requests wrk completed; for gbalance ``-w 1`` and
  HAProxy ``nbthread 1`` pinned to CPU 0, and gbalance ``-w 2`` and HAProxy
  ``nbthread 2`` allowed on CPUs 0 and 1;
* **rate per core**: the connection rate of the one-core runs, gbalance /
  HAProxy;
* **spread**: with ``-w 2``, the share of the measured run's connections
  each worker accepted (from the workers' counter rows in the state file);
* **scale**: rate with 2 workers / rate with 1 (this machine's 2 cores also
  run wrk and nginx, so this understates what 2 free cores give);
* **memory**: KB per idle proxied connection with ``-w 1`` and ``-w 2``, and
  the idle footprint (PSS) each extra worker adds.
"""

from __future__ import annotations

import time
from pathlib import Path

from lib import (print_ratio_method, LOAD_CPU, PROXY_CPU, BenchError, Disturbance, GBalance, HAProxy, Workdir, fmt_ratio, median,
                 paired_ratio, pin_tree, process_tree, pss_kb, round_order, tree_cpu_seconds, wrk)
from measure import _wrk, idle_kb_per_conn, settle_timewait, wrk_run

BOTH = {PROXY_CPU, LOAD_CPU}
#: Also the order of a round (forward, then backward in the next round):
#: each ratio's two sides run next to each other.
CONFIGS = ("gbalance-w1", "haproxy-t1", "gbalance-w2", "haproxy-t2", "gbalance-w2-cpu0")
#: Ratio rows: name -> (numerator config, denominator config, figure).
RATIOS = {
    "cpu_per_conn_w1/haproxy_t1": ("gbalance-w1", "haproxy-t1", "cpu_us_per_conn"),
    "cpu_per_conn_w2/haproxy_t2": ("gbalance-w2", "haproxy-t2", "cpu_us_per_conn"),
    "cpu_per_conn_w2/w1": ("gbalance-w2", "gbalance-w1", "cpu_us_per_conn"),
    # Both workers on the proxy's own core: what a second worker process
    # costs by itself, without the load's core under the second one.
    "cpu_per_conn_w2cpu0/w1": ("gbalance-w2-cpu0", "gbalance-w1", "cpu_us_per_conn"),
    "rate_per_core_w1/haproxy_t1": ("gbalance-w1", "haproxy-t1", "rate"),
    "rate_w2/w1": ("gbalance-w2", "gbalance-w1", "rate"),
    "rate_haproxy_t2/t1": ("haproxy-t2", "haproxy-t1", "rate"),
}


class Workers(GBalance):
    """``balance -f -w N``, its tree pinned to ``cpus`` once every worker runs."""

    def __init__(self, work: Path, backend: int, n: int, cpus, name: str = ""):
        super().__init__(work, backend, args=["-w", str(n)])
        self.n = n
        self.cpus = cpus
        self.name = name or f"gbalance-w{n}"

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 20
        while len(process_tree(self.proc.pid)) < self.n + (1 if self.n > 1 else 0):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.n} workers did not start")
            time.sleep(0.05)
        pin_tree(self.proc.pid, self.cpus)

    def rows(self) -> list[int]:
        """Connections each counter row (worker) has counted so far."""
        from gbalance.table.files import state_path
        from gbalance.table.layout import C_TOTALC, row_offset, slot
        from gbalance.table.state import SharedState

        st = SharedState.attach(state_path(self.port, None, str(self.work / f"state-{self.port}")))
        try:
            return [st.q[slot(0, 0, C_TOTALC) + row_offset(w)] for w in range(self.n)]
        finally:
            st.close()


class HAProxyThreads(HAProxy):
    def __init__(self, work: Path, backend: int, threads: int, cpus):
        super().__init__(work, backend)
        self.threads = threads
        self.cpus = cpus
        self.name = f"haproxy-t{threads}"


def make(name: str, work: Path, backend: int):
    if name == "gbalance-w1":
        return Workers(work, backend, 1, PROXY_CPU)
    if name == "gbalance-w2":
        return Workers(work, backend, 2, BOTH)
    if name == "gbalance-w2-cpu0":
        return Workers(work, backend, 2, PROXY_CPU, name)
    if name == "haproxy-t1":
        return HAProxyThreads(work, backend, 1, PROXY_CPU)
    return HAProxyThreads(work, backend, 2, BOTH)


def one(name: str, work: Workdir, nginx: int, seconds: float) -> dict:
    """Rate, CPU µs per connection and (gbalance -w 2) the spread, from one wrk run."""
    with make(name, work.path, nginx) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/100b"
        settle_timewait()
        _wrk(url, 1.0)                       # warm-up: imports, first buffers, every worker up
        rows0 = proxy.rows() if isinstance(proxy, Workers) and proxy.n > 1 else None
        dist = Disturbance(proxy.pid).start()
        cpu0 = tree_cpu_seconds(proxy.pid)
        rate, requests = wrk_run(url, seconds)
        cpu1 = tree_cpu_seconds(proxy.pid)
        dist.stop()
        out = {"rate": rate, "requests": requests, "cpu_us_per_conn": 1e6 * (cpu1 - cpu0) / max(1, requests),
               **dist.result()}
        if rows0 is not None:
            rows1 = proxy.rows()
            got = [b - a for a, b in zip(rows0, rows1)]
            out["spread"] = [round(100.0 * g / max(1, sum(got)), 1) for g in got]
        return out


#: Concurrent clients of the crowd run: enough that one worker's accept
#: queue holds far more than the master's wait limit (about 40 ms here).
CROWD = 1000


def crowd(work: Workdir, nginx: int, seconds: float) -> dict:
    """-w 1 and -w 2 under CROWD concurrent clients: the steering lets the
    second worker accept when clients wait; its share, rates and CPU."""
    out: dict = {}
    for name in ("gbalance-w1", "gbalance-w2"):
        with make(name, work.path, nginx) as proxy:
            url = f"http://127.0.0.1:{proxy.port}/100b"
            settle_timewait()
            wrk(url, 1.0, CROWD)
            rows0 = proxy.rows() if proxy.n > 1 else None
            cpu0 = tree_cpu_seconds(proxy.pid)
            rate, requests = wrk(url, seconds, CROWD)
            cpu1 = tree_cpu_seconds(proxy.pid)
            res = {"rate": rate, "cpu_us_per_conn": 1e6 * (cpu1 - cpu0) / max(1, requests)}
            if rows0 is not None:
                got = [b - a for a, b in zip(rows0, proxy.rows())]
                res["spread"] = [round(100.0 * g / max(1, sum(got)), 1) for g in got]
            out[name] = res
    return out


def memory(work: Workdir, greeter: int) -> dict:
    """KB per idle connection (-w 1, -w 2) and the idle PSS per extra worker."""
    out: dict = {}
    idle: dict[int, int] = {}
    for n in (1, 2, 3):
        with Workers(work.path, greeter, n, BOTH) as proxy:
            time.sleep(1.0)                  # every worker has imported and is waiting
            idle[n] = pss_kb(proxy.pid)
            if n in (1, 2):
                out[f"kb_per_idle_conn_w{n}"] = idle_kb_per_conn(proxy)
    out["idle_pss_kb"] = idle
    out["kb_per_extra_worker"] = (idle[3] - idle[1]) / 2
    return out


def run(work: Workdir, nginx: int, greeter: int | None, runs: int, seconds: float, log) -> dict:
    t0 = time.monotonic()
    raw: dict[str, list[dict]] = {n: [] for n in CONFIGS}
    for r in range(runs):
        for name in round_order(CONFIGS, r):
            res = one(name, work, nginx, seconds)
            raw[name].append(res)
            extra = f" spread {res['spread']}" if "spread" in res else ""
            flag = (f" DISTURBED (foreign {res['foreign_cpu_percent']}%, steal {res['steal_percent']}%)"
                    if res["disturbed"] else "")
            log(f"workers round {r + 1}/{runs} {name:12} {res['rate']:,.0f} conn/s "
                f"{res['cpu_us_per_conn']:.1f} µs CPU/conn{extra}{flag}")
    med = {n: {"rate": median([x["rate"] for x in raw[n]]),
               "cpu_us_per_conn": median([x["cpu_us_per_conn"] for x in raw[n]])} for n in CONFIGS}
    spreads = [x["spread"] for x in raw["gbalance-w2"] if "spread" in x]
    paired = {k: paired_ratio(raw[a], raw[b], fig) for k, (a, b, fig) in RATIOS.items()}
    result = {"raw": raw, "medians": med,
              "spread_w2_percent": [round(median([s[i] for s in spreads]), 1) for i in range(2)] if spreads else None,
              "spread_w2cpu0_percent": _median_spread(raw.get("gbalance-w2-cpu0", [])),
              # Rates: median of per-round ratios; CPU: ratio of medians (lib.paired_ratio).
              "ratios": {k: p["value"] for k, p in paired.items()},
              "paired_ratios": paired,
              "disturbed_runs": sum(x.get("disturbed", False) for xs in raw.values() for x in xs)}
    result["crowd"] = crowd(work, nginx, seconds)
    log(f"workers crowd ({CROWD} clients): {result['crowd']}")
    if greeter is not None:
        result["memory"] = memory(work, greeter)
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    return result


def _median_spread(runs: list[dict]) -> list[float] | None:
    spreads = [x["spread"] for x in runs if "spread" in x]
    return [round(median([s[i] for s in spreads]), 1) for i in range(2)] if spreads else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def report(res: dict) -> None:
    med, r = res["medians"], res["ratios"]
    print()
    print(f"Workers (issue 11), medians of {len(res['raw']['gbalance-w1'])} rounds (forward, backward, ...);"
          " 1 worker/thread pinned to CPU 0, 2 on CPUs 0-1 (wrk and nginx on CPU 1)")
    head = f"{'proxy':14}{'conn/s':>10}{'CPU µs/conn':>13}"
    print(head)
    print("-" * len(head))
    for n in CONFIGS:
        print(f"{n:14}{med[n]['rate']:>10,.0f}{med[n]['cpu_us_per_conn']:>13.1f}")
    p = res.get("paired_ratios") or {}
    print_ratio_method(res)
    print(f"CPU per connection, gbalance/HAProxy: 1 worker {fmt_ratio(p.get('cpu_per_conn_w1/haproxy_t1'))}"
          f" (goal <= 1.25, issue 21; 1.3 in issue 11), 2 workers {fmt_ratio(p.get('cpu_per_conn_w2/haproxy_t2'))}")
    print(f"CPU per connection, -w 2 / -w 1: {fmt_ratio(p.get('cpu_per_conn_w2/w1'))} (goal <= 1.1, issue 21;"
          " the -w 2 worker on CPU 1 shares its core with wrk and nginx)")
    if p.get("cpu_per_conn_w2cpu0/w1"):
        print(f"CPU per connection, -w 2 with both workers on CPU 0 / -w 1: {fmt_ratio(p.get('cpu_per_conn_w2cpu0/w1'))}"
              " (a second worker by itself, no core shared with the load)")
    print(f"rate per core, gbalance -w 1 / HAProxy 1 thread: {fmt_ratio(p.get('rate_per_core_w1/haproxy_t1'))}"
          " (goal >= 0.85, issue 21; 0.75 in issue 11)")
    if res.get("spread_w2_percent"):
        print(f"spread with 2 workers: {res['spread_w2_percent']} % of connections (steered: the second"
              " accepts only when clients wait; issue 11's 40-60 each was before steering)")
    if res.get("spread_w2cpu0_percent"):
        print(f"spread with 2 workers on CPU 0: {res['spread_w2cpu0_percent']} % of connections")
    c = res.get("crowd")
    if c:
        w1, w2 = c["gbalance-w1"], c["gbalance-w2"]
        print(f"{CROWD} concurrent clients (one worker falls behind): -w 2 spread {w2.get('spread')} %,"
              f" conn/s -w 1 {w1['rate']:,.0f} / -w 2 {w2['rate']:,.0f},"
              f" CPU µs/conn {w1['cpu_us_per_conn']:.1f} / {w2['cpu_us_per_conn']:.1f} (one run)")
    print(f"rate 2 workers / 1 worker: {r['rate_w2/w1']:.2f} (HAProxy 2/1 threads: {r['rate_haproxy_t2/t1']:.2f};"
          " wrk and nginx share the second core)")
    m = res.get("memory")
    if m:
        # (keyed by worker count: ints in a live run, strings once through latest.json)
        pss = {int(k): v for k, v in m["idle_pss_kb"].items()}
        print(f"KB per idle connection: -w 1 {m['kb_per_idle_conn_w1']:.2f}, -w 2 {m['kb_per_idle_conn_w2']:.2f}"
              f" (goal <= 2); idle PSS -w 1/2/3: {pss[1]:,}/{pss[2]:,}/"
              f"{pss[3]:,} KB, {m['kb_per_extra_worker']:,.0f} KB per extra worker")
