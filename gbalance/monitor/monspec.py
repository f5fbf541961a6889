"""Parsing of balance.fm's ``-m`` monitoring specification.

Grammar (balance.fm): ``spec := kvpair (":" kvpair)*``, ``kvpair := key
["=" value]``; ``\\:`` is a literal colon.  Actions are ``connect`` (option
``timeout``) and ``command=string`` (option ``pass``); action options follow
their action.  Global options: ``interval``, ``noenable``, ``nodisable`` and
ours, ``rise``, ``fall`` and ``stagger`` (the delay before a parallel
connect to the next channel; 0 turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from gbalance.errors import EX_UNAVAILABLE, BalanceError

DEFAULT_INTERVAL = 60.0
DEFAULT_STAGGER = 0.25


class CheckKind(StrEnum):
    """What one monitoring action does (a str: ``-m`` spells it so)."""

    CONNECT = "connect"    # a TCP connect to the channel
    COMMAND = "command"    # a shell command, judged by its exit status


@dataclass
class Check:
    """One monitoring action in a chain."""

    kind: CheckKind
    timeout: float | None = None   # connect: None means the -t value
    command: str = ""              # command: with %H, %P, %% placeholders
    passes: tuple[int, ...] = (0,)


@dataclass
class MonitorSpec:
    """A parsed ``-m`` specification."""

    checks: list[Check] = field(default_factory=list)
    interval: float = DEFAULT_INTERVAL
    enable: bool = True     # passing checks re-enable soft-disabled channels
    disable: bool = True    # failing checks soft-disable channels
    rise: int = 1
    fall: int = 1
    stagger: float = DEFAULT_STAGGER


def _bad(msg: str) -> BalanceError:
    return BalanceError(f"invalid monitoring spec: {msg}", EX_UNAVAILABLE)


def split_pairs(text: str) -> list[str]:
    """Split at unescaped colons; ``\\:`` becomes ``:``."""
    pairs, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] == ":":
            cur.append(":")
            i += 2
            continue
        if ch == ":":
            pairs.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    pairs.append("".join(cur))
    return pairs


def _float(key: str, value: str | None, minimum: float = 0.0, strict: bool = True) -> float:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        number = None
    if number is None or number != number or number in (float("inf"),) or \
            (number <= minimum if strict else number < minimum):
        raise _bad(f"{key} needs a number {'above' if strict else 'of at least'} {minimum:g}, got {value!r}")
    return number


def _count(key: str, value: str | None) -> int:
    if value is None or not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise _bad(f"{key} needs a whole number of at least 1, got {value!r}")
    return int(value)


def parse_monitor(text: str) -> MonitorSpec:
    """Parse a ``-m`` argument or raise a :class:`BalanceError` (exit 69)."""
    spec = MonitorSpec()
    if not text.strip():
        raise _bad("empty specification")
    for pair in split_pairs(text):
        key, sep, value = pair.partition("=")
        key = key.strip()
        val = value if sep else None
        if not key:
            raise _bad("empty key (two colons in a row or a colon at an end?)")
        if key == CheckKind.CONNECT:
            if val is not None:
                raise _bad("unexpected value for 'connect'")
            spec.checks.append(Check(CheckKind.CONNECT))
        elif key == CheckKind.COMMAND:
            if not val or not val.strip():
                raise _bad("'command' action requires a value")
            spec.checks.append(Check(CheckKind.COMMAND, command=val))
        elif key == "timeout":
            if not spec.checks or spec.checks[-1].kind is not CheckKind.CONNECT:
                raise _bad("timeout must follow a connect action")
            spec.checks[-1].timeout = _float(key, val)
        elif key == "pass":
            if not spec.checks:
                raise _bad("'pass' option given without action")
            if spec.checks[-1].kind is not CheckKind.COMMAND:
                raise _bad("'pass' option unsupported for this action")
            words = (val or "").split(",")
            if all(w.strip().isascii() and w.strip().isdigit() for w in words):
                codes = tuple(int(w) for w in words)
            else:
                codes = ()
            if not codes or any(not 0 <= c <= 255 for c in codes):
                raise _bad(f"pass needs exit codes 0..255 separated by commas, got {val!r}")
            spec.checks[-1].passes = codes
        elif key == "interval":
            try:
                spec.interval = _float(key, val)
            except BalanceError:
                raise _bad(f"error parsing interval (a number of seconds above 0, got {val!r})")
        elif key in ("noenable", "nodisable"):
            if val is not None:
                raise _bad(f"{key} takes no value")
            if key == "noenable":
                spec.enable = False
            else:
                spec.disable = False
        elif key in ("rise", "fall"):
            setattr(spec, key, _count(key, val))
        elif key == "stagger":
            spec.stagger = _float(key, val, strict=False)
        else:
            raise _bad(f"unknown key {key!r}")
    if not spec.checks:
        raise _bad("no action (connect or command=...) given")
    return spec
