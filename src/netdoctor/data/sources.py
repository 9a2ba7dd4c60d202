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

import re
from pathlib import Path

from netdoctor.data.base import DataSource, DataSpec, default_data_dir
from netdoctor.data.builtin import BUILTIN_ALIASES, BUILTIN_SETS, BuiltinSource
from netdoctor.data.loader import LoaderSource
from netdoctor.data.npz import open_npz
from netdoctor.data.synthetic import SyntheticSource
from netdoctor.errors import UserError

__all__ = [
    "ACCEPTED_FORMS",
    "BUILTIN_SETS",
    "DataSource",
    "DataSpec",
    "default_data_dir",
    "open_source",
]

ACCEPTED_FORMS = (
    "fashionmnist, mnist, synthetic, a .npz file with arrays x and y (path/file.npz), "
    "or a loader function (path/file.py:fn or dotted.module:fn)"
)

_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def open_source(spec: DataSpec) -> DataSource:
    """Open the data source named by `spec.source`; UserError for anything unusable."""
    source = (spec.source or "").strip()
    key = BUILTIN_ALIASES.get(source.lower(), source.lower())
    if key in BUILTIN_SETS:
        return BuiltinSource(spec, key)
    if key == "synthetic":
        return SyntheticSource(spec)
    if source.lower().endswith(".npz"):
        return open_npz(spec, Path(source).expanduser())
    if ":" in source:
        target, _, func_name = source.rpartition(":")
        if func_name.isidentifier() and target:
            if target.endswith(".py"):
                return LoaderSource(spec, target, func_name, is_file=True)
            if _MODULE_RE.match(target):
                return LoaderSource(spec, target, func_name, is_file=False)
    if source.endswith(".py"):
        raise UserError(
            f"data loader {source!r} names no function: use {source}:fn, where fn() "
            "returns an iterable of (x, y) batches"
        )
    raise UserError(f"unknown data source {source!r}: expected {ACCEPTED_FORMS}")
