"""bench/: a part's report prints the same from a live result and from bench/results/latest.json.

JSON turns integer keys into strings, so a report that indexes a saved
result by worker count must accept both.
"""

from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import workers  # noqa: E402


def _workers_result() -> dict:
    cell = {"rate": 9000.0, "cpu_us_per_conn": 110.0}
    ratio = {"value": 1.1, "min": 1.0, "max": 1.2}
    return {
        "medians": {name: dict(cell) for name in workers.CONFIGS},
        "ratios": {"rate_w2/w1": 1.2, "rate_haproxy_t2/t1": 1.0},
        "raw": {"gbalance-w1": [cell, cell, cell]},
        "paired_ratios": {"cpu_per_conn_w1/haproxy_t1": ratio, "cpu_per_conn_w2/w1": ratio},
        "spread_w2_percent": [50.0, 50.0],
        "crowd": {"gbalance-w1": {"rate": 9000.0, "cpu_us_per_conn": 110.0},
                  "gbalance-w2": {"rate": 9500.0, "cpu_us_per_conn": 120.0, "spread": [50.5, 49.5]}},
        "memory": {"kb_per_idle_conn_w1": 0.8, "kb_per_idle_conn_w2": 0.9,
                   "idle_pss_kb": {1: 20000, 2: 41000, 3: 62000}, "kb_per_extra_worker": 21000.0},
    }


def test_workers_report_prints_the_same_from_a_live_result_and_from_latest_json(capsys):
    live = _workers_result()
    workers.report(live)
    printed_live = capsys.readouterr().out
    workers.report(json.loads(json.dumps(live)))
    printed_saved = capsys.readouterr().out
    assert "idle PSS -w 1/2/3: 20,000/41,000/62,000 KB" in printed_live
    assert "-w 2 spread [50.5, 49.5] %, conn/s -w 1 9,000 / -w 2 9,500, CPU µs/conn 110.0 / 120.0" in printed_live
    assert printed_saved == printed_live


import profiling  # noqa: E402
import run  # noqa: E402

PERF_REPORT = """\
# Samples: 5K of event 'cpu-clock:ppp'
#
 40.00%  |[kernel.kallsyms]                        |[k] tcp_ack
 20.00%  |libpython3.11.so.1.0                     |[.] _PyType_Lookup
 10.00%  |libc.so.6                                |[.] epoll_ctl
 10.00%  |forward.cpython-311-x86_64-linux-gnu.so  |[.] __pyx_pw_Flow_call
  5.00%  |corecext.cpython-311-x86_64-linux-gnu.so |[.] gevent_callback_io
  5.00%  |_socket.cpython-311-x86_64-linux-gnu.so  |[.] sock_recv
  5.00%  |[vdso]                                   |[.] __vdso_clock_gettime
  5.00%  |/usr/bin/python3.11                      |[.] main
not a sample line
"""


def test_the_native_profile_folds_perf_samples_into_the_process_parts():
    got = profiling.fold_perf(PERF_REPORT, {"forward", "connect"})
    assert got["groups"] == {"kernel": 45.0, "CPython": 25.0, "libc": 10.0, "gbalance compiled": 10.0,
                             "gevent/libev": 5.0, "HAProxy": 0.0, "other": 5.0}
    assert got["symbols"][0] == ("tcp_ack ([kernel.kallsyms])", 40.0)
    assert ("__pyx_pw_Flow_call (forward.cpython-311-x86_64-linux-gnu.so)", 10.0) in got["symbols"]
    # A module of the same name that is not one of gbalance's is not counted as gbalance's.
    assert profiling.group_of("forward.cpython-311-x86_64-linux-gnu.so", {"connect"}) == "other"
    assert profiling.group_of("/usr/sbin/haproxy", set()) == "HAProxy"


def _priced(report: str, cpu: float, own: set[str]) -> dict:
    prof = profiling.fold_perf(report, own)
    prof.update(cpu_us_per_conn=cpu, rate=9000.0,
                us_per_conn={g: round(cpu * p / 100, 1) for g, p in prof["groups"].items()})
    return prof


