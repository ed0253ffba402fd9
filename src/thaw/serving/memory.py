"""Memory that a freed image gives back: without this, the decode budget would bound what is
decoding at once but not what the process keeps.

glibc's malloc maps a large block on its own and unmaps it when freed, but it raises that
threshold (up to 32 MB) each time such a block is freed; from then on Pillow's image blocks come
from heaps, and each thread's heap keeps its high-water mark. The resident memory would ratchet
up with every decode thread that ever held a large image. A fixed threshold keeps every block
of 1 MB or more mapped on its own, so a decoded image's memory leaves with it.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
THRESHOLD = 1024 * 1024


def give_back_large_blocks() -> None:
    """Fix glibc's mmap threshold for this process (elsewhere, the allocator's own policy)."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass
