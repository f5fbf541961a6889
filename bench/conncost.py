"""Issue 21's independent-harness rows: CPU per short connection and per keep-alive request.

wrk with one thread and 32 connections fetches a 100-byte file from nginx
through each contender:

* **short connections** (``Connection: close``): connections per second and
  the proxy's CPU per connection, for a direct connection, gbalance in the
  default mode (no ``-w``), gbalance ``-w 1`` and HAProxy (one thread);
* **keep-alive**: the proxy's CPU per request over persistent connections,
  gbalance (no ``-w``) against HAProxy.

CPU is utime+stime of the proxy's whole process tree (from /proc) over the
measured run divided by the requests wrk completed.  The proxy is pinned to
CPU 0, wrk and nginx to CPU 1; each round measures every contender once,
forward and backward in turn; a rate ratio is the median over rounds of
each round's own ratio, a CPU ratio the ratio of the medians, each with the
range of the rounds' own ratios (see lib.paired_ratio).
"""

from __future__ import annotations

import time

from lib import (print_ratio_method, BenchError, Disturbance, GBalance, HAProxy, Proxy, fmt_ratio, median, paired_ratio, round_order,
                 tree_cpu_seconds)
from lib import wrk as _lib_wrk
from measure import settle_timewait

CONNECTIONS = 32
SHORT = ("direct", "gbalance", "gbalance-w1", "haproxy")
KEEPALIVE = ("gbalance", "haproxy")
#: The order of a round (forward, then backward in the next round): each
#: goal ratio's two sides (no -w and -w 1 against HAProxy) run next to each other.
ORDER = {"close": ("direct", "gbalance", "haproxy", "gbalance-w1"), "keepalive": KEEPALIVE}
#: Ratio rows: name -> (mode, numerator, denominator, figure).
RATIOS = {
    "cpu_per_conn_gbalance/haproxy": ("close", "gbalance", "haproxy", "cpu_us"),
    "cpu_per_conn_w1/haproxy": ("close", "gbalance-w1", "haproxy", "cpu_us"),
    "cpu_per_conn_gbalance/w1": ("close", "gbalance", "gbalance-w1", "cpu_us"),
    "rate_gbalance/haproxy": ("close", "gbalance", "haproxy", "rate"),
    "rate_w1/haproxy": ("close", "gbalance-w1", "haproxy", "rate"),
    "rate_gbalance/direct": ("close", "gbalance", "direct", "rate"),
    "keepalive_cpu_per_req_gbalance/haproxy": ("keepalive", "gbalance", "haproxy", "cpu_us"),
}


def wrk(url: str, seconds: float, close: bool) -> tuple[float, int]:
    """One ``wrk -t1 -c32`` run: (requests per second, requests completed)."""
    return _lib_wrk(url, seconds, CONNECTIONS, close, strict=True)


def make(name: str, work, nginx: int) -> Proxy:
    if name == "direct":
        return Proxy(work.path, nginx)
    if name == "gbalance":
        return GBalance(work.path, nginx)
    if name == "gbalance-w1":
        return GBalance(work.path, nginx, args=["-w", "1"])
    return HAProxy(work.path, nginx)


def one(name: str, work, nginx: int, seconds: float, close: bool) -> dict:
    """Rate and (for a proxy) CPU µs per request from one wrk run on a fresh instance."""
    with make(name, work, nginx) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/100b"
        if close:
            settle_timewait()
        wrk(url, 1.0, close)                 # warm-up: imports, first buffers
        pid = proxy.pid
        dist = Disturbance(pid).start()
        cpu0 = tree_cpu_seconds(pid)
        rate, requests = wrk(url, seconds, close)
        cpu1 = tree_cpu_seconds(pid)
        out = {"rate": rate, "requests": requests, **dist.stop().result()}
        if pid:
            out["cpu_us"] = 1e6 * (cpu1 - cpu0) / max(1, requests)
        return out


