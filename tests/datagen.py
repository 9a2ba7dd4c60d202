"""Small, learnable test data on disk, made without network access.

Reused across the test suite (import it as ``from datagen import ...``; pytest puts tests/ on
sys.path). Everything is deterministic for a seed.

* `make_block_images(n, seed)` -- (images uint8 (n, 28, 28), labels uint8 (n,)): class k is a
  bright 7x7 block at its own position (10 positions) over dim noise, so a tiny model learns
  it in a few steps.
* `make_template_images(n, seed)` -- the same layout, harder: class k is a smooth random
  grey-level pattern (like a garment's silhouette and texture) at a random shift of up to 2 px,
  plus noise, in 0..255 (mean ~110, std ~50). Raw, these behave like raw FashionMNIST pixels: an
  MLP at lr 0.5 (SGD, momentum 0.9) diverges, and scaling alone is not enough at that lr.
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


def make_template_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` 28x28 uint8 images and labels (0..9, balanced, shuffled): per class a smooth random
    pattern (a 7x7 grid of normal values, bilinearly upsampled), shifted by up to 2 px, plus
    noise, mapped to grey levels around 110 (std ~50) and clipped to 0..255."""
    rng = np.random.default_rng(seed)
    pad = 2
    side = IMAGE_SIZE + 2 * pad
    coarse = rng.normal(size=(NUM_CLASSES, 7, 7))
    grid = np.linspace(0, 6, side)
    lo = np.floor(grid).astype(int).clip(0, 5)
    frac = grid - lo
    rows = coarse[:, lo] * (1 - frac)[None, :, None] + coarse[:, lo + 1] * frac[None, :, None]
    templates = rows[:, :, lo] * (1 - frac) + rows[:, :, lo + 1] * frac
    templates = (templates - templates.mean(axis=(1, 2), keepdims=True)) / templates.std(
        axis=(1, 2), keepdims=True
    )
    labels = (np.arange(n) % NUM_CLASSES).astype(np.uint8)
    rng.shuffle(labels)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, k in enumerate(labels):
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        crop = templates[int(k), dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
        noisy = 0.8 * crop + 0.6 * rng.normal(size=crop.shape)
        images[i] = np.clip(np.round(110 + 50 * noisy), 0, 255).astype(np.uint8)
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
    images: str = "blocks",
) -> Path:
    """Write a learnable dataset in the torchvision raw layout and return its raw folder.

    Files: ``root/name/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` added when
    `gz`). `name` is the folder torchvision uses: ``"FashionMNIST"`` or ``"MNIST"``. Images
    come from `make_block_images` (``images="blocks"``) or `make_template_images`
    (``images="templates"``), train with `seed`, test with `seed + 1`. Open it with
    ``DataSpec("fashionmnist", data_dir=root)`` (or ``"mnist"``).
    """
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        make = make_template_images if images == "templates" else make_block_images
        pixels, labels = make(n, s)
        write_idx_file(raw / f"{prefix}-images-idx3-ubyte{ext}", pixels)
        write_idx_file(raw / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return raw


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write an ``.npz`` data file holding arrays ``x`` and ``y`` exactly as given; return path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.asarray(x), y=np.asarray(y))
    return path
