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
CPU 0, wrk and nginx to CPU 1; runs are interleaved (each round measures
every contender once, in rotating order) and medians are reported.
"""

from __future__ import annotations

import re
import subprocess

from lib import LOAD_CPU, BenchError, GBalance, HAProxy, Proxy, median, pin
from measure import settle_timewait
from workers import tree_cpu_seconds

CONNECTIONS = 32
SHORT = ("direct", "gbalance", "gbalance-w1", "haproxy")
KEEPALIVE = ("gbalance", "haproxy")


def wrk(url: str, seconds: float, close: bool) -> tuple[float, int]:
    """One ``wrk -t1 -c32`` run: (requests per second, requests completed)."""
    cmd = pin(LOAD_CPU) + ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    try:
        out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish") from None
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rate or not total:
        raise BenchError(f"wrk printed no rate: {out.strip()[-200:]!r}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if bad and int(bad.group(1)) > int(total.group(1)) // 100:
        raise BenchError(f"wrk: {bad.group(1)} of {total.group(1)} responses were errors")
    if errs and sum(int(x) for x in errs.groups()) > int(total.group(1)) // 100:
        raise BenchError(f"wrk: {errs.group(0)}")
    return float(rate.group(1)), int(total.group(1))


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
        cpu0 = tree_cpu_seconds(pid) if pid else 0.0
        rate, requests = wrk(url, seconds, close)
        out = {"rate": rate, "requests": requests}
        if pid:
            out["cpu_us"] = 1e6 * (tree_cpu_seconds(pid) - cpu0) / max(1, requests)
        return out


def run(work, nginx: int, runs: int, seconds: float, log) -> dict:
    raw: dict[str, dict[str, list[dict]]] = {"close": {n: [] for n in SHORT},
                                             "keepalive": {n: [] for n in KEEPALIVE}}
    for r in range(runs):
        for mode, names in (("close", SHORT), ("keepalive", KEEPALIVE)):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                try:
                    res = one(name, work, nginx, seconds, mode == "close")
                except (BenchError, OSError) as exc:     # one failed run: the others still count
                    raw[mode][name].append({"error": str(exc)})
                    log(f"conncost round {r + 1}/{runs} {mode:9} {name:12} ERROR {exc}")
                    continue
                raw[mode][name].append(res)
                cpu = f" {res['cpu_us']:.1f} µs CPU/req" if "cpu_us" in res else ""
                log(f"conncost round {r + 1}/{runs} {mode:9} {name:12} {res['rate']:,.0f} req/s{cpu}")
    med = {mode: {n: {"rate": median([x.get("rate") for x in raw[mode][n]]),
                      "cpu_us": median([x.get("cpu_us") for x in raw[mode][n]])} for n in raw[mode]}
           for mode in raw}
    c, k = med["close"], med["keepalive"]
    ratios = {
        "cpu_per_conn_gbalance/haproxy": _ratio(c["gbalance"]["cpu_us"], c["haproxy"]["cpu_us"]),
        "cpu_per_conn_w1/haproxy": _ratio(c["gbalance-w1"]["cpu_us"], c["haproxy"]["cpu_us"]),
        "cpu_per_conn_gbalance/w1": _ratio(c["gbalance"]["cpu_us"], c["gbalance-w1"]["cpu_us"]),
        "rate_gbalance/haproxy": _ratio(c["gbalance"]["rate"], c["haproxy"]["rate"]),
        "rate_w1/haproxy": _ratio(c["gbalance-w1"]["rate"], c["haproxy"]["rate"]),
        "rate_gbalance/direct": _ratio(c["gbalance"]["rate"], c["direct"]["rate"]),
        "keepalive_cpu_per_req_gbalance/haproxy": _ratio(k["gbalance"]["cpu_us"], k["haproxy"]["cpu_us"]),
    }
    goals = {"cpu_per_conn <= 1.25x HAProxy": _le(ratios["cpu_per_conn_w1/haproxy"], 1.25)
             and _le(ratios["cpu_per_conn_gbalance/haproxy"], 1.25),
             "conn/s >= 0.85x HAProxy": _ge(ratios["rate_w1/haproxy"], 0.85)
             and _ge(ratios["rate_gbalance/haproxy"], 0.85)}
    return {"connections": CONNECTIONS, "raw": raw, "medians": med, "ratios": ratios, "goals": goals}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _le(a, b) -> bool | None:
    return None if a is None else a <= b


def _ge(a, b) -> bool | None:
    return None if a is None else a >= b


def _f(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def report(res: dict) -> None:
    med, r = res["medians"], res["ratios"]
    c, k = med["close"], med["keepalive"]
    print()
    print(f"Cost per connection (issue 21), wrk -t1 -c{res['connections']}, 100-byte replies, medians of "
          f"{len(res['raw']['close']['gbalance'])} interleaved runs; proxy on CPU 0, wrk and nginx on CPU 1")
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
    print(f"CPU per connection / HAProxy: no -w {_f(r['cpu_per_conn_gbalance/haproxy'], '.2f')}x, "
          f"-w 1 {_f(r['cpu_per_conn_w1/haproxy'], '.2f')}x (goal <= 1.25); "
          f"no -w / -w 1 {_f(r['cpu_per_conn_gbalance/w1'], '.2f')}")
    print(f"conn/s / HAProxy: no -w {_f(r['rate_gbalance/haproxy'], '.2f')}, -w 1 {_f(r['rate_w1/haproxy'], '.2f')}"
          f" (goal >= 0.85); no -w / direct {_f(r['rate_gbalance/direct'], '.2f')}")
    print(f"keep-alive CPU per request / HAProxy: {_f(r['keepalive_cpu_per_req_gbalance/haproxy'], '.2f')}x")
    for goal, met in res["goals"].items():
        print(f"goal {goal}: {({True: 'YES', False: 'NO', None: '?'})[met]}")
