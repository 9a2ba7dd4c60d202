"""The built-in image sets (``fashionmnist``, ``mnist``): IDX files in the torchvision raw
layout under the data folder, downloaded there first when missing (see
`netdoctor.data.download`)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from netdoctor.data.base import (
    Batch,
    DataSource,
    DataSpec,
    check_spec,
    default_data_dir,
    epoch_order,
    fmt_float,
    resize,
    resized_shape,
)
from netdoctor.errors import UserError

#: Built-in image sets: lower-case source name -> (folder name under the data dir, classes).
BUILTIN_SETS: dict[str, tuple[str, int]] = {
    "fashionmnist": ("FashionMNIST", 10),
    "mnist": ("MNIST", 10),
}
BUILTIN_ALIASES = {"fashion-mnist": "fashionmnist", "fashion_mnist": "fashionmnist"}

_NORMALIZE_STATS_SAMPLES = 10_000  # at most this many samples feed the mean/std estimate

_IDX_MAGIC = {"images": 2051, "labels": 2049}
_idx_cache: dict[tuple[str, int, int], np.ndarray] = {}


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) of unsigned bytes; UserError when corrupt."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if key in _idx_cache:
        return _idx_cache[key]
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path} is corrupt: cannot decompress it ({e})") from None

    expected_magic = _IDX_MAGIC[kind]
    expected_dims = 3 if kind == "images" else 1
    if len(data) < 4:
        raise UserError(f"{path} is corrupt: only {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise UserError(
            f"{path} is corrupt: bad magic number {magic} (expected {expected_magic} for IDX "
            f"{kind}); the file is damaged or not an IDX {kind} file"
        )
    header_len = 4 + 4 * expected_dims
    if len(data) < header_len:
        raise UserError(
            f"{path} is truncated: the IDX header needs {header_len} bytes, "
            f"the file has {len(data)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=expected_dims, offset=4))
    needed = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header_len
    if have < needed:
        raise UserError(
            f"{path} is truncated: header says {'x'.join(map(str, dims))} values "
            f"({needed} bytes), the file holds {have}"
        )
    arr = np.frombuffer(data, dtype=np.uint8, count=needed, offset=header_len).reshape(dims)
    while len(_idx_cache) >= 4:  # keep at most train + test images and labels
        _idx_cache.pop(next(iter(_idx_cache)))
    _idx_cache[key] = arr
    return arr


def _find_idx(raw_dirs: list[Path], stem: str) -> Path | None:
    for d in raw_dirs:
        for name in (stem, stem + ".gz"):
            p = d / name
            if p.is_file():
                return p
    return None


class BuiltinSource(DataSource):
    def __init__(self, spec: DataSpec, key: str) -> None:
        folder, classes = BUILTIN_SETS[key]
        bs = check_spec(spec)
        data_dir = (
            Path(spec.data_dir).expanduser() if spec.data_dir is not None else default_data_dir()
        )
        primary = data_dir / folder / "raw"
        raw_dirs = [primary]
        # Also accept --data-dir pointing at DIR/FashionMNIST or DIR/FashionMNIST/raw.
        if data_dir.name.lower() == folder.lower():
            raw_dirs.append(data_dir / "raw")
        if data_dir.name == "raw" and data_dir.parent.name.lower() == folder.lower():
            raw_dirs.append(data_dir)

        prefix = "train" if spec.train else "t10k"
        stems = {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}
        found = {kind: _find_idx(raw_dirs, stem) for kind, stem in stems.items()}
        fetched = None
        if spec.download and None in found.values():
            from netdoctor.data.download import download_missing

            fetched = download_missing(
                folder, primary, lambda stem: _find_idx(raw_dirs, stem) is not None, spec.mirror
            )
            found = {kind: _find_idx(raw_dirs, stem) for kind, stem in stems.items()}
        images_path, labels_path = found["images"], found["labels"]
        if images_path is None or labels_path is None:
            missing = [stem for kind, stem in stems.items() if found[kind] is None]
            looked = " and ".join(f"{primary / stem}[.gz]" for stem in missing)
            raise UserError(
                f"{folder} not found: looked for {looked}; netdoctor downloads it when run "
                "without --no-download, or download it with torchvision "
                f"(torchvision.datasets.{folder}({str(data_dir)!r}, download=True)), "
                "or pass --data-dir (or set NETDOCTOR_DATA_DIR) to the folder that holds "
                f"{folder}/raw"
            )
        images = _read_idx(images_path, "images")
        labels = _read_idx(labels_path, "labels")
        if images.shape[0] != labels.shape[0]:
            raise UserError(
                f"{folder} files disagree: {images_path} holds {images.shape[0]} images "
                f"but {labels_path} holds {labels.shape[0]} labels"
            )
        total = images.shape[0]
        if total == 0:
            raise UserError(f"{images_path} holds no images")

        self._images = images
        self._labels = labels
        self._bs = bs
        self._seed = spec.seed
        self._raw = spec.raw
        self._resize = spec.resize
        order = epoch_order(total, spec.seed, -1)
        self._subset = order[: spec.max_samples] if spec.max_samples else order
        self._subset_sorted = spec.max_samples is None  # subset is the whole set

        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        if spec.normalize:
            idx = self._subset[:_NORMALIZE_STATS_SAMPLES]
            pix = images[np.sort(idx)].astype(np.float64)
            if not spec.raw:
                pix /= 255.0
            # IDX images are single-channel: one mean/std.
            self._mean = np.array([pix.mean()], dtype=np.float32)
            self._std = np.array([max(pix.std(), 1e-8)], dtype=np.float32)

        n = len(self._subset)
        h, w = images.shape[1], images.shape[2]
        self.num_samples = n
        self.batch_size = bs
        self.num_classes = classes
        self.sample_shape = resized_shape((1, h, w), spec.resize)

        split = "train" if spec.train else "test"
        where = images_path.parent
        under = f"raw/ under {where.parent}" if where.name == "raw" else f"under {where}"
        count = f"{n} samples" if n == total else f"{n} of {total} samples"
        if self._mean is not None and self._std is not None:  # spec.normalize
            mean, std = float(self._mean[0]), float(self._std[0])
            served = (
                f"normalized per channel (mean {fmt_float(mean)}, std {fmt_float(std)} "
                f"on the {'0..255' if spec.raw else '[0, 1]'} scale)"
            )
        elif spec.raw:
            served = "served as float32 in [0, 255] (raw)"
        else:
            served = "served as float32 in [0, 1]"
        shape = "x".join(map(str, self.sample_shape))
        resized = f", resized to {spec.resize}x{spec.resize}" if spec.resize else ""
        self.description = f"{folder} {split} ({under}), {count}, {served}{resized} ({shape})"
        if fetched:
            files, mirror = fetched
            self.description += (
                f"; {len(files)} file{'s' if len(files) != 1 else ''} downloaded from {mirror} "
                "(MD5 verified)"
            )

    def _name(self) -> str:
        return self.description.split(" (")[0]

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        order = (
            self._subset
            if epoch == 0
            else self._subset[epoch_order(len(self._subset), self._seed, epoch)]
        )
        for start in range(0, len(order), self._bs):
            idx = order[start : start + self._bs]
            x = torch.from_numpy(self._images[idx].astype(np.float32)).unsqueeze(1)
            if not self._raw:
                x.div_(255.0)
            if self._resize:
                x = resize(x, self._resize, self._name())
            if self._mean is not None and self._std is not None:
                x = (x - float(self._mean[0])) / float(self._std[0])
            y = torch.from_numpy(self._labels[idx].astype(np.int64))
            yield x, y
