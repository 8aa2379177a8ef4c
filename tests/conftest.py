import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(Path(__file__).parent))

REFERENCE_MODELS = ["fc2", "lenet5", "cnn4", "vgg", "resnet"]

from contract import mlp, save  # noqa: E402  (tests/ is on sys.path only from here)


def budgeted_cnn4(calib: Path, evaluation: Path, **options):
    """tnopt.compress of cnn4 at a 2% budget on these calibration / evaluation files, CPU, no cache."""
    import tnopt

    return tnopt.compress(
        str(MODELS / "cnn4.onnx"),
        budget="2%",
        data=str(calib),
        eval_data=str(evaluation),
        provider="cpu",
        cache_dir=None,
        **options,
    )


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


@pytest.fixture
def model_path(tmp_path):
    return save(mlp(), tmp_path)


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.standard_normal((16, 32)).astype(np.float32), labels=rng.integers(0, 10, 16))
    return path
