import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(Path(__file__).parent))

REFERENCE_MODELS = ["fc2", "lenet5", "cnn4", "vgg", "resnet"]


def subset_npz(source: Path, target: Path, start: int, count: int) -> Path:
    with np.load(source) as archive:
        np.savez(target, **{k: archive[k][start : start + count] for k in archive.files})
    return target


@pytest.fixture(scope="session")
def small_splits(tmp_path_factory):
    """256 calibration and 512 evaluation samples of the committed (disjoint) splits."""
    folder = tmp_path_factory.mktemp("splits")
    return (
        subset_npz(MODELS / "calib.npz", folder / "calib.npz", 0, 256),
        subset_npz(MODELS / "eval.npz", folder / "eval.npz", 0, 512),
    )
