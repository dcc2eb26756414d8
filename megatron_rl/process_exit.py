"""Ending a process without the interpreter's teardown (the CLI, the reward workers)."""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End the process with `code` once its work is done: the atexit handlers run (logging, Ray, multiprocessing)
    and the standard streams are flushed, but the interpreter's teardown of every loaded module is skipped. A
    command that ran torch, transformers and Ray spends ~1.5 s of a 2-core machine on that teardown, which frees
    nothing the process exit does not (tools/BENCHMARKS.md, "Start-up and shutdown"); a reward worker ~0.15 s each.
    Falls back to a normal exit while a non-daemon thread still runs (a normal exit waits for it)."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to flush to
            pass
    os._exit(code)
