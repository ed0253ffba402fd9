"""A worker process of `workers > 1` ends with the process that started it.

uvicorn's supervisor stops its workers when it is stopped, but not when it is killed (kill -9,
the OOM killer): the workers keep the shared socket and go on serving as orphans, with nobody to
restart or stop them. Each worker asks the kernel for SIGTERM when its parent dies (Linux's
PR_SET_PDEATHSIG; elsewhere a thread watches the parent's pid), and then shuts down as on any
SIGTERM: it stops listening at once and finishes what it is answering.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PARENT_ENV = "THAW_SERVE_PARENT"  # the supervisor's pid, which its workers check
PR_SET_PDEATHSIG = 1
WATCH_S = 0.5


def die_with_parent(parent: int) -> None:
    """SIGTERM to this process once `parent` is gone (at once, if it already is)."""
    if sys.platform == "linux":
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        threading.Event().wait(WATCH_S)
    os.kill(os.getpid(), signal.SIGTERM)
