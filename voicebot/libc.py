"""The few glibc calls voicebot makes through ctypes: prctl and malloc_trim.

libc is resolved once, in the process that starts (the supervisor): a fork child must
not dlopen (it can deadlock on the loader's lock), and every child inherits the handle.
Off Linux/glibc every function here is a no-op that says so by returning None/False."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Any

_libc: Any = None

def libc() -> Any:
    """The C library's handle (ctypes), or False off Linux or when it cannot be loaded."""
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                _libc = False
    return _libc


def prctl() -> Callable[..., int] | None:
    """libc's prctl, or None."""
    lib = libc()
    return getattr(lib, "prctl", None) if lib else None


def malloc_trim() -> bool:
    """Give the heap's free pages back to the system; True if any were released.

    glibc keeps what a process freed for reuse, so its resident size stays at the peak it
    once reached: a worker whose calls turn over (four ending while four start) would
    hold the memory of eight forever. Trimming after call ends keeps it at what is in use.
    Costs about a millisecond per 100 MB of heap; never call it on the media thread."""
    lib = libc()
    trim = getattr(lib, "malloc_trim", None) if lib else None
    return bool(trim(0)) if trim is not None else False
