"""What needs a real process: exit codes seen by a shell, Ctrl-C, a reader that closes the pipe.

These are the suite's only subprocess tests; every other CLI case runs in process through main(argv).
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
from conftest import MODELS, ROOT

LENET = MODELS / "lenet5.onnx"
VGG = MODELS / "vgg.onnx"


def start(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tnopt", *map(str, args)], cwd=ROOT, text=True, **kwargs)


def test_ctrl_c_leaves_nothing_behind(tmp_path, small_splits):
    calib, evaluation = small_splits
    out = tmp_path / "out.onnx"
    process = start(
        VGG,
        "-o",
        out,
        "--budget",
        "1%",
        "--data",
        calib,
        "--eval-data",
        evaluation,
        "--no-cache",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # Interrupt once the search has begun, told by its own progress line rather than a sleep: a
    # fixed wait was either too short on a loaded machine or outlasted LeNet's search on an idle one.
    # VGG's search takes minutes, so the interrupt surely lands inside it.
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("calibration statistics"):
            break
    assert process.poll() is None, "finished before it could be interrupted: " + "".join(seen)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert process.returncode == 130, stderr
    assert "interrupted; nothing written" in stderr and "Traceback" not in stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_inspect_survives_a_closed_pipe():
    process = start(
        "inspect", "--json", MODELS / "resnet.onnx", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before tnopt writes a byte (`| head -c 0`)
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def test_version_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "tnopt", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("tnopt ")


def boundary_samples(images: np.ndarray, count: int = 96, steps: int = 20):
    """Blends of two images the model classifies differently, bisected to within 2**-steps of the
    decision boundary; labelled with the model's own prediction. Any lossy rewrite flips many."""
    session = ort.InferenceSession(str(LENET), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x):
        return session.run(None, {name: x.astype(np.float32)})[0].argmax(1)

    predictions = predict(images)
    first, second = [], []
    for i in range(len(images)):
        j = next((j for j in range(i + 1, len(images)) if predictions[j] != predictions[i]), None)
        if j is not None:
            first.append(i)
            second.append(j)
        if len(first) == count:
            break
    a, b = images[first], images[second]
    low, high = np.zeros(len(a)), np.ones(len(a))
    start_class = predictions[first]
    for _ in range(steps):
        mid = (low + high) / 2
        same = predict(a + (b - a) * mid[:, None, None, None]) == start_class
        low, high = np.where(same, mid, low), np.where(same, high, mid)
    x = (a + (b - a) * low[:, None, None, None]).astype(np.float32)
    return x, predict(x)


def test_budget_missed_on_held_out_data_saves_the_model_and_exits_3(tmp_path, small_splits):
    calib, _ = small_splits
    with np.load(calib) as archive:
        images = archive["input"]
    x, labels = boundary_samples(images)
    evaluation = tmp_path / "boundary.npz"
    np.savez(evaluation, input=x, labels=labels)
    out = tmp_path / "out.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tnopt",
            str(LENET),
            "-o",
            str(out),
            "--budget",
            "2%",
            "--data",
            str(calib),
            "--eval-data",
            str(evaluation),
            "--cache",
            str(tmp_path / "c"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 3, result.stderr
    assert out.exists()
    assert "budget not met" in result.stderr and "saved the best model" in result.stderr
    assert "evaluation data" in result.stderr


def test_tnopt_never_imports_torch():
    # torch is for --heal only (imported inside tnopt/heal.py); a fresh interpreter shows it.
    code = (
        "import sys, tnopt.cli, tnopt.pipeline, tnopt.profile, tnopt.search, tnopt.validate; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
