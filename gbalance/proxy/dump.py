"""The ``-p`` packet dump: a readable rendering of every chunk forwarded.

Format (as balance prints it): a header line ``-> N`` (client to server) or
``-< N`` (server to client), then the bytes with printable ASCII as is, a
backslash doubled and any other byte as ``\\XX`` (upper-case hex).  A real
newline follows ``\\0A`` and is also inserted once a line passes 80
characters; every dump ends with a newline.
"""

from __future__ import annotations

_TOKENS = []
for _b in range(256):
    if _b == 0x5C:
        _TOKENS.append("\\\\")
    elif 0x20 <= _b <= 0x7E:
        _TOKENS.append(chr(_b))
    else:
        _TOKENS.append("\\%02X" % _b)


def render(data: bytes | bytearray | memoryview) -> str:
    """Render one chunk's bytes (without the header line)."""
    out = []
    col = 0
    for b in bytes(data):
        tok = _TOKENS[b]
        out.append(tok)
        col += len(tok)
        if b == 0x0A:
            out.append("\n")
            col = 0
        if col > 80:
            out.append("\n")
            col = 0
    out.append("\n")
    return "".join(out)


def dump(direction: str, data: bytes | bytearray | memoryview) -> str:
    """Header plus rendering; ``direction`` is ``"->"`` or ``"-<"``."""
    return f"{direction} {len(data)}\n{render(data)}"
