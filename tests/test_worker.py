"""The worker entry point, its settings, and the -w number (gbalance.process.worker, gbalance.process.pool)."""

from __future__ import annotations

import base64
import os
import pickle
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from gbalance.config import ProxyConfig
from gbalance.errors import BalanceError
from gbalance.process.pool import describe_exit
from gbalance.arguments import parse_workers
from gbalance.process.worker import WORKER_ENV, WorkerSpec, decode_spec, encode_spec


def test_spec_round_trip():
    spec = WorkerSpec(index=2, rows=3, cfg=ProxyConfig(port=80, workers=3), source={},
                      state_path="/x", state_fd=5, listen_fd=6, ready_fd=7, master_pid=1234)
    assert decode_spec(encode_spec(spec)) == spec
    with pytest.raises(ValueError):
        decode_spec(base64.b64encode(pickle.dumps({"index": 1})).decode())


@pytest.mark.parametrize("env, message", [({}, "started by a balance master only"),
                                          ({WORKER_ENV: "!!"}, "bad worker settings")])
def test_worker_started_by_hand_exits_64_in_one_line(env, message):
    r = subprocess.run([sys.executable, "-m", "gbalance.process.worker", "0"], capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if k != WORKER_ENV}, **env},
                       cwd=ROOT, timeout=30)
    assert r.returncode == 64
    assert r.stderr.strip().splitlines() == [f"gbalance.process.worker: {message}"]


def test_parse_workers():
    assert parse_workers("1", 64) == 1 and parse_workers("64", 64) == 64
    assert parse_workers("auto", 64, cpus=8) == 8 and parse_workers("auto", 64, cpus=200) == 64
    assert parse_workers("auto", 64) == min(len(os.sched_getaffinity(0)), 64)
    for bad in ("0", "65", "-1", "two", "", "٣", "1.5"):
        with pytest.raises(BalanceError) as exc:
            parse_workers(bad, 64)
        assert exc.value.message == f"invalid number of workers [{bad}] for -w (1 to 64, or auto)"


def test_describe_exit():
    assert describe_exit(1) == "exit status 1"
    assert describe_exit(-signal.SIGKILL) == "signal 9 (SIGKILL)"
    assert describe_exit(-99) == "signal 99"


def test_cli_takes_w():
    from gbalance.cli import parse

    assert parse(["80", "127.0.0.1"]).workers == 1
    assert parse(["-w", "3", "80", "127.0.0.1"]).workers == 3
    assert parse(["-w", "auto", "80", "127.0.0.1"]).workers == min(len(os.sched_getaffinity(0)), 64)
    with pytest.raises(BalanceError) as exc:
        parse(["80", "-w"])
    assert exc.value.message.startswith("option -w requires an argument\n")
