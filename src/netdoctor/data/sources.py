"""Data sources for `netdoctor probe` and `netdoctor check --data`.

A data source is named by one string (`DataSpec.source`):

* ``fashionmnist`` / ``mnist`` -- the built-in image sets, read from the torchvision raw
  layout under the data folder (``DIR/FashionMNIST/raw/train-images-idx3-ubyte[.gz]`` ...).
  Missing files are downloaded there first (published checksums verified; see
  `netdoctor.data.download`) unless ``DataSpec.download`` is False.
* ``synthetic`` -- a learnable task of ``--input-shape`` (see `netdoctor.data.synthetic`).
* ``path/file.npz`` -- arrays ``x`` and ``y``, fed exactly as stored.
* ``path/file.py:fn`` or ``dotted.module:fn`` -- ``fn()`` returns an iterable of ``(x, y)``
  batches (a DataLoader, a list of tuples, a generator, ...).

`open_source(spec)` turns a `DataSpec` into a `DataSource`, whose `batches(n)` yields
``(x, y)`` tensor pairs and whose `sample(n_batches)` concatenates the first batches for the
data rules. Every problem with the user's data is raised as `netdoctor.errors.UserError`.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from netdoctor.errors import UserError

__all__ = [
    "ACCEPTED_FORMS",
    "BUILTIN_SETS",
    "DataSource",
    "DataSpec",
    "default_data_dir",
    "open_source",
]

#: Built-in image sets: lower-case source name -> (folder name under the data dir, classes).
BUILTIN_SETS: dict[str, tuple[str, int]] = {
    "fashionmnist": ("FashionMNIST", 10),
    "mnist": ("MNIST", 10),
}
_BUILTIN_ALIASES = {"fashion-mnist": "fashionmnist", "fashion_mnist": "fashionmnist"}

ACCEPTED_FORMS = (
    "fashionmnist, mnist, synthetic, a .npz file with arrays x and y (path/file.npz), "
    "or a loader function (path/file.py:fn or dotted.module:fn)"
)

_NORMALIZE_STATS_SAMPLES = 10_000  # at most this many samples feed the mean/std estimate
_PEEK_BATCHES = 4  # batches a loader function is read ahead at open time to learn shapes


def default_data_dir() -> Path:
    """The data folder used when `DataSpec.data_dir` is None.

    ``$NETDOCTOR_DATA_DIR`` when set (and not empty), else ``~/.cache/netdoctor/data``.
    """
    env = os.environ.get("NETDOCTOR_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/netdoctor/data").expanduser()


@dataclass
class DataSpec:
    """What data to open and how to serve it.

    source: ``"fashionmnist"`` | ``"mnist"`` | ``"synthetic"`` | ``"path/file.npz"`` |
        ``"path/file.py:fn"`` | ``"dotted.module:fn"``.
    data_dir: folder holding the built-in sets (``DIR/FashionMNIST/raw/...``,
        ``DIR/MNIST/raw/...``). None means ``$NETDOCTOR_DATA_DIR`` when set, else
        ``~/.cache/netdoctor/data`` (see `default_data_dir`).
    batch_size: samples per batch (built-ins, npz, synthetic; a loader function batches itself).
    resize: resize images to ``resize x resize`` (bilinear) for models expecting e.g. 224.
        Applies to every source whose x is a float image batch (N, C, H, W) or (N, H, W).
    raw: built-in sets only: serve the stored 0..255 values as float32 instead of [0, 1].
    normalize: built-in sets only: per-channel mean/std normalization, the statistics
        computed from (up to 10000 of) the samples served.
    seed: shuffling / synthetic generation seed; the same seed gives the same batches.
    train: built-in sets: train split (True) or test split (False).
    input_shape: synthetic only: per-sample shape (no batch dim); required there.
    input_dtype: synthetic: ``"float32"`` (unit-scale values; also float64/float16/bfloat16)
        or ``"long"`` (token ids in [0, vocab)). For npz, ``"long"`` keeps integer x as int64.
    num_classes: synthetic only: number of label classes (default 10).
    max_samples: cap on samples read (built-ins: a seeded random subset; npz: the first ones;
        synthetic: the size of the generated pool, default 1024). None: all of them.
    vocab_size: synthetic with ``input_dtype="long"``: token vocabulary (default 100).
    target_shape: synthetic only: per-sample target shape; None or () for one class per
        sample, the token shape (T,) for one tag per token, (H, W) for one class per pixel.
    download: built-in sets only: download the standard files that are missing from the data
        folder (False: fail with "not found" instead; nothing is fetched when they are there).
    mirror: built-in sets only: URL of a folder serving the set's four ``.gz`` files (default
        ``$NETDOCTOR_DATA_MIRROR``, else the public mirrors; the published checksums apply).
    """

    source: str
    data_dir: Path | None = None
    batch_size: int = 64
    resize: int | None = None
    raw: bool = False
    normalize: bool = False
    seed: int = 0
    train: bool = True
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = "float32"
    num_classes: int | None = None
    max_samples: int | None = None
    vocab_size: int | None = None
    target_shape: tuple[int, ...] | None = None
    download: bool = True
    mirror: str | None = None


Batch = tuple[torch.Tensor, torch.Tensor]


class DataSource:
    """An opened data source.

    Attributes:
        description: one human line saying what is served, e.g. ``"FashionMNIST train (raw/
            under DIR), 60000 samples, served as float32 in [0, 1]"``.
        num_classes: known (built-ins, synthetic) or inferred from integer labels
            (max label + 1); None for float targets.
        sample_shape: per-sample input shape (no batch dim), after any resize.
        num_samples: samples in one pass over the data, None when unknown (loader functions).
        batch_size: samples per batch where netdoctor does the batching, else None.
    """

    description: str
    num_classes: int | None
    sample_shape: tuple[int, ...] | None
    num_samples: int | None = None
    batch_size: int | None = None

    def _epoch(self, epoch: int) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, n: int | None = None) -> Iterator[Batch]:
        """Yield up to n batches (x, y), cycling the data if it has fewer batches.

        ``n=None`` yields one pass over the data. Deterministic for a seed: each pass is
        reshuffled, but with an order fixed by (seed, pass number).
        """
        if n is None:
            yield from self._epoch(0)
            return
        if n <= 0:
            return
        count = 0
        for epoch in itertools.count():
            yielded = 0
            for batch in self._epoch(epoch):
                yield batch
                yielded += 1
                count += 1
                if count >= n:
                    return
            if yielded == 0:
                raise UserError(f"{self._name()} yielded no batches")

    def sample(self, n_batches: int = 4) -> Batch:
        """Concatenate the first n batches (used by data rules); never repeats samples."""
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for x, y in itertools.islice(self._epoch(0), max(1, n_batches)):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise UserError(f"{self._name()} yielded no batches")
        return _cat(xs, "x", self._name()), _cat(ys, "y", self._name())

    def _name(self) -> str:
        return self.description.split(",")[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.description}>"


def _cat(parts: list[torch.Tensor], what: str, name: str) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    try:
        return torch.cat(parts, dim=0)
    except RuntimeError:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        raise UserError(
            f"{name}: batches have {what} of different shapes ({shapes}), "
            "so they cannot be sampled together"
        ) from None


# --------------------------------------------------------------------------------------------
# shared helpers


def _resize(x: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """Bilinear resize of an image batch (N, C, H, W) or (N, H, W) to size x size."""
    if not x.is_floating_point():
        raise UserError(
            f"cannot resize {where}: inputs are {str(x.dtype).replace('torch.', '')}, "
            "resize needs float images"
        )
    if x.dim() == 4:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.dim() == 3:
        out = F.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
        return out.squeeze(1)
    raise UserError(
        f"cannot resize {where}: inputs have shape {tuple(x.shape)}, resize needs image "
        "batches shaped (N, C, H, W) or (N, H, W)"
    )


def _resized_shape(shape: tuple[int, ...], size: int | None) -> tuple[int, ...]:
    if size is None or len(shape) < 2:
        return shape
    return tuple(shape[:-2]) + (size, size)


def _check_spec(spec: DataSpec) -> int:
    if not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {spec.batch_size!r}")
    if spec.resize is not None and (not isinstance(spec.resize, int) or spec.resize < 1):
        raise UserError(f"resize must be a positive integer, got {spec.resize!r}")
    if spec.max_samples is not None and spec.max_samples < 1:
        raise UserError(f"max samples must be a positive integer, got {spec.max_samples!r}")
    return spec.batch_size


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n), fixed by (seed, epoch); epoch >= -1 (-1: subset choice)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch + 1, 0x5EED]).permutation(n)


def _infer_num_classes(y: torch.Tensor) -> int | None:
    if (
        y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
        and y.dim() == 1
        and y.numel() > 0
    ):
        lo, hi = int(y.min()), int(y.max())
        if lo >= 0:
            return hi + 1
    return None


def _fmt_float(v: float) -> str:
    return f"{v:.4g}"


# --------------------------------------------------------------------------------------------
# built-in image sets (IDX files, torchvision raw layout)

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


class _BuiltinSource(DataSource):
    def __init__(self, spec: DataSpec, key: str) -> None:
        folder, classes = BUILTIN_SETS[key]
        bs = _check_spec(spec)
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
        missing = [stem for kind, stem in stems.items() if found[kind] is None]
        if missing:
            looked = " and ".join(f"{primary / stem}[.gz]" for stem in missing)
            raise UserError(
                f"{folder} not found: looked for {looked}; netdoctor downloads it when run "
                "without --no-download, or download it with torchvision "
                f"(torchvision.datasets.{folder}({str(data_dir)!r}, download=True)), "
                "or pass --data-dir (or set NETDOCTOR_DATA_DIR) to the folder that holds "
                f"{folder}/raw"
            )
        images = _read_idx(found["images"], "images")  # type: ignore[arg-type]
        labels = _read_idx(found["labels"], "labels")  # type: ignore[arg-type]
        if images.shape[0] != labels.shape[0]:
            raise UserError(
                f"{folder} files disagree: {found['images']} holds {images.shape[0]} images "
                f"but {found['labels']} holds {labels.shape[0]} labels"
            )
        total = images.shape[0]
        if total == 0:
            raise UserError(f"{found['images']} holds no images")

        self._images = images
        self._labels = labels
        self._bs = bs
        self._seed = spec.seed
        self._raw = spec.raw
        self._resize = spec.resize
        order = _epoch_order(total, spec.seed, -1)
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
        self.sample_shape = _resized_shape((1, h, w), spec.resize)

        split = "train" if spec.train else "test"
        where = found["images"].parent  # type: ignore[union-attr]
        under = f"raw/ under {where.parent}" if where.name == "raw" else f"under {where}"
        count = f"{n} samples" if n == total else f"{n} of {total} samples"
        if spec.normalize:
            mean, std = float(self._mean[0]), float(self._std[0])  # type: ignore[index]
            served = (
                f"normalized per channel (mean {_fmt_float(mean)}, std {_fmt_float(std)} "
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
            else self._subset[_epoch_order(len(self._subset), self._seed, epoch)]
        )
        for start in range(0, len(order), self._bs):
            idx = order[start : start + self._bs]
            x = torch.from_numpy(self._images[idx].astype(np.float32)).unsqueeze(1)
            if not self._raw:
                x.div_(255.0)
            if self._resize:
                x = _resize(x, self._resize, self._name())
            if self._mean is not None:
                x = (x - float(self._mean[0])) / float(self._std[0])  # type: ignore[index]
            y = torch.from_numpy(self._labels[idx].astype(np.int64))
            yield x, y


# --------------------------------------------------------------------------------------------
# in-memory tensors (npz)


class _TensorSource(DataSource):
    """Shuffled batches over in-memory tensors x, y."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        spec: DataSpec,
        description: str,
        num_classes: int | None,
    ) -> None:
        self._x = x
        self._y = y
        self._bs = _check_spec(spec)
        self._seed = spec.seed
        self._resize = spec.resize
        self.num_samples = x.shape[0]
        self.batch_size = self._bs
        self.num_classes = num_classes
        self.sample_shape = _resized_shape(tuple(x.shape[1:]), spec.resize)
        self.description = description
        if spec.resize:  # fail at open time, not in the middle of a probe
            _resize(x[:1], spec.resize, description.split(",")[0])

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        order = torch.from_numpy(_epoch_order(self.num_samples or 0, self._seed, epoch))
        for start in range(0, len(order), self._bs):
            idx = order[start : start + self._bs]
            x = self._x[idx]
            if self._resize:
                x = _resize(x, self._resize, self._name())
            yield x, self._y[idx]


