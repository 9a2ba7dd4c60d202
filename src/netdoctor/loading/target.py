"""Turns a target string into built nn.Module objects, with their construction sites recorded.

Forms: `file.py:Name`, `dotted.module:Name`, `model.onnx`, and files or folders without `:Name`
(discover the nn.Module subclasses defined there that build without arguments). Loading user code
runs it, like pytest does; every failure becomes a one-line UserError.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from netdoctor.errors import UserError
from netdoctor.findings import Location
from netdoctor.loading.seeding import DEFAULT_SEED, seeded

if TYPE_CHECKING:
    from torch import nn

    from netdoctor.loading.deferred import Deferred


# A construction allocating more is stopped and the model built on the meta device instead
# (loading.deferred): about 540M float32 parameters. The deferred check is as precise (init
# statistics exact or measured; the signal pass on the same distributions) and, past this
# size, cheaper than building the weights.
SIZING_BYTES = 2 << 30


SKIP_DIRS = {
    ".git",
    ".hg",
    ".venv",
    "venv",
    "env",
    "__pycache__",
    "node_modules",
    "build",
    "dist",
    ".tox",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "site-packages",
}


@dataclass
class LoadedModel:
    """A model built from the user's code, ready for a frontend."""

    target: str  # how reports name it: "fixtures/sick/alexnet.py:AlexNet"
    model: Any  # nn.Module
    provenance: Any  # netdoctor.loading.provenance.Provenance
    class_location: Location | None = None
    source_path: str | None = None
    # built on the meta device (too large to build): its construction, replayable per tensor
    deferred: Deferred | None = None

    def user_site(self) -> Location | None:
        """The user's own line that built or called the model: its class line when the class
        is the user's, else the line of user code that built it (a factory's call), or None
        (a library's model named directly). Findings whose flagged line is library code point
        here first."""
        from netdoctor.loading.library import in_installed_package

        site = self.provenance.site(self.model) if self.provenance is not None else None
        for candidate in (self.class_location, site):
            if candidate is not None and not in_installed_package(candidate.path):
                return candidate
        return None


@dataclass
class LoadResult:
    models: list[LoadedModel] = field(default_factory=list)
    onnx_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def split_target(spec: str) -> tuple[str, str | None]:
    """'a/b.py:Net' -> ('a/b.py', 'Net'); 'pkg.mod:Net' -> ('pkg.mod', 'Net');
    'a/b.py' -> (.., None)."""
    head, sep, tail = spec.rpartition(":")
    if (
        sep
        and tail
        and tail.replace(".", "").replace("_", "").isalnum()
        and not tail.startswith(("\\", "/"))
    ):
        if len(head) == 1 and head.isalpha():  # a Windows drive letter, not a name
            return spec, None
        return head, tail
    return spec, None


