"""tnopt's numpy work takes every core only while the rest of the machine leaves them idle
(tnopt/threads.py), and no onnxruntime session spins between runs (tnopt/runtime.py)."""

import pytest

from tnopt import threads
from tnopt.graph import probe_model
from tnopt.runtime import Runtime


def test_others_busy_cores_subtracts_this_process():
    # 2 CPUs, 100 wall ticks: the machine was busy 200 CPU ticks, all of them this process's.
    assert threads.others_busy_cores((100, 400), 0, (300, 600), 200, cpus=2) == 0.0
    # ... of which this process used 50: the others kept 1.5 cores busy.
    assert threads.others_busy_cores((100, 400), 0, (300, 600), 50, cpus=2) == pytest.approx(1.5)


@pytest.fixture
def fake_proc(monkeypatch):
    """A machine of 2 cores whose /proc readings and clock the test sets."""
    readings = {"machine": (0, 0), "own": 0, "now": 0.0}
    monkeypatch.setattr(threads, "_state", {"at": None, "machine": None, "own": None, "threads": 1})
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "_machine_ticks", lambda: readings["machine"])
    monkeypatch.setattr(threads, "_own_ticks", lambda: readings["own"])
    monkeypatch.setattr(threads.time, "monotonic", lambda: readings["now"])
    monkeypatch.delenv("TNOPT_MATH_THREADS", raising=False)
    return readings


def test_every_core_only_while_the_others_leave_them_idle(fake_proc):
    assert threads.choose_threads() == 1  # the first look has nothing to compare with
    # 1 s later: this process used 1 core, nobody else anything.
    fake_proc.update(machine=(100, 200), own=100, now=1.0)
    assert threads.choose_threads() == 2
    # Within LOOK_EVERY_S the decision stands without reading /proc again.
    fake_proc.update(machine=(400, 400), own=100, now=1.1)
    assert threads.choose_threads() == 2
    # Another process kept a core busy since the last look: back to one thread.
    fake_proc.update(machine=(500, 600), own=200, now=2.0)
    assert threads.choose_threads() == 1


def test_unreadable_proc_and_the_override(fake_proc, monkeypatch):
    monkeypatch.setattr(threads, "_machine_ticks", lambda: None)
    fake_proc.update(now=5.0)
    assert threads.choose_threads() == 1
    monkeypatch.setenv("TNOPT_MATH_THREADS", "3")
    assert threads.choose_threads() == 3


def test_no_session_spins_between_runs():
    runtime = Runtime("cpu")
    for timing in (False, True):
        options = runtime.session(probe_model(), timing=timing).get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_small_matrices_stay_on_one_thread(fake_proc, monkeypatch):
    monkeypatch.setattr(threads, "counts", {})
    threads.choose_threads()
    fake_proc.update(machine=(100, 200), own=100, now=1.0)  # the others idle: every core
    with threads.math_threads(threads.MIN_PARALLEL_SIZE - 1):
        pass
    with threads.math_threads(threads.MIN_PARALLEL_SIZE):
        pass
    assert threads.counts == {1: 1, 2: 1}
