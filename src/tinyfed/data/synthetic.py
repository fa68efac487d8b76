"""A small image-classification set made in memory: tests and demos run without any download.

Ten classes of 1×28×28 images (MNIST-shaped, so the same models fit). Each class has a smooth
prototype made of a few Gaussian blobs; an example is its prototype shifted by a few pixels,
with random contrast, a faint copy of another class's prototype, and pixel noise. A small MLP
learns it well above chance, but not perfectly. The seed is fixed, independent of any run's
seed, so the set is the same on every machine.
"""

from __future__ import annotations

import numpy as np

SEED = 20170217
NUM_CLASSES = 10
SIDE = 28
MAX_SHIFT = 3
BLOBS = 4
NOISE = 0.22
DISTRACTOR = 0.45


def _prototypes(rng: np.random.Generator) -> np.ndarray:
    """NUM_CLASSES smooth patterns in [0, 1] on a canvas MAX_SHIFT wider on every side."""
    side = SIDE + 2 * MAX_SHIFT
    grid = np.arange(side, dtype=np.float64) - MAX_SHIFT
    protos = np.zeros((NUM_CLASSES, side, side))
    for c in range(NUM_CLASSES):
        cy, cx = rng.uniform(4, SIDE - 4, size=(2, BLOBS))
        width = rng.uniform(2.0, 5.0, size=BLOBS)
        sign = rng.choice([1.0, 1.0, -0.6], size=BLOBS)
        dy = (grid[None, :] - cy[:, None]) ** 2  # BLOBS × side
        dx = (grid[None, :] - cx[:, None]) ** 2
        blobs = np.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * width[:, None, None] ** 2))
        field = np.tensordot(sign, blobs, axes=1)
        protos[c] = (field - field.min()) / (field.max() - field.min())
    return protos.astype(np.float32)


def make_synthetic(
    size: int,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train uint8 N×1×28×28, labels), (test, labels)) with N=size and size//5 test examples."""
    rng = np.random.default_rng(SEED)
    protos = _prototypes(rng)
    n = size + size // 5
    # Balanced classes in each split (within one example per class), in a seeded order.
    y = np.concatenate([rng.permutation(np.arange(m) % NUM_CLASSES) for m in (size, size // 5)])
    other = (y + rng.integers(1, NUM_CLASSES, size=n)) % NUM_CLASSES
    oy, ox = rng.integers(0, 2 * MAX_SHIFT + 1, size=(2, n))
    rows = (oy[:, None] + np.arange(SIDE))[:, :, None]
    cols = (ox[:, None] + np.arange(SIDE))[:, None, :]
    own = protos[y[:, None, None], rows, cols]
    distract = protos[other[:, None, None], rows[:, ::-1], cols]  # flipped: not a shifted copy
    contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1)).astype(np.float32)
    x = rng.standard_normal(size=(n, SIDE, SIDE), dtype=np.float32)
    x *= NOISE
    x += contrast * own
    x += DISTRACTOR * distract
    x *= 255.0 / (1.0 + DISTRACTOR)
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8)[:, None]
    labels = y.astype(np.int64)
    return (images[:size], labels[:size]), (images[size:], labels[size:])