def display_path(path: str | os.PathLike) -> str:
    """A path relative to the cwd when it lies under it (reports and SARIF want relative paths)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def parse_kwargs(pairs: tuple[str, ...] | list[str], json_text: str | None) -> dict[str, Any]:
    """`-a key=value` pairs (values parsed as Python literals, else kept as strings) and
    --kwargs."""
    import json

    kwargs: dict[str, Any] = {}
    if json_text:
        try:
            loaded = json.loads(json_text)
        except json.JSONDecodeError as e:
            raise UserError(f"--kwargs is not valid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(loaded, dict):
            raise UserError("--kwargs must be a JSON object, e.g. '{\"channels\": 16}'")
        kwargs.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UserError(f"-a expects key=value, got {pair!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value
    return kwargs


def load(
    spec: str,
    kwargs: dict[str, Any] | None = None,
    seed: int = DEFAULT_SEED,
    defer: bool | None = None,
) -> LoadResult:
    """Load one target string into built models (or ONNX file paths).

    Importing and each model's construction run under `seed` (re-seeded per model), so a model
    gets the same weights in every process, alone or among the other models of its folder.
    `defer`: build on the meta device (`loading.deferred`) always (True), never (False), or
    when its construction allocates more than SIZING_BYTES (None)."""
    kwargs = kwargs or {}
    where, name = split_target(spec)
    result = LoadResult()
    if name is None:
        path = Path(where)
        if not path.exists():
            raise UserError(f"{spec}: no such file or directory")
        if path.is_file() and path.suffix.lower() == ".onnx":
            result.onnx_files.append(str(path))
            return result
        if path.is_file() and path.suffix != ".py":
            raise UserError(
                f"{spec}: not a Python file, ONNX file or folder "
                "(use file.py:ClassName or model.onnx)"
            )
        if kwargs:
            raise UserError(
                "constructor arguments (-a/--kwargs) need a target of the form file.py:ClassName"
            )
        files = [path] if path.is_file() else _python_files(path)
        for f in files:
            _discover(f, result, seed, defer)
        if not result.models and not result.onnx_files:
            result.notes.append(f"{spec}: no buildable nn.Module found")
        return result

    from netdoctor.loading.provenance import Provenance

    prov = Provenance()
    with prov.recording():
        with seeded(seed):
            module, source = _import(where)
        if not hasattr(module, name):
            found = _module_classes(module)
            hint = f" (nn.Module classes there: {', '.join(found)})" if found else ""
            raise UserError(f"{where} has no attribute {name!r}{hint}")
        obj = getattr(module, name)
        model, deferred = construct(lambda: _build(obj, name, where, kwargs), seed, defer)
    display = f"{display_path(source)}:{name}" if source else spec
    result.models.append(
        LoadedModel(display, model, prov, _class_location(obj, model), source, deferred)
    )
    return result


def construct(
    build: Callable[[], nn.Module], seed: int, defer: bool | None
) -> tuple[nn.Module, Deferred | None]:
    """(model, its Deferred record or None): `build()` under `seed`, for real, or on the meta
    device (loading.deferred) when `defer` is True, or (None) when its construction allocates
    more than SIZING_BYTES: it is stopped there and run on the meta device. A construction
    that cannot run on the meta device is built for real, whatever it takes."""
    from netdoctor.loading.budget import TooLarge, allocation_budget
    from netdoctor.loading.deferred import record

    if defer is not True:
        try:
            with seeded(seed), allocation_budget(None if defer is False else SIZING_BYTES):
                return build(), None
        except TooLarge:
            pass
    try:
        with seeded(seed):
            deferred = record(build)
    except Exception:  # it needs values: build it for real
        with seeded(seed):
            return build(), None
    return deferred.model, deferred


# -- importing ---------------------------------------------------------------------------------


def _import(where: str) -> tuple[ModuleType, str | None]:
    """Import a .py file by path or a dotted module by name; return (module, source path)."""
    looks_like_file = where.endswith(".py") or os.sep in where or "/" in where
    if looks_like_file:
        path = Path(where)
        if not path.exists():
            raise UserError(f"{where}: no such file")
        if path.is_dir():
            raise UserError(f"{where} is a folder; name a file.py:ClassName or drop ':Name'")
        return _import_file(path), str(path.resolve())
    # Like `python -m`: packages in the current folder import without PYTHONPATH.
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and where.startswith(e.name):
            raise UserError(f"no module named {where!r} (and no file {where!r})") from None
        raise UserError(f"importing {where} failed: {e}") from None
    except SyntaxError as e:
        raise UserError(_syntax_message(e)) from None
    except Exception as e:  # user code raised while importing
        raise UserError(f"importing {where} raised {type(e).__name__}: {_first_line(e)}") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    return module, getattr(module, "__file__", None)


def _import_file(path: Path) -> ModuleType:
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    mod_name = f"_netdoctor_user_{resolved.stem}_{digest}"
    stat = resolved.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = sys.modules.get(mod_name)
    if cached is not None and getattr(cached, "__netdoctor_stamp__", None) == stamp:
        return cached  # several targets in one file import it once; an edited file re-imports
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise UserError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    module.__dict__["__netdoctor_stamp__"] = stamp
    sys.modules[mod_name] = module
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[mod_name]
        raise UserError(_syntax_message(e)) from None
    except Exception as e:
        del sys.modules[mod_name]
        raise UserError(f"importing {path} raised {type(e).__name__}: {_first_line(e)}") from None
    except SystemExit:
        del sys.modules[mod_name]
        raise UserError(f"importing {path} called sys.exit()") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _syntax_message(e: SyntaxError) -> str:
    where = display_path(e.filename) if e.filename else "<unknown>"
    return f"{where}:{e.lineno}: syntax error: {e.msg}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _module_classes(module) -> list[str]:
    from torch import nn

    return [
        n
        for n, v in vars(module).items()
        if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__
    ]


# -- building ----------------------------------------------------------------------------------


def required_params(cls_or_fn) -> list[str]:
    """Constructor parameters without defaults (what the user must pass with -a)."""
    try:
        sig = inspect.signature(cls_or_fn)
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _build(obj: Any, name: str, where: str, kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    if isinstance(obj, nn.Module):
        if kwargs:
            raise UserError(f"{name} is already a module instance; it takes no -a/--kwargs")
        return obj
    if not callable(obj):
        kind = type(obj).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise UserError(
            f"{where}:{name} is {article} {kind}, not an nn.Module "
            "class or a function returning one"
        )
    missing = [p for p in required_params(obj) if p not in kwargs]
    if missing:
        example = " ".join(f"-a {p}=VALUE" for p in missing)
        raise UserError(
            f"{name} needs constructor arguments: {', '.join(missing)}; "
            f"pass them with {example} or --kwargs '{{\"{missing[0]}\": ...}}'"
        )
    try:
        built = obj(**kwargs)
    except TypeError as e:
        raise UserError(f"building {name}(**{kwargs!r}) failed: {_first_line(e)}") from None
    except Exception as e:
        raise UserError(f"building {name}() raised {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(built, nn.Module):
        kind = "class" if inspect.isclass(obj) else "function"
        raise UserError(
            f"{where}:{name} is a {kind} returning {type(built).__name__}, not an nn.Module"
        )
    return built


def _class_location(obj: Any, model) -> Location | None:
    from netdoctor.loading.provenance import class_location

    return class_location(obj if inspect.isclass(obj) else type(model))


# -- discovery (targets without :Name) -----------------------------------------------------------


def _python_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for n in sorted(names):
            if n.endswith(".py"):
                files.append(Path(root) / n)
            elif n.endswith(".onnx"):
                files.append(Path(root) / n)
    return files


def _discover(path: Path, result: LoadResult, seed: int, defer: bool | None) -> None:
    """Build every nn.Module subclass defined in `path` that needs no arguments."""
    if path.suffix == ".onnx":
        result.onnx_files.append(str(path))
        return

    from netdoctor.loading.provenance import Provenance

    shown = display_path(path)
    if not _mentions_module(path):
        return
    prov = Provenance()
    built: list[tuple[str, Any, nn.Module, Deferred | None]] = []
    with prov.recording():
        with seeded(seed):
            module = _import_file(path)
        for name in _module_classes(module):
            cls = getattr(module, name)
            if inspect.isabstract(cls):
                continue
            missing = required_params(cls)
            if missing:
                result.notes.append(
                    f"skipped {shown}:{name}: needs constructor arguments ({', '.join(missing)})"
                )
                continue
            try:
                model, deferred = construct(cls, seed, defer)
            except Exception as e:
                result.notes.append(
                    f"skipped {shown}:{name}: building it raised "
                    f"{type(e).__name__}: {_first_line(e)}"
                )
                continue
            built.append((name, cls, model, deferred))
    # A class used as a building block of another model in the same file is checked as part of
    # that model, not on its own (its findings would repeat).
    used_inside = {type(m) for _, _, model, _ in built for m in model.modules() if m is not model}
    for name, cls, model, deferred in built:
        if cls in used_inside:
            result.notes.append(
                f"skipped {shown}:{name}: checked as part of another model in the same file"
            )
            continue
        result.models.append(
            LoadedModel(
                f"{shown}:{name}",
                model,
                prov,
                _class_location(cls, model),
                str(path.resolve()),
                deferred,
            )
        )


def _mentions_module(path: Path) -> bool:
    """Cheap pre-filter: only import files that define a class and mention Module (importing
    runs the file, so plain scripts and unrelated code are left alone)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    return "class " in text and "Module" in text