def _open_npz(spec: DataSpec, path: Path) -> DataSource:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                found = ", ".join(keys) if keys else "none"
                raise UserError(
                    f"{path} has no array{'s' if len(missing) > 1 else ''} "
                    f"{' and '.join(missing)}: a .npz data file needs arrays 'x' (inputs) and "
                    f"'y' (targets); arrays found: {found}"
                )
            x_np = npz["x"]
            y_np = npz["y"]
    except UserError:
        raise
    except ValueError as e:  # object arrays need pickle; we refuse them
        raise UserError(f"cannot read {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, OSError, EOFError, ...
        raise UserError(
            f"cannot read {path}: not a valid .npz file ({type(e).__name__}: {e})"
        ) from None

    if x_np.ndim == 0 or y_np.ndim == 0:
        raise UserError(
            f"{path}: x and y must be arrays with one row per sample, got x shape "
            f"{x_np.shape} and y shape {y_np.shape}"
        )
    if x_np.shape[0] != y_np.shape[0]:
        raise UserError(f"{path}: x has {x_np.shape[0]} samples but y has {y_np.shape[0]}")
    if x_np.shape[0] == 0:
        raise UserError(f"{path}: x and y are empty")
    for name, arr in (("x", x_np), ("y", y_np)):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise UserError(f"{path}: {name} has dtype {arr.dtype}, expected numbers")
    total = x_np.shape[0]
    if spec.max_samples:
        x_np, y_np = x_np[: spec.max_samples], y_np[: spec.max_samples]

    int_x = np.issubdtype(x_np.dtype, np.integer)
    if int_x and spec.input_dtype in ("long", "int64"):
        x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.int64))
    else:
        x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))
    if np.issubdtype(y_np.dtype, np.integer):
        y = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.int64))
    else:  # float (regression) or bool (binary targets): float32 targets
        y = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.float32))

    n = x.shape[0]
    num_classes = _infer_num_classes(y)
    count = f"{n} samples" if n == total else f"{n} of {total} samples"
    xdesc = str(x.dtype).replace("torch.", "")
    ydesc = "int64 labels" if y.dtype == torch.int64 else "float32 targets"
    if x.is_floating_point() and x.numel():
        lo, hi = float(x.min()), float(x.max())
        xdesc += f" in [{_fmt_float(lo)}, {_fmt_float(hi)}]"
    resized = f", resized to {spec.resize}x{spec.resize}" if spec.resize else ""
    desc = (
        f"{path}, {count}, x {xdesc} shape {tuple(x.shape[1:])} fed as stored{resized}, y {ydesc}"
    )
    if num_classes is not None:
        desc += f" ({num_classes} classes)"
    return _TensorSource(x, y, spec, desc, num_classes)


