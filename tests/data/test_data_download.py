"""Built-in sets that arrive by themselves: missing FashionMNIST/MNIST files are downloaded from a
mirror, checked against the published MD5s and moved into the cache atomically.

Never the internet: the mirror is a small HTTP server on 127.0.0.1 serving generated IDX files in
the standard layout (tests/datagen.py). Generated files cannot match the published checksums, so
the success path swaps the checksum table for the generated files' digests, and the refusal path
keeps the real one.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import HEALTHY, invoke, run_cli
from datagen import make_block_images, write_idx_dataset, write_idx_file
from netdoctor.data import DataSpec, download, open_source
from netdoctor.errors import UserError

pytestmark = pytest.mark.timeout(120)

MODEL = f"{HEALTHY / 'mlp_normalized.py'}:MLP"
NAMES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A mirror folder: the four generated FashionMNIST files under their standard names."""
    return write_idx_dataset(
        tmp_path_factory.mktemp("mirror"), "FashionMNIST", n_train=256, n_test=64
    )


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture
def generated_digests(served, monkeypatch) -> dict[str, str]:
    """Make the generated files 'the published ones' for this test only."""
    digests = {name: md5_of(served / name) for name in NAMES}
    monkeypatch.setitem(download.PUBLISHED_MD5, "FashionMNIST", digests)
    return digests


@contextmanager
def mirror(
    root: Path, *, drop_after: int | None = None, delay: float = 0.0
) -> Iterator[tuple[str, list[str]]]:
    """Serve `root` on 127.0.0.1 (a free port); yields (base URL, paths requested).

    drop_after: send only this many bytes of each file (with the full Content-Length), then
    close the connection. delay: wait this long before answering.
    """
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requested.append(self.path)
            if delay:
                time.sleep(delay)
            path = root / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data if drop_after is None else data[:drop_after])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (the stalled-mirror test)
            # HTTP/1.0: the connection closes when this returns

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", requested
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("netdoctor: error: ") and "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------------------ success path


