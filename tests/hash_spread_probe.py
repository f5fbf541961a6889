"""Run inside a private network namespace: hash spread of many IPv6 clients.

Starts four tagged backends on ::1, a ``balance -f -6`` hash group in front
of them, connects three times from each of the given source addresses and
prints ``{"ports": [port of A, B, C, D], "tags": {source: [tags...]}}`` as
JSON.  Used by test_e2e_proxy.py.
"""

import json
import signal
import subprocess
import sys
import time

from conftest import BALANCE, Backend, free_port, wait_port


def main(sources: list[str]) -> None:
    import socket

    backs = [Backend(tag, host="::1") for tag in "ABCD"]
    port = free_port(socket.AF_INET6, "::1")
    proc = subprocess.Popen(BALANCE + ["-f", "-6", str(port), *[b.spec for b in backs], "%"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, "::1")
        result = {}
        for src in sources:
            tags = []
            for _ in range(3):
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.settimeout(5)
                s.bind((src, 0))
                s.connect(("::1", port))
                tags.append(s.recv(10).decode().strip())
                s.close()
            result[src] = tags
        print(json.dumps({"ports": [b.port for b in backs], "tags": result}))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        for b in backs:
            b.close()


if __name__ == "__main__":
    time.sleep(0)
    main(sys.argv[1:])