# --------------------------------------------------------------------------------------------
# loader functions (path/file.py:fn, dotted.module:fn)


def _import_file(path: Path, label: str):
    folder = str(path.parent.resolve())
    mod_name = "netdoctor_user_data_" + re.sub(r"\W", "_", str(path.resolve()))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[mod_name] = module  # so DataLoader workers / pickling can find it
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code may raise anything
        sys.modules.pop(mod_name, None)
        raise UserError(f"importing data loader {label} raised {type(e).__name__}: {e}") from None
    finally:
        if added:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass
    return module, folder


def _to_tensor(v: Any, what: str, label: str, index: int) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        if v.dtype == np.float64:
            v = v.astype(np.float32)
        if not (np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_):
            raise UserError(
                f"data loader {label}: batch {index} has {what} of dtype {v.dtype}, "
                "expected numbers"
            )
        return torch.from_numpy(np.ascontiguousarray(v))
    if isinstance(v, (list, tuple, int, float, bool)):
        try:
            t = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError):
            pass
        else:
            return t.float() if t.dtype == torch.float64 else t
    raise UserError(
        f"data loader {label}: batch {index} has {what} of type "
        f"{type(v).__name__}, expected a tensor or numpy array"
    )


def _as_pair(item: Any, label: str, index: int) -> Batch:
    if isinstance(item, dict):
        raise UserError(
            f"data loader {label}: batch {index} is a dict (keys "
            f"{', '.join(map(str, item))}), expected an (x, y) pair"
        )
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = (
            f"a {type(item).__name__} of length {len(item)}"
            if isinstance(item, (tuple, list))
            else f"a {type(item).__name__}"
        )
        raise UserError(f"data loader {label}: batch {index} is {kind}, expected an (x, y) pair")
    return _to_tensor(item[0], "x", label, index), _to_tensor(item[1], "y", label, index)


