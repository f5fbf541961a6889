"""The ``-p`` packet dump: the rendering byte by byte, then ``balance -fp`` for real."""

from __future__ import annotations

import socket

import pytest

from gbalance.proxy.dump import dump, render
from conftest import free_port


@pytest.mark.parametrize("data,text", [
    (b"", "\n"),
    (b"GET / HTTP/1.0", "GET / HTTP/1.0\n"),
    (b" ~", " ~\n"),
    (b"a\\b", "a\\\\b\n"),
    (b"\\", "\\\\\n"),
    (b"\x00", "\\00\n"),
    (b"\x7f\x80\xff\x1f", "\\7F\\80\\FF\\1F\n"),
    (b"\xab\xcd\xef", "\\AB\\CD\\EF\n"),
    (b"\r\n", "\\0D\\0A\n\n"),
    (b"one\ntwo\n", "one\\0A\ntwo\\0A\n\n"),
    (b"\t\x0b\x0c", "\\09\\0B\\0C\n"),
])
def test_render_exact(data, text):
    assert render(data) == text


def test_every_byte():
    """Printable ASCII as is, backslash doubled, everything else as \\XX."""
    for b in range(256):
        out = render(bytes([b]))
        if b == 0x5C:
            assert out == "\\\\\n"
        elif 0x20 <= b <= 0x7E:
            assert out == chr(b) + "\n"
        elif b == 0x0A:
            assert out == "\\0A\n\n"
        else:
            assert out == "\\%02X\n" % b


def test_line_break_after_passing_80_columns():
    assert render(b"a" * 80) == "a" * 80 + "\n"
    assert render(b"a" * 81) == "a" * 81 + "\n\n"
    assert render(b"a" * 82) == "a" * 81 + "\n" + "a" + "\n"
    assert render(b"a" * 163) == "a" * 81 + "\n" + "a" * 81 + "\n" + "a" + "\n"
    # Escapes count three columns, a doubled backslash two.
    assert render(b"\x01" * 26 + b"abc") == "\\01" * 26 + "abc" + "\n\n"
    assert render(b"\x01" * 27 + b"x") == "\\01" * 27 + "\n" + "x" + "\n"
    assert render(b"\\" * 41) == "\\\\" * 41 + "\n\n"
    assert render(b"\\" * 40 + b"z") == "\\\\" * 40 + "z" + "\n\n"
    assert render(b"\\" * 39 + b"zz") == "\\\\" * 39 + "zz" + "\n"
    # A newline resets the column count.
    assert render(b"a" * 79 + b"\n" + b"b" * 81) == "a" * 79 + "\\0A\n" + "b" * 81 + "\n\n"


def test_accepts_memoryview_and_bytearray():
    buf = bytearray(b"xx\x00yy")
    assert render(memoryview(buf)[1:4]) == render(bytes(buf[1:4])) == "x\\00y\n"


def test_dump_header():
    assert dump("->", b"hi\n") == "-> 3\nhi\\0A\n\n"
    assert dump("-<", memoryview(b"ok")) == "-< 2\nok\n"
    assert dump("->", b"") == "-> 0\n\n"


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def test_packet_dump_end_to_end(balance, backends, tmp_path):
    """``balance -fp``: each read as a header and its rendering, ``-> 0`` at client EOF."""
    echo = backends(mode="echo")
    port = free_port()
    # stdout goes to a file: a pipe nobody reads would fill up and stall the proxy.
    dump_file = tmp_path / "dump.out"
    with open(dump_file, "wb") as sink:
        proc = balance.start("-p", str(port), echo.spec, port=port, stdout=sink)
    request = b"hello\\world\x00\r\n"
    bulk = bytes(range(256)) * 800          # 200 KB: -p must not switch to splice
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        assert _recv_exactly(s, len(request)) == request
        s.sendall(bulk)
        assert _recv_exactly(s, len(bulk)) == bulk
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    _, err = proc.stop()
    out = dump_file.read_text()
    assert "Traceback" not in err
    first = "-> 14\nhello\\\\world\\00\\0D\\0A\n\n-< 14\nhello\\\\world\\00\\0D\\0A\n\n"
    assert out.startswith(first), out[:300]
    assert out.endswith("-> 0\n\n"), out[-300:]
    # Decoding the dump gives back every byte, in order, in both directions.
    up, down = _undump(out)
    assert up == down == request + bulk


def _undump(out: str) -> tuple[bytes, bytes]:
    """Parse a ``-p`` dump back into the bytes of each direction."""
    streams = {"->": bytearray(), "-<": bytearray()}
    lines = out.split("\n")
    i = 0
    while i < len(lines) - 1:
        arrow, count = lines[i].split(" ")
        size = int(count)
        i += 1
        body = bytearray()
        while len(body) < size:
            body += _unescape(lines[i])
            i += 1
        assert len(body) == size
        # The final newline leaves an empty line when the rendering had just
        # broken its line (after \0A, past 80 columns) or was empty ("-> 0").
        if lines[i] == "":
            i += 1
        streams[arrow] += body
    return bytes(streams["->"]), bytes(streams["-<"])


def _unescape(text: str) -> bytes:
    out = bytearray()
    j = 0
    while j < len(text):
        if text[j] == "\\":
            if text[j + 1] == "\\":
                out.append(0x5C)
                j += 2
            else:
                out.append(int(text[j + 1:j + 3], 16))
                j += 3
        else:
            out.append(ord(text[j]))
            j += 1
    return bytes(out)
