"""Fetch a built-in image set (FashionMNIST, MNIST) into the data folder when its files are missing.

Why its own module: `netdoctor probe model.py:Net --data fashionmnist` should work on a fresh
machine, and fetching four files must not need torchvision (a heavy companion pinned to one torch
version). Standard-library `urllib` does it. Every file is checked against its published MD5 and
written the only way that keeps the cache sound: into a temporary file in the same folder, then
`os.replace`d under its real name once complete and verified. An interrupted or corrupt download
leaves nothing a later run could mistake for the data.

Mirrors: ``--data-mirror URL`` / ``$NETDOCTOR_DATA_MIRROR`` name a folder that serves the set's
four ``.gz`` files under their standard names; without one, the public mirrors below are tried in
order. A custom mirror must serve the published bytes: the same checksums apply.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from netdoctor.errors import UserError

__all__ = ["MIRROR_ENV", "MIRRORS", "PUBLISHED_MD5", "download_missing", "mirrors_for"]

#: The published MD5 of each standard file (the sets' own pages; torchvision lists the same).
PUBLISHED_MD5: dict[str, dict[str, str]] = {
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}

#: Public mirrors, tried in order: Zalando Research's own bucket and repository for
#: FashionMNIST, the PyTorch team's copy of MNIST (the original site refuses scripted downloads).
MIRRORS: dict[str, tuple[str, ...]] = {
    "FashionMNIST": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "MNIST": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
}

MIRROR_ENV = "NETDOCTOR_DATA_MIRROR"
TIMEOUT_S = 30.0  # per connect / per read: a stalled server fails instead of hanging the run
_CHUNK = 1 << 16
_SCHEMES = ("http", "https", "file")


def mirrors_for(folder: str, mirror: str | None = None) -> list[str]:
    """The mirror URLs to try for `folder`: `mirror`, else ``$NETDOCTOR_DATA_MIRROR``, else the
    public ones. UserError for a URL that urllib cannot fetch."""
    chosen = mirror or os.environ.get(MIRROR_ENV) or None
    if chosen is None:
        return list(MIRRORS[folder])
    parts = urllib.parse.urlsplit(chosen)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not (parts.netloc if scheme != "file" else parts.path):
        origin = "--data-mirror" if mirror else f"${MIRROR_ENV}"
        raise UserError(
            f"data mirror {chosen!r} (from {origin}) is not a URL: expected the "
            "http://, https:// or file:// URL of a folder that serves "
            f"{', '.join(PUBLISHED_MD5[folder])}"
        )
    return [chosen]


def download_missing(
    folder: str, dest: Path, present: Callable[[str], bool], mirror: str | None = None
) -> tuple[list[Path], str] | None:
    """Download the standard files of `folder` that `present(stem)` says are missing into `dest`.

    `present` gets the uncompressed name (``train-images-idx3-ubyte``) and says whether that
    file exists, compressed or not. Returns (files written, the mirror(s) they came from), or None
    when nothing was missing. Every failure is one UserError line naming `dest` and the
    mirror(s) tried; no file appears under its real name unless complete and verified.
    """
    wanted = {
        name: md5
        for name, md5 in PUBLISHED_MD5[folder].items()
        if not present(name.removesuffix(".gz"))
    }
    if not wanted:
        return None
    mirrors = mirrors_for(folder, mirror)
    created = [p for p in (dest, *dest.parents) if not p.exists()]
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot download {folder}: cannot create {dest} "
            f"({e.strerror or e}); pass --data-dir to a writable folder"
        ) from None

    written: list[Path] = []
    used: str | None = None
    sources: list[str] = []
    try:
        with _progress() as progress:
            for name, md5 in wanted.items():
                failures: list[str] = []
                # Once a mirror served a file, stay with it; else try them in order.
                order = [used] + [m for m in mirrors if m != used] if used else mirrors
                for base in order:
                    url = _join(base, name)
                    try:
                        _fetch(url, dest / name, md5, progress)
                    except _Failed as e:
                        failures.append(f"{url}: {e}")
                        continue
                    used = base
                    sources += [base] if base not in sources else []
                    written.append(dest / name)
                    break
                else:
                    raise UserError(_failure_line(folder, dest, failures, written))
    except BaseException:
        if not written:  # leave no empty folders behind a download that got nowhere
            for p in created:  # deepest first
                try:
                    p.rmdir()
                except OSError:
                    break
        raise
    return written, ", ".join(sources)


# --------------------------------------------------------------------------------------------


class _Failed(Exception):
    """One attempt at one URL failed; the message says why, in a few words."""


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _fetch(url: str, target: Path, md5: str, progress) -> None:
    """Stream `url` into a temporary file beside `target`, check its MD5, then move it into
    place. Anything else -- an error, a short body, a wrong checksum, Ctrl-C -- deletes the
    temporary file."""
    from netdoctor.version import __version__

    # Unique beside the target (same file system, so os.replace is atomic); created like any
    # other file (mode 0o666 less the umask), unlike mkstemp's private 0o600.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise UserError(
            f"cannot download into {target.parent}: {e.strerror or e}; pass "
            "--data-dir to a writable folder"
        ) from None
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": f"netdoctor/{__version__}"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            task = progress.add_task(target.name, total=total) if progress else None
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if progress:
                    progress.update(task, completed=received)
            if total is not None and received < total:
                raise _Failed(f"connection closed after {received} of {total} bytes")
        got = digest.hexdigest()
        if got != md5:
            raise _Failed(
                f"checksum mismatch: MD5 {got}, the published file has {md5} "
                "(a mirror must serve the published files)"
            )
        os.replace(tmp, target)
    except _Failed:
        raise
    except urllib.error.HTTPError as e:
        raise _Failed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _Failed(_reason(e.reason)) from None
    except http.client.IncompleteRead as e:
        raise _Failed(
            f"connection closed after {len(e.partial)} more bytes, {e.expected} missing"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _Failed(_reason(e)) from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already when os.replace moved it into place


def _reason(err: object) -> str:
    if isinstance(err, (TimeoutError, socket.timeout)):
        return f"timed out after {TIMEOUT_S:g} s"
    if isinstance(err, socket.gaierror):
        return f"host not found ({err.strerror or err})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower() if err.strerror[:1].isupper() else err.strerror
    return str(err) or type(err).__name__


def _failure_line(folder: str, dest: Path, failures: list[str], written: list[Path]) -> str:
    kept = f" ({', '.join(p.name for p in written)} kept, verified)" if written else ""
    names = ", ".join(PUBLISHED_MD5[folder])
    return (
        f"cannot download {folder} into {dest}{kept}: {'; '.join(failures)}. "
        f"Set another mirror with --data-mirror URL (or ${MIRROR_ENV}), or put {names} in "
        f"{dest} by hand (or pass --data-dir DIR with DIR/{folder}/raw holding them)"
    )


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


def _progress():
    """A rich download bar on stderr when stderr is a terminal; else nothing is printed."""
    if not sys.stderr.isatty():
        return _NoProgress()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("downloading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