class _LoaderSource(DataSource):
    """Batches from a user function's iterable, fed as given (numpy -> tensors, float64 numpy
    -> float32). Re-iterables (DataLoader, list) are iterated anew each pass; one-shot
    iterators (generators) are cached as they are read and replayed."""

    def __init__(self, spec: DataSpec, target: str, func_name: str, is_file: bool) -> None:
        label = f"{target}:{func_name}"
        self._label = label
        self._resize = spec.resize
        _check_spec(spec)
        folder = None
        if is_file:
            path = Path(target).expanduser()
            if not path.is_file():
                raise UserError(f"data loader file not found: {path} (from {label})")
            module, folder = _import_file(path, label)
        else:
            try:
                module = importlib.import_module(target)
            except ImportError as e:
                raise UserError(
                    f"cannot import module {target!r} for data loader {label}: {e}"
                ) from None
            except Exception as e:  # noqa: BLE001 - user code may raise anything
                raise UserError(
                    f"importing data loader {label} raised {type(e).__name__}: {e}"
                ) from None
        fn = getattr(module, func_name, None)
        if fn is None:
            names = sorted(
                n
                for n, v in vars(module).items()
                if not n.startswith("_")
                and inspect.isfunction(v)
                and getattr(v, "__module__", None) == module.__name__
            )
            found = ", ".join(names) if names else "none"
            raise UserError(f"{target} has no function {func_name!r} (functions found: {found})")
        if not callable(fn):
            raise UserError(f"{label} is a {type(fn).__name__}, not a function")

        added = folder is not None and folder not in sys.path
        if added:
            sys.path.insert(0, folder)  # type: ignore[arg-type]
        try:
            obj = fn()
        except Exception as e:  # noqa: BLE001 - user code may raise anything
            raise UserError(f"data loader {label} raised {type(e).__name__}: {e}") from None
        finally:
            if added:
                try:
                    sys.path.remove(folder)  # type: ignore[arg-type]
                except ValueError:
                    pass

        if isinstance(obj, torch.utils.data.Dataset):
            # A dataset yields single samples: batch it like a DataLoader would.
            obj = torch.utils.data.DataLoader(obj, batch_size=spec.batch_size)
        if isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
            raise UserError(
                f"data loader {label} returned {type(obj).__name__}, expected an "
                "iterable of (x, y) batches (a DataLoader, a list of (x, y) tuples "
                "or a generator)"
            )
        self._obj = obj
        self._one_shot = isinstance(obj, Iterator)
        self._cache: list[Batch] = []
        self._exhausted = False
        self._it: Iterator | None = iter(obj) if self._one_shot else None

        peek = list(itertools.islice(self._epoch(0), _PEEK_BATCHES))
        if not peek:
            raise UserError(f"data loader {label} yielded no batches")
        x0 = peek[0][0]
        self.sample_shape = tuple(x0.shape[1:])
        self.num_samples = None
        self.batch_size = None
        ys = [y for _, y in peek]
        try:
            self.num_classes = (
                _infer_num_classes(torch.cat([y.reshape(-1) for y in ys]))
                if all(y.dim() == 1 for y in ys)
                else None
            )
        except RuntimeError:
            self.num_classes = None
        kind = "cached generator" if self._one_shot else type(obj).__name__
        xdesc = f"x {str(x0.dtype).replace('torch.', '')} shape {tuple(x0.shape)}"
        resized = f", resized to {spec.resize}x{spec.resize}" if spec.resize else ""
        self.description = f"data loader {label} ({kind}), first batch {xdesc}{resized}"

    def _name(self) -> str:
        return f"data loader {self._label}"

    def _raw_epoch(self) -> Iterator[Any]:
        if not self._one_shot:
            yield from iter(self._obj)
            return
        yield from self._cache  # type: ignore[misc]
        while not self._exhausted:
            try:
                item = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self._exhausted = True
                return
            yield item

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        index = 0
        it = self._raw_epoch()
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - user code may raise anything
                raise UserError(
                    f"data loader {self._label} raised {type(e).__name__} while "
                    f"iterating (batch {index}): {e}"
                ) from None
            if self._one_shot and index >= len(self._cache):
                batch = _as_pair(item, self._label, index)
                self._cache.append(batch)
            elif self._one_shot:
                batch = item
            else:
                batch = _as_pair(item, self._label, index)
            x, y = batch
            if self._resize:
                x = _resize(x, self._resize, self._name())
            yield x, y
            index += 1


# --------------------------------------------------------------------------------------------
# entry point

_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def open_source(spec: DataSpec) -> DataSource:
    """Open the data source named by `spec.source`; UserError for anything unusable."""
    source = (spec.source or "").strip()
    key = _BUILTIN_ALIASES.get(source.lower(), source.lower())
    if key in BUILTIN_SETS:
        return _BuiltinSource(spec, key)
    if key == "synthetic":
        from netdoctor.data.synthetic import SyntheticSource

        return SyntheticSource(spec)
    if source.lower().endswith(".npz"):
        return _open_npz(spec, Path(source).expanduser())
    if ":" in source:
        target, _, func_name = source.rpartition(":")
        if func_name.isidentifier() and target:
            if target.endswith(".py"):
                return _LoaderSource(spec, target, func_name, is_file=True)
            if _MODULE_RE.match(target):
                return _LoaderSource(spec, target, func_name, is_file=False)
    if source.endswith(".py"):
        raise UserError(
            f"data loader {source!r} names no function: use {source}:fn, where fn() "
            "returns an iterable of (x, y) batches"
        )
    raise UserError(f"unknown data source {source!r}: expected {ACCEPTED_FORMS}")