def run(work, nginx: int, runs: int, seconds: float, log) -> dict:
    t0 = time.monotonic()
    raw: dict[str, dict[str, list[dict]]] = {"close": {n: [] for n in SHORT},
                                             "keepalive": {n: [] for n in KEEPALIVE}}
    for r in range(runs):
        for mode in ("close", "keepalive"):
            for name in round_order(ORDER[mode], r):
                try:
                    res = one(name, work, nginx, seconds, mode == "close")
                except (BenchError, OSError) as exc:     # one failed run: the others still count
                    raw[mode][name].append({"error": str(exc)})
                    log(f"conncost round {r + 1}/{runs} {mode:9} {name:12} ERROR {exc}")
                    continue
                raw[mode][name].append(res)
                cpu = f" {res['cpu_us']:.1f} µs CPU/req" if "cpu_us" in res else ""
                flag = (f" DISTURBED (foreign {res['foreign_cpu_percent']}%, steal {res['steal_percent']}%)"
                        if res["disturbed"] else "")
                log(f"conncost round {r + 1}/{runs} {mode:9} {name:12} {res['rate']:,.0f} req/s{cpu}{flag}")
    med = {mode: {n: {"rate": median([x.get("rate") for x in raw[mode][n]]),
                      "cpu_us": median([x.get("cpu_us") for x in raw[mode][n]])} for n in raw[mode]}
           for mode in raw}
    paired = {k: paired_ratio(raw[m][a], raw[m][b], fig) for k, (m, a, b, fig) in RATIOS.items()}
    ratios = {k: p["value"] for k, p in paired.items()}          # see lib.paired_ratio
    goals = {"cpu_per_conn <= 1.25x HAProxy": _le(ratios["cpu_per_conn_w1/haproxy"], 1.25)
             and _le(ratios["cpu_per_conn_gbalance/haproxy"], 1.25),
             "conn/s >= 0.85x HAProxy": _ge(ratios["rate_w1/haproxy"], 0.85)
             and _ge(ratios["rate_gbalance/haproxy"], 0.85)}
    return {"connections": CONNECTIONS, "raw": raw, "medians": med, "ratios": ratios, "paired_ratios": paired,
            "disturbed_runs": sum(x.get("disturbed", False) for runs in raw.values() for xs in runs.values()
                                  for x in xs),
            "goals": goals, "elapsed_s": round(time.monotonic() - t0, 1)}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _le(a, b) -> bool | None:
    return None if a is None else a <= b


def _ge(a, b) -> bool | None:
    return None if a is None else a >= b


def _f(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def report(res: dict) -> None:
    med = res["medians"]
    c, k = med["close"], med["keepalive"]
    print()
    print(f"Cost per connection (issue 21), wrk -t1 -c{res['connections']}, 100-byte replies, medians of "
          f"{len(res['raw']['close']['gbalance'])} rounds (forward, backward, ...); proxy on CPU 0, wrk and nginx on CPU 1")
    failed = sum("error" in x for runs in res["raw"].values() for xs in runs.values() for x in xs)
    if failed:
        print(f"({failed} runs failed: see the log and the json's raw entries)")
    head = f"{'contender':22}{'conn/s close':>13}{'CPU µs/conn':>13}{'keep-alive CPU µs/req':>23}"
    print(head)
    print("-" * len(head))
    labels = {"direct": "direct", "gbalance": "gbalance (no -w)", "gbalance-w1": "gbalance -w 1",
              "haproxy": "HAProxy 1 thread"}
    for n in SHORT:
        ka = k.get(n, {}).get("cpu_us")
        print(f"{labels[n]:22}{_f(c[n]['rate'], ',.0f'):>13}{_f(c[n]['cpu_us'], '.1f'):>13}{_f(ka, '.1f'):>23}")
    p = res.get("paired_ratios") or {}
    print_ratio_method(res)
    print(f"CPU per connection / HAProxy: no -w {fmt_ratio(p.get('cpu_per_conn_gbalance/haproxy'))}, "
          f"-w 1 {fmt_ratio(p.get('cpu_per_conn_w1/haproxy'))} (goal <= 1.25); "
          f"no -w / -w 1 {fmt_ratio(p.get('cpu_per_conn_gbalance/w1'))}")
    print(f"conn/s / HAProxy: no -w {fmt_ratio(p.get('rate_gbalance/haproxy'))}, "
          f"-w 1 {fmt_ratio(p.get('rate_w1/haproxy'))} (goal >= 0.85); "
          f"no -w / direct {fmt_ratio(p.get('rate_gbalance/direct'))}")
    print(f"keep-alive CPU per request / HAProxy: {fmt_ratio(p.get('keepalive_cpu_per_req_gbalance/haproxy'))}")
    for goal, met in res["goals"].items():
        print(f"goal {goal}: {({True: 'YES', False: 'NO', None: '?'})[met]}")
