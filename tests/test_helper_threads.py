"""engine.helper_threads: MAX's polling helper thread gets nice 19; Python threads and MAX's compute
workers keep their priority; the switch turns it off."""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sdsecure.engine import helper_threads

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="threads are found through /proc (Linux)")


def _native_thread(name: str | None = None):
    """A thread Python's `threading` does not know of, like the ones libraries start. Returns its id and
    the event that ends it."""
    started, stop, box = threading.Event(), threading.Event(), {}

    def body():
        box["tid"] = threading.get_native_id()
        if name:
            Path(f"/proc/self/task/{box['tid']}/comm").write_text(name)
        started.set()
        stop.wait(30)

    _thread.start_new_thread(body, ())
    assert started.wait(10)
    return box["tid"], stop


def test_a_new_native_thread_is_demoted() -> None:
    before = helper_threads.native_threads()
    tid, stop = _native_thread()
    try:
        assert tid not in before
        assert helper_threads.demote_new_helpers(before) == [tid]
        assert os.getpriority(os.PRIO_PROCESS, tid) == helper_threads.NICENESS
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0   # the caller keeps its own
    finally:
        stop.set()


def test_python_threads_workers_and_older_threads_are_left_alone() -> None:
    old_tid, old_stop = _native_thread()
    before = helper_threads.native_threads()
    worker_tid, worker_stop = _native_thread(helper_threads.WORKER_PREFIX + " Thread7")
    py_stop = threading.Event()
    py = threading.Thread(target=py_stop.wait, args=(30,))
    py.start()
    try:
        assert helper_threads.demote_new_helpers(before) == []
        for tid in (old_tid, worker_tid, py.native_id):
            assert os.getpriority(os.PRIO_PROCESS, tid) == 0
    finally:
        for ev in (old_stop, worker_stop, py_stop):
            ev.set()
        py.join()


def test_the_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDSECURE_DEMOTE_MAX_HELPERS", "0")
    before = helper_threads.native_threads()
    tid, stop = _native_thread()
    try:
        assert helper_threads.demote_new_helpers(before) == []
        assert os.getpriority(os.PRIO_PROCESS, tid) == 0
    finally:
        stop.set()


def test_a_max_session_demotes_the_helper_it_starts_and_nothing_else() -> None:
    # A fresh process: MAX starts its helper on the first execute of the process.
    code = textwrap.dedent("""
        import json, os
        import numpy as np
        from onnx import TensorProto, helper
        from sdsecure.engine import create_session
        from sdsecure.engine.helper_threads import native_threads, thread_name
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        s = create_session(m, {}, {"x": [4]}, backend="max", name="relu")
        out = s.run({"x": np.array([-1, 2, -3, 4], np.float32)})["y"]
        assert out.tolist() == [0, 2, 0, 4], out
        print(json.dumps([[thread_name(t), os.getpriority(os.PRIO_PROCESS, t), t == os.getpid()]
                          for t in sorted(native_threads())]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    threads = json.loads(out.stdout.strip().splitlines()[-1])
    workers = [t for t in threads if t[0].startswith(helper_threads.WORKER_PREFIX)]
    demoted = [t for t in threads if t[1] == helper_threads.NICENESS]
    assert workers and all(t[1] == 0 for t in workers), threads
    assert len(demoted) == 1 and not demoted[0][2], threads          # MAX 26.7's one helper, not the main thread
