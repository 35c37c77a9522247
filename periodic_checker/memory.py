"""Memory the process freed, given back to the system.

glibc's allocator keeps what a process frees for its next allocations: after a start-up that
made and dropped hundreds of megabytes (100,000 task records read, decoded and written), that
stays in the process's resident memory, though nothing uses it, until something asks for it
again. `malloc_trim(0)` hands back every free page at once; it is glibc's own (elsewhere, such
as musl, there is nothing to call and nothing is done).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return None


def give_back_free_memory() -> bool:
    """Return the free pages of the heap to the system; whether there was a way to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
