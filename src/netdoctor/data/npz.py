"""``path/file.npz`` data: arrays ``x`` and ``y``, fed exactly as stored, in shuffled
batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from netdoctor.data.base import (
    Batch,
    DataSource,
    DataSpec,
    check_spec,
    epoch_order,
    fmt_float,
    infer_num_classes,
    resize,
    resized_shape,
)
from netdoctor.errors import UserError


class TensorSource(DataSource):
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
        self._bs = check_spec(spec)
        self._seed = spec.seed
        self._resize = spec.resize
        self.num_samples = x.shape[0]
        self.batch_size = self._bs
        self.num_classes = num_classes
        self.sample_shape = resized_shape(tuple(x.shape[1:]), spec.resize)
        self.description = description
        if spec.resize:  # fail at open time, not in the middle of a probe
            resize(x[:1], spec.resize, description.split(",")[0])

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        order = torch.from_numpy(epoch_order(self.num_samples or 0, self._seed, epoch))
        for start in range(0, len(order), self._bs):
            idx = order[start : start + self._bs]
            x = self._x[idx]
            if self._resize:
                x = resize(x, self._resize, self._name())
            yield x, self._y[idx]


def open_npz(spec: DataSpec, path: Path) -> DataSource:
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
    num_classes = infer_num_classes(y)
    count = f"{n} samples" if n == total else f"{n} of {total} samples"
    xdesc = str(x.dtype).replace("torch.", "")
    ydesc = "int64 labels" if y.dtype == torch.int64 else "float32 targets"
    if x.is_floating_point() and x.numel():
        lo, hi = float(x.min()), float(x.max())
        xdesc += f" in [{fmt_float(lo)}, {fmt_float(hi)}]"
    resized = f", resized to {spec.resize}x{spec.resize}" if spec.resize else ""
    desc = (
        f"{path}, {count}, x {xdesc} shape {tuple(x.shape[1:])} fed as stored{resized}, y {ydesc}"
    )
    if num_classes is not None:
        desc += f" ({num_classes} classes)"
    return TensorSource(x, y, spec, desc, num_classes)
