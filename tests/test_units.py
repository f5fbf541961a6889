"""The systemd units in etc/systemd: hardening settings that must hold.

``systemd-analyze verify`` checks them for real (the helper is swapped for
/bin/true, which exists here; a missing man page is the only complaint
allowed).  The package tests check the installed copies again.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "etc" / "systemd"


def setting(unit: str, key: str) -> list[str]:
    text = (UNITS / unit).read_text()
    return re.findall(rf"^{re.escape(key)}=(.*)$", text, re.M)


def test_only_the_master_and_the_exec_commands_may_notify():
    assert setting("balance@.service", "NotifyAccess") == ["exec"]


def test_check_commands_get_a_default_soft_fd_limit_back():
    (value,) = setting("balance@.service", "LimitNOFILE")
    soft, hard = (int(v) for v in value.split(":"))
    assert soft == 1024 and hard > soft


def test_the_metrics_unit_writes_only_its_textfile_directory():
    assert setting("balance-metrics.service", "ReadWritePaths") == ["/var/lib/prometheus/node-exporter"]
    assert setting("balance-metrics.service", "CapabilityBoundingSet") == [""]


def test_the_user_decision_is_written_down():
    text = (UNITS / "balance@.service").read_text()
    assert "Why no User=" in text and "UMask=0077" in text
    assert setting("balance@.service", "User") == []


def test_units_verify(tmp_path):
    for name in ("balance.service", "balance@.service", "balance-metrics.service", "balance-metrics.timer"):
        text = (UNITS / name).read_text().replace("/usr/lib/gbalance/balance-instances", "/bin/true")
        (tmp_path / name).write_text(text)
    (tmp_path / "balance@8080.any.service").symlink_to("balance@.service")
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "balance@8080.any.service"),
                           str(tmp_path / "balance-metrics.service"), str(tmp_path / "balance.service")],
                          capture_output=True, text=True, timeout=120)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if line.strip() and "man balance(1)" not in line]
    assert complaints == [], complaints
