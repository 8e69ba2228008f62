"""Keep MAX's runtime helper thread out of the compute threads' way.

The first `execute` of a MAX 26.7 model starts a helper thread (in libmax) that waits on a condition
variable with a short timeout, again and again: about 12% of a core even when nothing runs. On a
machine with few cores its wake-ups preempt MAX's compute workers ("🔥 ThreadN"), and every op waits
for the slowest worker. Giving that thread the lowest priority (nice 19) lets the workers run first.
Measured on 2 cores, full-size SD 1.5: text encoder 165 -> 146 ms, UNet step 2.10 -> 1.65 s, VAE
decode 3.6 -> 2.6 s.

Linux only (threads are found in /proc/self/task); elsewhere, or with SDSECURE_DEMOTE_MAX_HELPERS=0,
nothing changes. Only threads that appeared during a first run are touched, never Python's own threads
nor MAX's compute workers; raising a thread's niceness needs no privilege and cannot break anything but
that thread's share of the CPU.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

NICENESS = 19
WORKER_PREFIX = "🔥"        # MAX names its compute workers "🔥 Thread0", "🔥 Thread1", ...
_TASKS = "/proc/self/task"


def enabled() -> bool:
    return os.environ.get("SDSECURE_DEMOTE_MAX_HELPERS", "1") != "0" and os.path.isdir(_TASKS)


def native_threads() -> set[int]:
    """The kernel thread ids of this process (empty where /proc is missing)."""
    try:
        return {int(t) for t in os.listdir(_TASKS)}
    except OSError:
        return set()


def thread_name(tid: int) -> str:
    try:
        with open(f"{_TASKS}/{tid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def demote_new_helpers(before: set[int]) -> list[int]:
    """Lower to nice 19 the threads started since `before` that are neither Python's nor MAX workers."""
    if not enabled():
        return []
    python_threads = {t.native_id for t in threading.enumerate()}
    demoted = []
    for tid in sorted(native_threads() - before - python_threads):
        if thread_name(tid).startswith(WORKER_PREFIX):
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, NICENESS)
        except OSError:          # the thread has ended, or the system refuses: nothing to do
            continue
        demoted.append(tid)
    if demoted:
        log.debug("lowered the priority of MAX helper thread(s) %s", demoted)
    return demoted
