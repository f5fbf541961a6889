"""Run inside a private network namespace by test_e2e_datapath: real EADDRNOTAVAIL.

The namespace gets an ephemeral port range of two ports.  Channel A (group
0) takes both with two held connections; the third client's connect to A
finds no local port.  Prints the three clients' tags, then channel A's
status and connection count, one per line.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from conftest import Backend, BalanceRunner, read_line

from gbalance.table.files import state_path
from gbalance.table.layout import C_C, C_STATUS
from gbalance.table.state import SharedState


def main() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("40000 40001")
    state_dir = os.environ["BALANCE_STATE_DIR"]
    runner = BalanceRunner(__import__("pathlib").Path(state_dir))
    a, b = Backend("A", port=21001), Backend("B", port=21002)
    port = 21000
    held = []
    try:
        runner.start("-a", str(port), a.spec, "!", b.spec, port=port)
        tags = []
        for i in range(3):
            s = socket.socket()
            s.settimeout(10)
            s.bind(("127.0.0.1", 22000 + i))        # clients stay out of the tiny range
            s.connect(("127.0.0.1", port))
            held.append(s)
            tags.append(read_line(s))
        st = SharedState.attach(state_path(port, None, state_dir))
        try:
            time.sleep(0.2)
            print(*tags, f"status={st.get(0, 0, C_STATUS)}", f"c={st.get(0, 0, C_C)}", sep="\n")
        finally:
            st.close()
    finally:
        for s in held:
            s.close()
        runner.cleanup()
        a.close()
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
