"""Small, learnable test data on disk, made without network access.

Reused across the test suite (import it as ``from datagen import ...``; pytest puts tests/ on
sys.path). Everything is deterministic for a seed.

* `make_block_images(n, seed)` -- (images uint8 (n, 28, 28), labels uint8 (n,)): class k is a
  bright 7x7 block at its own position (10 positions) over dim noise, so a tiny model learns
  it in a few steps.
* `write_idx_file(path, array)` -- one IDX file (images 3-D or labels 1-D, uint8), gzipped when
  the path ends in ``.gz``.
* `write_idx_dataset(root, name, ...)` -- a full torchvision raw layout under ``root/name/raw``
  (train + t10k images and labels); pass ``root`` as ``DataSpec.data_dir`` / ``--data-dir``.
* `write_npz(path, x, y)` -- an ``.npz`` data file with arrays ``x`` and ``y``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGE_SIZE = 28
NUM_CLASSES = 10
BLOCK = 7

# Top-left corners of each class's bright block: the first 10 cells (row-major) of a 4x4 grid
# of 7x7 cells.
BLOCK_CORNERS = [(r * BLOCK, c * BLOCK) for r in range(4) for c in range(4)][:NUM_CLASSES]

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def make_block_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` 28x28 uint8 images and their labels (0..9, balanced round-robin, then shuffled).

    Background: uniform noise 0..40. Class k: a 7x7 block of values 200..255 at corner
    ``BLOCK_CORNERS[k]``. Returns (images (n, 28, 28) uint8, labels (n,) uint8).
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % NUM_CLASSES).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 41, size=(n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = BLOCK_CORNERS[int(k)]
        images[i, r : r + BLOCK, c : c + BLOCK] = rng.integers(
            200, 256, size=(BLOCK, BLOCK), dtype=np.uint8
        )
    return images, labels


def write_idx_file(path: Path, array: np.ndarray) -> Path:
    """Write `array` (uint8; 3-D images or 1-D labels) as an IDX file; gzip if path ends .gz."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        magic = IDX_IMAGES_MAGIC
    elif array.ndim == 1:
        magic = IDX_LABELS_MAGIC
    else:
        raise ValueError(f"IDX arrays here are 3-D images or 1-D labels, got shape {array.shape}")
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_idx_dataset(
    root: Path,
    name: str = "FashionMNIST",
    n_train: int = 256,
    n_test: int = 64,
    gz: bool = True,
    seed: int = 0,
) -> Path:
    """Write a learnable dataset in the torchvision raw layout and return its raw folder.

    Files: ``root/name/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` added when
    `gz`). `name` is the folder torchvision uses: ``"FashionMNIST"`` or ``"MNIST"``. Images
    come from `make_block_images` (train with `seed`, test with `seed + 1`). Open it with
    ``DataSpec("fashionmnist", data_dir=root)`` (or ``"mnist"``).
    """
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = make_block_images(n, s)
        write_idx_file(raw / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx_file(raw / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return raw


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write an ``.npz`` data file holding arrays ``x`` and ``y`` exactly as given; return path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.asarray(x), y=np.asarray(y))
    return path