def test_the_native_profile_report_prints_each_part_in_microseconds_beside_haproxy(capsys):
    haproxy = " 60.00%  |[kernel.kallsyms]  |[k] tcp_ack\n 40.00%  |haproxy  |[.] process_stream\n"
    prof = {"compiled": True, "gbalance": _priced(PERF_REPORT, 100.0, {"forward"}),
            "haproxy": _priced(haproxy, 50.0, set())}
    run.print_native_profile(json.loads(json.dumps(prof)))
    out = capsys.readouterr().out
    assert "gbalance compiled build" in out
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()
            if line.startswith("  ") and line[:22].strip() in profiling.GROUPS + ("total",)}
    assert rows["kernel"] == ["45.0%", "45.0", "60.0%", "30.0"]
    assert rows["gbalance compiled"] == ["10.0%", "10.0", "0.0%", "0.0"]
    assert rows["HAProxy"] == ["0.0%", "0.0", "40.0%", "20.0"]
    assert rows["total"][:2] == ["100.0", "50.0"]
    assert "process_stream (haproxy)" in out


def test_a_run_of_some_parts_does_not_replace_the_whole_runs_results():
    assert run.default_output(list(run.PARTS)) == "latest.json"
    assert run.default_output(["profile"]) == "latest-profile.json"
    assert run.default_output(["scale", "workers"]) == "latest-workers-scale.json"
    assert run.parse_args(["--only", "profile"]).output.endswith("/results/latest-profile.json")
    assert run.parse_args(["--only", "profile", "--output", "/tmp/x.json"]).output == "/tmp/x.json"


import bulk  # noqa: E402
import lib  # noqa: E402


def test_bulk_report_prints_the_load_core_and_the_proxys_sleeps_beside_each_rate(capsys):
    row = {"gbits": 15.0, "cpu_s_per_gb": 0.25, "load_s_per_gb": 0.47, "sleeps_per_mb": 3.0}
    live = {
        "conditions": "one iperf3 stream",
        "medians": {"direct": {d: {"gbits": 24.0, "cpu_s_per_gb": None, "load_s_per_gb": 0.32,
                                   "sleeps_per_mb": None} for d in bulk.DIRECTIONS},
                    "gbalance": {d: dict(row) for d in bulk.DIRECTIONS}},
        "ratios": {d: {"gbalance/haproxy_best": 0.8, "gbalance/direct": 0.62} for d in bulk.DIRECTIONS},
    }
    bulk.report(live)
    out = capsys.readouterr().out
    assert "load core s/GB" in out and "proxy sleeps/MB" in out
    assert "0.320/0.320" in out and "-/-" in out               # direct: no proxy, but a load core
    assert "15.00/15.00" in out and "0.470/0.470" in out and "3.00/3.00" in out
    bulk.report(json.loads(json.dumps(live)))
    assert capsys.readouterr().out == out


def test_a_process_trees_sleeps_are_counted_across_its_children(tmp_path):
    import subprocess
    child = subprocess.Popen([sys.executable, "-c",
                              "import os, time\n"
                              "pid = os.fork()\n"
                              "for _ in range(40): time.sleep(0.002)\n"
                              "open(os.environ['DONE'] + str(pid), 'w').close()\n"
                              "time.sleep(30)\n"],
                             env={"DONE": str(tmp_path / "done-")})
    try:
        for _ in range(500):
            if len(list(tmp_path.iterdir())) == 2:
                break
            subprocess.run(["sleep", "0.01"])
        assert len(list(tmp_path.iterdir())) == 2, "the parent and its child did not finish their sleeps"
        # 40 sleeps each in the parent and the forked child, at least.
        assert lib.tree_sleeps(child.pid) >= 80
        assert lib.tree_sleeps(None) == 0
    finally:
        child.kill()
        child.wait()


def test_a_cores_busy_seconds_grow_while_work_runs_on_it():
    import os
    cpu = sorted(os.sched_getaffinity(0))[0]
    before = lib.cpu_busy_seconds(cpu)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        import time
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
    finally:
        os.sched_setaffinity(0, old)
    assert lib.cpu_busy_seconds(cpu) - before >= 0.25
    assert lib.cpu_busy_seconds(10_000) == 0.0
