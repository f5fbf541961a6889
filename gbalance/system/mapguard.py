"""Surviving a state file that is cut short while it is mapped.

A process reading a mapped file past its end gets ``SIGBUS``, and the
default action kills it: a state file's owner could kill the master (or
root's ``balance -c show``) with one ``truncate``.  Python's own signal
handlers cannot help (they run later, the faulting read would repeat
forever), so :func:`guard` installs a native handler through ``ctypes``
once per process.  When a fault falls inside a guarded mapping it makes the
page readable again and returns, and the read is repeated:

* a mapping of a writable file: the file is grown back to its size
  (``ftruncate``), so every process mapping it shares the same pages again
  (what the truncation discarded reads as zeros: no groups, no channels);
* a read-only mapping: the rest of it is replaced by zero pages of this
  process's own.

Any other ``SIGBUS`` keeps its default action.  Nothing runs on the hot
path: the handler only runs on a fault.  On platforms whose ``siginfo`` and
``sigaction`` layouts are not known here (anything but 64-bit Linux),
:func:`guard` does nothing.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import ctypes
import mmap
import signal
import sys

_SA_SIGINFO = 0x4
_SA_NODEFER = 0x40000000
_MAP_FIXED = 0x10
_SUPPORTED = sys.platform.startswith("linux") and ctypes.sizeof(ctypes.c_void_p) == 8


class _SigInfo(ctypes.Structure):
    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad", ctypes.c_int), ("si_addr", ctypes.c_void_p)]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(_SigInfo), ctypes.c_void_p)


class _SigAction(ctypes.Structure):
    _fields_ = [("sa_sigaction", _HANDLER), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


#: base address -> (size, fd, writable) of every guarded mapping.
_maps: dict[int, tuple[int, int, bool]] = {}
_installed: list = []     # keeps the handler (and libc) alive while installed
#: How many faults were repaired (for the log and tests).
repaired = 0


def _address(mm: mmap.mmap) -> int:
    """The address of a mapping (read-only ones too: ctypes' from_buffer needs a writable one)."""
    view = _PyBuffer()
    obj = ctypes.py_object(mm)
    if ctypes.pythonapi.PyObject_GetBuffer(obj, ctypes.byref(view), 0) != 0:
        raise OSError("no buffer")
    try:
        return view.buf
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def _on_sigbus(signo: int, info, context) -> None:
    global repaired
    libc = _installed[1]
    addr = info.contents.si_addr or 0
    for base, (size, fd, writable) in _maps.items():
        if base <= addr < base + size:
            if writable and libc.ftruncate(fd, size) == 0:
                repaired += 1
                return
            page = addr & ~(mmap.PAGESIZE - 1)
            done = libc.mmap(page, base + size - page, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
            if done == page:
                repaired += 1
                return
            break
    # Not ours (or not repairable): the default action, at the repeated fault.
    libc.signal(signal.SIGBUS, ctypes.c_void_p(0))


def _install() -> bool:
    if _installed:
        return True
    libc = ctypes.PyDLL(None, use_errno=True)   # calls that keep the GIL: no other thread runs
    libc.ftruncate.argtypes = [ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_SigAction), ctypes.c_void_p]
    handler = _HANDLER(_on_sigbus)
    action = _SigAction()
    action.sa_sigaction = handler
    action.sa_flags = _SA_SIGINFO | _SA_NODEFER
    if libc.sigaction(signal.SIGBUS, ctypes.byref(action), None) != 0:
        return False
    _installed[:] = [handler, libc, action]
    return True


def guard(mm: mmap.mmap, size: int, fd: int, writable: bool) -> int:
    """Repair faults in ``mm`` (``size`` bytes of file ``fd``) instead of dying; its address (0 = not guarded)."""
    if not _SUPPORTED:
        return 0
    try:
        base = _address(mm)
        if not _install():
            return 0
    except (OSError, AttributeError, ValueError):
        return 0
    _maps[base] = (size, fd, writable)
    return base


def unguard(base: int) -> None:
    """Forget a mapping (before it is unmapped)."""
    _maps.pop(base, None)
