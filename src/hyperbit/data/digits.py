"""scikit-learn's bundled 8x8 handwritten digits: the vision transformer's embedded default data.

1,797 grey-scale images of the digits 0-9 (8 x 8 pixels, values 0..16) ship inside scikit-learn
itself, so they load offline. The split is fixed: a permutation drawn once with seed 0, the last
:data:`TEST_IMAGES` images are the test set, the rest train. Pixels are scaled to [0, 1].
scikit-learn is the optional extra ``hyperbit[vision]``; without it loading is a one-line DataError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

DIGITS = "digits"  # the name data.path uses for this set
TEST_IMAGES = 360  # 20 % of 1,797
SPLITS = ("train", "test")


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` float32 in [0, 1] and their labels ``(N,)`` int64."""

    images: Tensor
    labels: Tensor
    n_classes: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch_rows(self, step: int, batch_size: int, seed: int = 0) -> Tensor:
        """The image indices of batch ``step``: a deterministic sampler (the same (seed, step) gives
        the same batch on every machine and after a resume), without replacement within a batch."""
        if batch_size > len(self):
            raise DataError(f"batch_size={batch_size} is larger than the {len(self)} images of the set")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randperm(len(self), generator=g)[:batch_size]

    def get_batch(self, step: int, batch_size: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Images ``(batch_size, C, H, W)`` and labels of batch ``step`` (:meth:`batch_rows`)."""
        rows = self.batch_rows(step, batch_size, seed)
        return self.images[rows], self.labels[rows]

    def iter_eval_batches(self, batch_size: int, max_batches: int | None = None
                          ) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole set in order, ``batch_size`` images at a time (the last batch may be smaller)."""
        for i, start in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def load_image_data(path: str) -> tuple[ImageSet, ImageSet]:
    """The train and test sets ``data.path`` names for a vision transformer (only ``digits``)."""
    if path != DIGITS:
        raise DataError(f"data.path={path!r}: a vision transformer (model.arch=vit) trains on "
                        f"data.path={DIGITS!r}, scikit-learn's 8x8 digits")
    return load_digits("train"), load_digits("test")


def load_digits(split: str) -> ImageSet:
    """The ``"train"`` (1,437 images) or ``"test"`` (360 images) part of the fixed split."""
    if split not in SPLITS:
        raise DataError(f"digits split {split!r} is not one of {list(SPLITS)}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'hyperbit[vision]'") from None
    bunch = sklearn_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # (1797, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    rows = order[:-TEST_IMAGES] if split == "train" else order[-TEST_IMAGES:]
    return ImageSet(torch.from_numpy(images[rows]).unsqueeze(1).contiguous(),
                    torch.from_numpy(labels[rows]), n_classes=10)
