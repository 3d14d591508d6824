"""The C allocator's settings for the agent (glibc's malloc; elsewhere nothing is changed).

glibc serves an allocation above its mmap threshold with a mapping of its own, returned to the system when
freed. The threshold is dynamic by default: freeing such a mapping raises it to that size (up to 32 MiB), so
after the first large list page is decoded and dropped, every later block of up to that size comes from the
heap, where the long-lived state of a large sync lands between the freed holes and keeps them resident.
A low fixed threshold keeps large, short-lived blocks (list pages, the tables of growing dicts) out of the heap
while the first sync builds the agent's state: 2.5 MiB less at its peak at 10,000 Services x 10 endpoints
(docs/operations.md, "Where the memory goes"). Once synced, the threshold is raised (settle_allocator): a
change's sync copies tables of a few hundred KiB, which a mapping each would fault in page by page (a
millisecond a sync at that size); from the heap they reuse what the previous sync freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("bpflb.allocator")

M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024    # glibc's default starting value, kept fixed until the first sync is done
MMAP_THRESHOLD_SYNCED = 4 * 1024 * 1024     # after it


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def tune_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (at start, before other threads run: MMAP_THRESHOLD). False (nothing
    changed) where the C library has no such setting (musl, say)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; the allocator keeps its defaults")
    return done


def settle_allocator() -> bool:
    """After the first complete sync: the threshold for the changes that follow (MMAP_THRESHOLD_SYNCED)."""
    return tune_allocator(MMAP_THRESHOLD_SYNCED)