@pytest.mark.slow
def test_probe_downloads_verifies_and_probes_then_reuses_the_cache(
    served, generated_digests, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NETDOCTOR_DATA_DIR", str(cache))  # the default folder, no --data-dir
    raw = cache / "FashionMNIST" / "raw"
    with mirror(served) as (url, requested):
        first = invoke(
            "probe",
            MODEL,
            "--data",
            "fashionmnist",
            "--data-mirror",
            url,
            "--steps",
            5,
            "--no-verify",
            "--format",
            "json",
        )
        assert first.exit_code in (0, 1), first.stderr
        report = json.loads(first.stdout)
        data_note = next(n for n in report["notes"] if n.startswith("data: FashionMNIST train"))
        assert f"4 files downloaded from {url} (MD5 verified)" in data_note
        assert "256 samples" in data_note  # it trained on the served files
        assert sorted(requested) == sorted("/" + n for n in NAMES)
        assert leftovers(cache) == sorted(NAMES)  # no temporary file left over
        assert {n: md5_of(raw / n) for n in NAMES} == generated_digests

        again = invoke(
            "probe",
            MODEL,
            "--data",
            "fashionmnist",
            "--data-mirror",
            url,
            "--steps",
            5,
            "--no-verify",
            "--format",
            "json",
        )
        assert again.exit_code == first.exit_code, again.stderr
        assert len(requested) == 4  # nothing fetched the second time
        notes = json.loads(again.stdout)["notes"]
        assert not any("downloaded" in n for n in notes)


def test_only_missing_files_are_fetched_and_the_env_mirror_is_used(
    served, generated_digests, tmp_path, monkeypatch
):
    raw = tmp_path / "FashionMNIST" / "raw"
    images, labels = make_block_images(40, seed=5)
    write_idx_file(raw / "train-images-idx3-ubyte", images)  # uncompressed counts as present
    write_idx_file(raw / "train-labels-idx1-ubyte.gz", labels)
    with mirror(served) as (url, requested):
        monkeypatch.setenv("NETDOCTOR_DATA_MIRROR", url)
        train = open_source(DataSpec("fashionmnist", data_dir=tmp_path, batch_size=8))
        assert requested == []  # the split asked for is there: no network at all
        test = open_source(DataSpec("fashionmnist", data_dir=tmp_path, train=False))
    assert requested == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz"]
    assert f"2 files downloaded from {url}" in test.description and test.num_samples == 64
    assert md5_of(raw / "t10k-images-idx3-ubyte.gz") == generated_digests[NAMES[2]]
    assert train.num_samples == 40 and "downloaded" not in train.description
    assert (raw / "train-images-idx3-ubyte").read_bytes()[16:] == images.tobytes()  # untouched


# ------------------------------------------------------------------------------ failures


def test_published_checksums_refuse_other_files(served, tmp_path):
    with mirror(served) as (url, requested):
        result = invoke(
            "probe",
            MODEL,
            "--data",
            "fashionmnist",
            "--data-mirror",
            url,
            "--data-dir",
            tmp_path,
            "--steps",
            5,
        )
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert f"cannot download FashionMNIST into {raw}" in line
    assert f"{url}train-images-idx3-ubyte.gz: checksum mismatch" in line
    assert download.PUBLISHED_MD5["FashionMNIST"]["train-images-idx3-ubyte.gz"] in line
    assert requested == ["/train-images-idx3-ubyte.gz"]  # stops at the first bad file
    assert leftovers(tmp_path) == []  # nothing under the real name, no temporary file
    assert not (tmp_path / "FashionMNIST").exists()  # no empty folders either


def test_unreachable_mirror_fails_in_one_line_naming_folder_and_mirror(tmp_path):
    url = closed_port_url()
    result = run_cli(
        "probe",
        MODEL,
        "--data",
        "fashionmnist",
        "--data-mirror",
        url,
        "--data-dir",
        tmp_path,
        "--steps",
        5,
        timeout=60,
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(tmp_path / "FashionMNIST" / "raw") in line
    assert f"{url}train-images-idx3-ubyte.gz: connection refused" in line
    assert "by hand" in line and "--data-dir" in line and "--data-mirror" in line


def test_offline_with_the_default_mirrors_names_each_one(tmp_path, monkeypatch):
    monkeypatch.delenv("NETDOCTOR_DATA_MIRROR")
    dead = [closed_port_url() + "a/", closed_port_url() + "b/"]
    monkeypatch.setitem(download.MIRRORS, "MNIST", tuple(dead))
    with pytest.raises(UserError) as exc:
        open_source(DataSpec("mnist", data_dir=tmp_path))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"cannot download MNIST into {tmp_path}")
    assert all(f"{m}train-images-idx3-ubyte.gz: connection refused" in msg for m in dead)


def test_default_mirrors_are_the_public_ones(monkeypatch):
    monkeypatch.delenv("NETDOCTOR_DATA_MIRROR")
    assert download.mirrors_for("FashionMNIST")[0].startswith("http://fashion-mnist.s3")
    assert download.mirrors_for("MNIST") == ["https://ossci-datasets.s3.amazonaws.com/mnist/"]
    assert download.mirrors_for("MNIST", "https://example.org/m/") == ["https://example.org/m/"]


def test_dropped_connection_leaves_no_partial_file(served, generated_digests, tmp_path):
    with mirror(served, drop_after=100) as (url, _):
        result = invoke(
            "check", MODEL, "--data", "fashionmnist", "--data-mirror", url, "--data-dir", tmp_path
        )
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "train-images-idx3-ubyte.gz: connection closed after 100 of" in line
    assert leftovers(tmp_path) == []


def test_stalled_mirror_times_out(served, generated_digests, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_S", 0.5)
    with mirror(served, delay=3) as (url, _):
        with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz: timed out after 0.5 s"):
            open_source(DataSpec("fashionmnist", data_dir=tmp_path, mirror=url))
    assert leftovers(tmp_path) == []


def test_no_download_keeps_the_not_found_error(served, tmp_path):
    with mirror(served) as (url, requested):
        result = invoke(
            "check",
            MODEL,
            "--data",
            "fashionmnist",
            "--no-download",
            "--data-mirror",
            url,
            "--data-dir",
            tmp_path,
        )
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert line.startswith("netdoctor: error: FashionMNIST not found")
    assert "without --no-download" in line and "download=True" in line
    assert requested == []


@pytest.mark.parametrize("bad", ["ftp://host/mnist/", "mirror.example.org/mnist", "http://"])
def test_a_mirror_that_is_not_a_url_is_a_usage_error(bad, tmp_path):
    result = invoke("check", MODEL, "--data", "mnist", "--data-mirror", bad, "--data-dir", tmp_path)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert f"data mirror {bad!r} (from --data-mirror) is not a URL" in line


@pytest.mark.parametrize("command", ["probe", "check"])
def test_help_documents_the_mirror_and_no_download(command):
    text = invoke(command, "--help").stdout
    assert "--data-mirror URL" in text and "--no-download" in text
    assert "NETDOCTOR_DATA_MIRROR" in " ".join(text.split())
