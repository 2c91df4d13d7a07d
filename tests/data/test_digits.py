import sys

import pytest
import torch

from hyperbit.data import DataError
from hyperbit.data.digits import TEST_IMAGES, load_digits


def test_fixed_split_sizes_ranges_and_disjointness():
    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1797 - TEST_IMAGES, TEST_IMAGES)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.float32
    for s in (train, test):
        assert float(s.images.min()) == 0.0 and float(s.images.max()) == 1.0
        assert set(s.labels.tolist()) == set(range(10))
    # no test image is a train image (the split is over images; a few digits are pixel-identical,
    # so compare the index sets through the deterministic split instead of the pixels)
    key = lambda s: {tuple(r) for r in (s.images.flatten(1) * 16).round().long().tolist()}
    assert len(key(test) - key(train)) > 0.9 * len(key(test))
    assert torch.equal(load_digits("test").labels, test.labels)  # the split is fixed


def test_batches_are_deterministic_and_distinct():
    train = load_digits("train")
    a, b = train.get_batch(3, 32, seed=1), train.get_batch(3, 32, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = train.get_batch(4, 32, seed=1)
    assert not torch.equal(a[0], c[0])
    assert len(set(map(tuple, a[0].flatten(1).tolist()))) >= 30  # no repeats within a batch (up to twins)
    seen = sum(len(y) for _, y in load_digits("test").iter_eval_batches(100))
    assert seen == TEST_IMAGES


def test_bad_split_and_missing_scikit_learn(monkeypatch):
    with pytest.raises(DataError, match="split 'val'"):
        load_digits("val")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"scikit-learn: pip install 'hyperbit\[vision\]'"):
        load_digits("train")
