"""Loader-function data (``path/file.py:fn`` or ``dotted.module:fn``): ``fn()`` returns an
iterable of ``(x, y)`` batches (a DataLoader, a list of tuples, a generator, a Dataset)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from netdoctor.data.base import Batch, DataSource, DataSpec, check_spec, infer_num_classes, resize
from netdoctor.errors import UserError

_PEEK_BATCHES = 4  # batches a loader function is read ahead at open time to learn shapes


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


class LoaderSource(DataSource):
    """Batches from a user function's iterable, fed as given (numpy -> tensors, float64 numpy
    -> float32). Re-iterables (DataLoader, list) are iterated anew each pass; one-shot
    iterators (generators) are cached as they are read and replayed."""

    def __init__(self, spec: DataSpec, target: str, func_name: str, is_file: bool) -> None:
        label = f"{target}:{func_name}"
        self._label = label
        self._resize = spec.resize
        check_spec(spec)
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

        added = folder if folder is not None and folder not in sys.path else None
        if added is not None:
            sys.path.insert(0, added)
        try:
            obj = fn()
        except Exception as e:  # noqa: BLE001 - user code may raise anything
            raise UserError(f"data loader {label} raised {type(e).__name__}: {e}") from None
        finally:
            if added is not None:
                try:
                    sys.path.remove(added)
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
                infer_num_classes(torch.cat([y.reshape(-1) for y in ys]))
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
        yield from self._cache
        it = self._it  # set for a one-shot iterator
        while it is not None and not self._exhausted:
            try:
                item = next(it)
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
                x = resize(x, self._resize, self._name())
            yield x, y
            index += 1
