"""tnopt/allocator.py: the command line fixes glibc's mmap threshold, so freed large arrays go back to
the system instead of staying resident after glibc's dynamic threshold has risen past them."""

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

# In a fresh process: free one 24 MiB array (glibc's dynamic threshold rises to 24 MiB; it stops at
# 32 MiB), then hold a 16 MiB one: without a fixed threshold it comes from the heap, with it from its
# own mapping.
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
before = libc.mallinfo2().hblkhd
held = np.ones(16 << 17)
print(int(fixed), libc.mallinfo2().hblkhd - before)
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        return allocator._glibc() is not None and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


def _probe(mode: str) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV_VARIABLE}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's mallopt/mallinfo2 only (not this C library)")
def test_fixed_threshold_maps_large_arrays_after_a_larger_one_was_freed():
    fixed, mapped = _probe("fixed")
    assert fixed == 1
    assert mapped >= 16 << 20  # its own mapping: unmapped (returned) when freed
    unset, mapped = _probe("default")
    assert unset == 0 and mapped == 0  # glibc's dynamic threshold: the heap holds it (and keeps it)


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
