"""The README's quick start, run as written.

The commands are read from the README itself, so the test fails when the
text and the program drift apart.  What would change the machine (apt-get,
/opt, /usr/local/bin) is checked for its shape only; the example after it
(two backends, curl through the proxy, ``show``, ``disable``, ``kill``) runs
for real with bash against the repository's ``balance``, on free ports and
in temporary directories substituted for the README's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, pid_alive

README = ROOT / "README"
#: The repository's console script, as the quick start links it into PATH.
VENV_BALANCE = Path(sys.executable).parent / "balance"


def section(title: str) -> str:
    """The text of the README section whose heading starts with ``title``."""
    text = README.read_text()
    m = re.search(rf"^{re.escape(title)}[^\n]*\n-+\n(.*?)(?=^\S[^\n]*\n-{{3,}}\n)", text,
                  re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def code_blocks(text: str) -> list[list[str]]:
    """The indented blocks of a section, each as its list of lines."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("    "):
            current.append(line[4:])
        elif line.strip() == "" and current:
            continue
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def quick_start() -> list[list[str]]:
    return code_blocks(section("Quick start"))


def test_install_is_one_command_for_a_fresh_image_that_puts_balance_on_the_path():
    install = quick_start()[0]
    assert len(install) == 1
    steps = [step.strip() for step in install[0].split("&&")]
    assert steps[0] == "apt-get update"                    # a fresh image has no package lists
    apt = steps[1].split()
    assert apt[:3] == ["apt-get", "install", "-y"] and {"python3-venv", "curl"} <= set(apt)
    assert "python3 -m venv /opt/gbalance" in steps
    assert "/opt/gbalance/bin/pip install ." in steps
    link = steps[-1].split()
    assert link[:2] == ["ln", "-sf"] and link[2] == "/opt/gbalance/bin/balance"
    assert link[3] in ("/usr/local/bin/", "/usr/local/bin/balance")
    # The pieces it names exist: what pip installs provides the `balance` script.
    assert 'balance = "gbalance.cli:main"' in (ROOT / "pyproject.toml").read_text().replace("'", '"')


def test_make_targets_the_readme_names():
    tests = [b for b in quick_start() if any(line.startswith("make ") for line in b)][0]
    targets = [line.split()[1] for line in tests]
    assert targets == ["unit", "lint", "test"]
    makefile = (ROOT / "Makefile").read_text()
    unit = re.search(r"^unit:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert '-m "not packaging"' in unit                    # make unit: no packaging tests
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "ruff check" in lint and "mypy" in lint         # make lint: both tools
    assert re.search(r"^test:.*\blint\b", makefile, re.M)  # make test runs the lint step
    assert (ROOT / "man" / "balance.1").is_file()           # `man -l man/balance.1`


def wait_accepting(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing accepts on port {port}"
            time.sleep(0.05)


@pytest.fixture
def readme_env(tmp_path):
    """PATH with ``balance`` linked in as the quick start does, a private state dir."""
    assert VENV_BALANCE.exists(), "run the tests with the venv's python (make venv)"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(VENV_BALANCE, bindir / "balance")
    state = tmp_path / "state"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", BALANCE_STATE_DIR=str(state),
               HOME=str(tmp_path))
    return env, state


def substitute(lines: list[str], ports: dict[str, int], tmp_path: Path) -> list[str]:
    out = []
    for line in lines:
        for old, new in ports.items():
            line = re.sub(rf"\b{old}\b", str(new), line)
        line = line.replace("/tmp/web", f"{tmp_path}/web")
        out.append(line)
    return out


def kill_master(state: Path) -> None:
    """A master the example failed to stop: by the pid in its state file."""
    from gbalance.table.state import SharedState

    if not state.is_dir():
        return
    for path in state.glob("balance.*.any"):
        try:
            st = SharedState.attach(str(path))
        except Exception:
            continue
        try:
            pid = st.live_pid()
        finally:
            st.close()
        if pid:
            os.kill(pid, signal.SIGKILL)


def test_see_it_work_example_runs_as_written(readme_env, tmp_path):
    env, state = readme_env
    example = [b for b in quick_start() if any(line.startswith("curl ") for line in b)][0]
    ports = {"8080": free_port(), "8081": free_port(), "8082": free_port()}
    lines = substitute(example, ports, tmp_path)
    assert shutil.which("curl"), "curl is part of the quick start's install command"
    script = ["set -u"]
    for n, line in enumerate(lines):
        script.append(f"echo '@@@ {n}'")
        script.append(line)
        if line.rstrip().endswith("&"):
            # The harness waits for a backend before going on (a person typing
            # is slower than bash); nothing else is added.
            port = re.search(r"\b(\d+) 2>", line).group(1)
            script.append(f"for i in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null"
                          " && break; sleep 0.05; done")
    script.append("wait")
    p = subprocess.Popen(["bash", "-c", "\n".join(script)], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        kill_master(state)
    assert p.returncode == 0, err
    answers = dict(zip(lines, re.split(r"^@@@ \d+\n", out, flags=re.M)[1:]))
    port = ports["8080"]
    by_cmd = {line.split(f" {port}")[0] if line.startswith("balance -c") else line: text
              for line, text in answers.items()}
    curls = [text for line, text in answers.items() if line.startswith("curl ")]
    assert curls == ["one\ntwo\n", "one\n"]               # round robin, then web2 disabled
    show = by_cmd["balance -c show"].splitlines()
    assert show[0] == "GRP Type  #   S       ip-address  port    c      totalc maxc        sent        rcvd"
    rows = [r.split() for r in show[1:]]
    assert [r[:8] for r in rows] == [
        ["0", "RR", "0", "ENA", "127.0.0.1", str(ports["8081"]), "0", "1"],
        ["0", "RR", "1", "ENA", "127.0.0.1", str(ports["8082"]), "0", "1"]]
    assert all(int(r[9]) > 0 and int(r[10]) > 0 for r in rows)   # bytes both ways
    assert by_cmd['balance -c "disable 1"'] == "channel 1 disabled\n"
    assert by_cmd["balance -c kill"] == "shutdown complete, exiting.\n"
    assert not (state / f"balance.{port}.any").exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # The README says what the reader sees.
    text = section("Quick start")
    assert "`one` and `two`" in text and "`shutdown complete, exiting.`" in text


def test_foreground_example_logs_to_stderr_and_stops_with_ctrl_c(readme_env, tmp_path):
    env, state = readme_env
    block = [b for b in quick_start() if any(line.startswith("balance -f ") for line in b)][0]
    ports = {"8080": free_port(), "8081": free_port(), "8082": free_port()}
    (line,) = substitute(block, ports, tmp_path)
    p = subprocess.Popen(["bash", "-c", f"exec {line}"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_accepting(ports["8080"])
        assert p.poll() is None                          # still ours: it did not detach
        assert (state / f"balance.{ports['8080']}.any").exists()
        p.send_signal(signal.SIGINT)                      # Ctrl-C
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert not pid_alive(p.pid)
    assert f"port {ports['8080']}" in err                 # its log is on stderr
    assert "Traceback" not in err
