"""bench/budget.py's Fashion-MNIST training images: `load_all_train` (the deep-TN rows' `--deep-tn-images
all`) is the same seeded order as the unseen split, so the images vgg/resnet/cnn4 never saw are its
tail from 40,000 on, and the first 30,000 the ones vgg and resnet trained on."""

import sys

import numpy as np
import pytest
from conftest import MODELS

sys.path.insert(0, str(MODELS.parent / "bench"))
import budget as budget_bench  # noqa: E402


@pytest.mark.skipif(
    not (budget_bench.FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="apt-get install -y dataset-fashion-mnist",
)
def test_all_training_images_hold_the_unseen_split_at_its_offset():
    everything = budget_bench.load_all_train()
    unseen = budget_bench.load_unseen_train(64)
    assert everything["input"].shape == (60_000, 1, 28, 28) and everything["input"].dtype == np.float32
    assert np.array_equal(everything["input"][40_000:40_064], unseen["input"])
    assert np.array_equal(everything["labels"][40_000:40_064], unseen["labels"])
    assert np.bincount(everything["labels"]).tolist() == [6000] * 10  # every image once
    first = budget_bench.load_all_train(100)
    assert np.array_equal(first["input"], everything["input"][:100])
    # Normalised like models/calib.npz (mean 0.2860, std 0.3530 of the raw pixels).
    assert abs(float(everything["input"].mean())) < 0.01 and abs(float(everything["input"].std()) - 1) < 0.01
