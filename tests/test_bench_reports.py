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
    assert printed_saved == printed_live
