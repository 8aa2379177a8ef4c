"""tnopt/allocator.py: the command line fixes glibc's mmap threshold, so freed large arrays go back to
the system instead of staying resident after glibc's dynamic thresholds have risen past them."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, init, make_model, planted_matrix, tensor
from onnx import helper

from tnopt import allocator

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: free one 24 MiB array (glibc's dynamic thresholds rise: mmap to 24 MiB, trim to
# 48 MiB), then allocate and free a 16 MiB one, which comes from the heap either way. With the fixed
# threshold the heap hands it back when it is freed; with glibc's dynamic one the heap keeps it.
PROBE = """
import ctypes, sys
import numpy as np
from tnopt import allocator
class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None); libc.mallinfo2.restype = Info
fixed = allocator.return_freed_memory() if sys.argv[1] == "fixed" else False
big = np.ones(24 << 17); del big
before = libc.mallinfo2().arena
held = np.ones(16 << 17)
heap_grew = libc.mallinfo2().arena - before
del held
print(int(fixed), heap_grew, libc.mallinfo2().arena - before)
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        return allocator._glibc() is not None and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


def _probe(mode: str) -> tuple[int, int, int]:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV_VARIABLE}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    ).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's mallopt/mallinfo2 only (not this C library)")
def test_fixed_threshold_returns_a_freed_heap_array_after_a_larger_one_was_freed():
    # The heap's growth is the array's 16 MiB less whatever was already free at its top (a few KiB to
    # tens of KiB, which varies by machine), and ~0 where the array was mapped on its own: judge against
    # the middle, 12 MiB, never against the exact size.
    fixed, grew, kept = _probe("fixed")
    assert fixed == 1
    assert grew >= 12 << 20  # below the fixed threshold: from the heap ...
    assert kept < 1 << 20  # ... and given back when freed
    unset, grew, kept = _probe("default")
    assert unset == 0 and grew >= 12 << 20
    assert kept >= 12 << 20  # glibc's dynamic trim threshold (48 MiB by now): the heap keeps it


def test_the_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv(allocator.ENV_VARIABLE, "4194304")
    assert allocator.return_freed_memory() is False


def test_the_command_line_fixes_the_threshold(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "return_freed_memory", lambda *a: calls.append(a) or True)
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")],
        [tensor("x", ["N", 32])],
        [tensor("y", ["N", 24])],
        [init("w", planted_matrix(32, 24, 4))],
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    result = cli(path, "-o", tmp_path / "out.onnx", "--rank-ratio", "0.5", "-q")
    assert result.returncode == 0, result.stderr
    assert calls == [()]
    # ... but not before the options and files are validated (no work for a bad command).
    calls.clear()
    assert cli(path, "-o", path, "--rank-ratio", "0.5").returncode == 2  # would overwrite the input
    assert calls == []
