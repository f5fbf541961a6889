"""gbalance.system.mapguard: a file cut short under a guarded mapping kills nobody.

Each case runs in a child process (a real SIGBUS, a real truncate): a
guarded mapping (writable or read-only) reads on after the file was cut
to nothing; a fault in any other mapping keeps its default action (the
child dies of SIGBUS at once, it does not spin).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import mmap, os, sys
    from gbalance.system import mapguard
    path, mode = sys.argv[1], sys.argv[2]
    size = 1 << 20
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"x" * 8, 4096 * 10)
    writable = mode == "rw"
    if not writable:
        os.close(fd)
        fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    assert mm[4096 * 10: 4096 * 10 + 8] == b"x" * 8
    if mode != "unguarded":
        assert mapguard.guard(mm, size, fd, writable)
    else:
        other = mmap.mmap(-1, 4096)     # something else is guarded, not this one
        mapguard.guard(other, 4096, -1, False)
    os.truncate(path, 0)
    q = memoryview(mm).cast("q")
    print(q[4096 * 10 // 8], q[size // 8 - 1], mm[:4], mapguard.repaired, flush=True)
    if writable:
        q[5] = 42                       # the file is whole again: writes land in it
        print(os.fstat(fd).st_size, q[5], flush=True)
""")


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_a_guarded_mapping_reads_zeros_after_the_file_was_cut(tmp_path, mode):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "f"), mode], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, (r.returncode, r.stderr)
    lines = r.stdout.splitlines()
    *values, repaired = lines[0].split()
    assert values == ["0", "0", "b'\\x00\\x00\\x00\\x00'"] and int(repaired) >= 1
    if mode == "rw":
        assert lines[1] == f"{1 << 20} 42"


def test_a_fault_elsewhere_keeps_its_default_action(tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "f"), "unguarded"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
