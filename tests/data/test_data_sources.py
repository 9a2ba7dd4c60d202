"""Tests for netdoctor.data: built-in IDX sets, synthetic, .npz and loader functions."""

from __future__ import annotations

import gzip
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen import make_block_images, write_idx_dataset, write_idx_file, write_npz
from netdoctor.data import DataSource, DataSpec, default_data_dir, open_source
from netdoctor.errors import UserError


def _write_py(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


# ------------------------------------------------------------------------------ datagen


def test_datagen_blocks_are_learnable_structure():
    images, labels = make_block_images(100, seed=3)
    assert images.dtype == np.uint8 and images.shape == (100, 28, 28)
    assert set(labels.tolist()) == set(range(10))
    # Class means differ: the brightest 7x7 cell identifies the class.
    cells = images.reshape(100, 4, 7, 4, 7).mean(axis=(2, 4)).reshape(100, 16)
    assert (cells.argmax(axis=1) == labels).all()


# ------------------------------------------------------------------------------ built-ins


@pytest.mark.parametrize("gz", [True, False])
def test_builtin_reads_gz_and_plain_in_unit_range(tmp_path, gz):
    raw = write_idx_dataset(tmp_path, "FashionMNIST", n_train=100, n_test=30, gz=gz)
    assert raw == tmp_path / "FashionMNIST" / "raw"
    assert (raw / ("train-images-idx3-ubyte" + (".gz" if gz else ""))).is_file()
    src = open_source(DataSpec("fashionmnist", data_dir=tmp_path, batch_size=32))
    assert isinstance(src, DataSource)
    assert src.num_classes == 10
    assert src.sample_shape == (1, 28, 28)
    assert src.num_samples == 100
    assert "FashionMNIST train" in src.description
    assert "100 samples" in src.description and "[0, 1]" in src.description
    batches = list(src.batches())
    assert [b[0].shape[0] for b in batches] == [32, 32, 32, 4]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (32, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (32,)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.max()) > 0.75  # the bright blocks
    # Every sample served once per pass.
    allx = torch.cat([b[0] for b in batches])
    assert allx.shape[0] == 100


def test_builtin_test_split_and_mnist(tmp_path):
    write_idx_dataset(tmp_path, "MNIST", n_train=40, n_test=20)
    src = open_source(DataSpec("mnist", data_dir=tmp_path, train=False, batch_size=8))
    assert src.num_samples == 20
    assert "MNIST test" in src.description
    x, _ = src.sample(n_batches=10)  # fewer batches exist: sample does not repeat samples
    assert x.shape == (20, 1, 28, 28)


def test_builtin_labels_match_images(tmp_path):
    write_idx_dataset(tmp_path, n_train=64, n_test=8)
    x, y = open_source(DataSpec("fashionmnist", data_dir=tmp_path, raw=True, batch_size=64)).sample(
        1
    )
    cells = x.reshape(64, 4, 7, 4, 7).mean(dim=(2, 4)).reshape(64, 16)
    assert torch.equal(cells.argmax(dim=1), y)


def test_builtin_raw_serves_0_255(tmp_path):
    write_idx_dataset(tmp_path, n_train=64, n_test=8)
    src = open_source(DataSpec("fashionmnist", data_dir=tmp_path, raw=True))
    x, _ = src.sample()
    assert x.dtype == torch.float32
    assert float(x.max()) > 200 and float(x.min()) >= 0 and float(x.max()) <= 255
    assert torch.equal(x, x.round())
    assert "[0, 255]" in src.description


def test_builtin_normalize_zero_mean_unit_std(tmp_path):
    write_idx_dataset(tmp_path, n_train=200, n_test=8)
    src = open_source(DataSpec("fashionmnist", data_dir=tmp_path, normalize=True, batch_size=50))
    x, _ = src.sample(n_batches=4)
    assert x.shape[0] == 200
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1.0) < 1e-2
    assert "normalized" in src.description


def test_builtin_resize(tmp_path):
    write_idx_dataset(tmp_path, n_train=20, n_test=8)
    src = open_source(DataSpec("fashionmnist", data_dir=tmp_path, resize=32, batch_size=8))
    assert src.sample_shape == (1, 32, 32)
    x, y = next(src.batches(1))
    assert x.shape == (8, 1, 32, 32) and y.shape == (8,)
    assert "32x32" in src.description


def test_builtin_max_samples(tmp_path):
    write_idx_dataset(tmp_path, n_train=100, n_test=8)
    src = open_source(DataSpec("fashionmnist", data_dir=tmp_path, max_samples=30, batch_size=16))
    assert src.num_samples == 30
    assert "30 of 100 samples" in src.description
    assert sum(b[0].shape[0] for b in src.batches()) == 30


def test_builtin_missing_files_message_names_path(tmp_path):
    with pytest.raises(UserError) as exc:
        open_source(DataSpec("fashionmnist", data_dir=tmp_path, download=False))
    msg = str(exc.value)
    expected = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert msg.startswith("FashionMNIST not found")
    assert f"{expected}[.gz]" in msg
    assert "torchvision.datasets.FashionMNIST" in msg and "download=True" in msg
    assert "--data-dir" in msg and "without --no-download" in msg


def test_builtin_missing_labels_only_names_labels(tmp_path):
    raw = write_idx_dataset(tmp_path, "MNIST", n_train=10, n_test=5)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="MNIST not found") as exc:
        open_source(DataSpec("mnist", data_dir=tmp_path, train=False, download=False))
    assert "t10k-labels-idx1-ubyte[.gz]" in str(exc.value)
    assert "t10k-images" not in str(exc.value)


def test_builtin_default_data_dir_from_env(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    monkeypatch.setenv("NETDOCTOR_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    assert open_source(DataSpec("fashionmnist")).num_samples == 10
    monkeypatch.delenv("NETDOCTOR_DATA_DIR")
    assert default_data_dir() == Path("~/.cache/netdoctor/data").expanduser()


def test_builtin_data_dir_may_point_at_set_folder(tmp_path):
    write_idx_dataset(tmp_path, n_train=10, n_test=5)
    src = open_source(DataSpec("fashionmnist", data_dir=tmp_path / "FashionMNIST"))
    assert src.num_samples == 10


@pytest.mark.parametrize("gz", [True, False])
def test_builtin_corrupt_magic(tmp_path, gz):
    raw = write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    bad = (2049).to_bytes(4, "big") + b"\x00" * 100  # a labels magic in the images file
    if gz:
        (raw / name).write_bytes(gzip.compress(bad))
    else:
        (raw / name).write_bytes(bad)
    with pytest.raises(UserError) as exc:
        open_source(DataSpec("fashionmnist", data_dir=tmp_path))
    msg = str(exc.value)
    assert str(raw / name) in msg
    assert "bad magic number 2049" in msg and "2051" in msg


def test_builtin_truncated_file(tmp_path):
    raw = write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="truncated") as exc:
        open_source(DataSpec("fashionmnist", data_dir=tmp_path))
    assert str(path) in str(exc.value)


def test_builtin_bad_gzip(tmp_path):
    raw = write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=True)
    path = raw / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="corrupt") as exc:
        open_source(DataSpec("fashionmnist", data_dir=tmp_path))
    assert str(path) in str(exc.value)


def test_builtin_count_mismatch(tmp_path):
    raw = write_idx_dataset(tmp_path, n_train=10, n_test=5, gz=False)
    write_idx_file(raw / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    with pytest.raises(UserError, match="10 images but .* 7 labels"):
        open_source(DataSpec("fashionmnist", data_dir=tmp_path))


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_batches_different_seed_differs(tmp_path):
    write_idx_dataset(tmp_path, n_train=100, n_test=8)

    def take(seed):
        src = open_source(DataSpec("fashionmnist", data_dir=tmp_path, batch_size=16, seed=seed))
        return [b for b in src.batches(10)]  # 10 > 7 batches: crosses a pass boundary

    a, b, c = take(0), take(0), take(1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_cycles_when_fewer_batches_than_requested(tmp_path):
    write_idx_dataset(tmp_path, n_train=20, n_test=8)
    src = open_source(DataSpec("fashionmnist", data_dir=tmp_path, batch_size=8))
    batches = list(src.batches(7))
    assert len(batches) == 7
    assert [b[0].shape[0] for b in batches] == [8, 8, 4, 8, 8, 4, 8]
    # The second pass covers the same samples, reshuffled.
    first = torch.cat([b[1] for b in batches[:3]]).sort().values
    second = torch.cat([b[1] for b in batches[3:6]]).sort().values
    assert torch.equal(first, second)
    assert list(src.batches(0)) == []


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_requires_input_shape():
    with pytest.raises(UserError, match="--input-shape"):
        open_source(DataSpec("synthetic"))


def _nearest_mean_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    flat = x.reshape(len(x), -1).double()
    means = torch.stack([flat[y == k].mean(0) for k in range(classes)])
    return float(torch.cdist(flat, means).argmin(1).eq(y).double().mean())


def test_synthetic_images_are_shifted_class_templates():
    spec = DataSpec(
        "synthetic", input_shape=(3, 8, 8), num_classes=4, batch_size=32, max_samples=512, seed=5
    )
    src = open_source(spec)
    assert src.num_classes == 4 and src.sample_shape == (3, 8, 8) and src.num_samples == 512
    assert "template" in src.description
    x, y = src.sample(n_batches=16)
    assert x.shape == (512, 3, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 4
    assert len(set(y.tolist())) == 4
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.1  # unit scale
    # Each class is its own pattern: the nearest class mean classifies almost every sample
    assert _nearest_mean_accuracy(x, y, 4) > 0.9
    # ... at a random shift: two samples of one class are not the same template plus noise.
    first = x[y == 0]
    shifts = [int((first[i] - first[0]).abs().argmax()) for i in range(1, 6)]
    assert len(set(shifts)) > 1
    # Deterministic for a seed, different for another.
    x2, y2 = open_source(spec).sample(n_batches=16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = open_source(
        DataSpec(
            "synthetic",
            input_shape=(3, 8, 8),
            num_classes=4,
            batch_size=32,
            max_samples=512,
            seed=6,
        )
    ).sample(1)
    assert not torch.equal(x[:32], x3)


def test_synthetic_vectors_are_class_clusters():
    src = open_source(
        DataSpec("synthetic", input_shape=(6,), num_classes=3, batch_size=128, max_samples=1024)
    )
    assert "clusters" in src.description
    x, y = src.sample(n_batches=8)
    assert x.shape == (1024, 6) and sorted(set(y.tolist())) == [0, 1, 2]
    assert abs(float(x.std()) - 1) < 0.2
    # held-out samples sit next to samples of their own class (1-nearest neighbour)
    nearest = y[:512][torch.cdist(x[512:], x[:512]).argmin(1)]
    assert float(nearest.eq(y[512:]).double().mean()) > 0.8


def test_synthetic_token_classes_are_marker_tokens():
    src = open_source(
        DataSpec(
            "synthetic",
            input_shape=(16,),
            input_dtype="long",
            vocab_size=100,
            num_classes=5,
            batch_size=64,
            max_samples=512,
        )
    )
    x, y = src.sample(n_batches=8)
    assert x.dtype == torch.int64 and x.shape == (512, 16)
    assert int(x.min()) >= 0 and int(x.max()) < 100
    # every sequence holds tokens that only sequences of its own class hold
    owners: dict[int, set[int]] = {}
    for seq, label in zip(x.tolist(), y.tolist()):
        for t in seq:
            owners.setdefault(t, set()).add(label)
    markers = {
        t: next(iter(c))
        for t, c in owners.items()
        if len(c) == 1 and sum(t in seq for seq in x.tolist()) > 20
    }
    assert len(markers) >= 5
    assert all(
        any(markers.get(t) == label for t in seq) for seq, label in zip(x.tolist(), y.tolist())
    )


def test_synthetic_per_token_and_per_pixel_targets():
    tags = open_source(
        DataSpec(
            "synthetic",
            input_shape=(16,),
            input_dtype="long",
            vocab_size=50,
            num_classes=5,
            target_shape=(16,),
            batch_size=8,
        )
    )
    x, y = next(tags.batches(1))
    assert y.shape == (8, 16) and int(y.max()) < 5
    table: dict[int, int] = {}
    for t, tag in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist()):
        assert table.setdefault(t, tag) == tag  # a token always has the same tag
    seg = open_source(
        DataSpec(
            "synthetic", input_shape=(1, 16, 16), num_classes=2, target_shape=(16, 16), batch_size=8
        )
    )
    x, y = next(seg.batches(1))
    assert x.shape == (8, 1, 16, 16) and y.shape == (8, 16, 16)
    assert set(y.unique().tolist()) == {0, 1}
    # a pixel's class follows its value: class 1 pixels are brighter on average
    assert float(x[:, 0][y == 1].mean()) > float(x[:, 0][y == 0].mean()) + 1


def test_synthetic_tokens_and_resize():
    src = open_source(
        DataSpec("synthetic", input_shape=(12,), input_dtype="long", vocab_size=50, batch_size=8)
    )
    x, _ = next(src.batches(1))
    assert x.dtype == torch.int64 and x.shape == (8, 12)
    assert int(x.min()) >= 0 and int(x.max()) < 50
    assert src.num_classes == 10
    src = open_source(DataSpec("synthetic", input_shape=(1, 28, 28), resize=32, batch_size=4))
    assert next(src.batches(1))[0].shape == (4, 1, 32, 32)
    with pytest.raises(UserError, match="input dtype"):
        open_source(DataSpec("synthetic", input_shape=(4,), input_dtype="complex"))


def test_synthetic_cycles_pool():
    src = open_source(DataSpec("synthetic", input_shape=(4,), batch_size=10, max_samples=20))
    batches = list(src.batches(5))
    assert len(batches) == 5
    pool = {tuple(b[0][0].tolist()) for b in batches[:2]}
    assert {tuple(b[0][0].tolist()) for b in batches[2:4]} == pool


# ------------------------------------------------------------------------------ npz


def test_npz_fed_as_given(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 1, 6, 6)).astype(np.uint8)
    y = rng.integers(0, 3, size=50)
    path = write_npz(tmp_path / "d.npz", x, y)
    src = open_source(DataSpec(str(path), batch_size=50))
    xb, yb = src.sample(1)
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert float(xb.max()) > 200  # 0..255 stays 0..255: no scaling, no normalization
    # Same rows, shuffled: compare as sorted multisets of rows.
    got = sorted(map(tuple, xb.numpy().reshape(50, -1).tolist()))
    want = sorted(map(tuple, x.reshape(50, -1).astype(np.float32).tolist()))
    assert got == want
    assert src.num_classes == int(y.max()) + 1
    assert src.sample_shape == (1, 6, 6)


def test_npz_values_unchanged_pairs_kept(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(6, 2) * 100.0
    y = np.arange(6)
    src = open_source(DataSpec(str(write_npz(tmp_path / "d.npz", x, y)), batch_size=4))
    xb, yb = src.sample(4)
    for xi, yi in zip(xb, yb):
        assert torch.equal(xi, torch.tensor(x[int(yi)], dtype=torch.float32))


def test_npz_float_targets_and_long_inputs(tmp_path):
    x = np.arange(20).reshape(10, 2)
    y = np.linspace(0, 1, 10)
    path = write_npz(tmp_path / "r.npz", x, y)
    src = open_source(DataSpec(str(path), input_dtype="long"))
    xb, yb = src.sample()
    assert xb.dtype == torch.int64 and yb.dtype == torch.float32
    assert src.num_classes is None
    # bce-style float 0/1 targets stay float
    path = write_npz(tmp_path / "b.npz", x.astype(np.float32), np.array([0.0, 1.0] * 5))
    assert open_source(DataSpec(str(path))).sample()[1].dtype == torch.float32


def test_npz_nan_passes_through(tmp_path):
    x = np.ones((4, 3), dtype=np.float32)
    x[1, 2] = np.nan
    path = write_npz(tmp_path / "n.npz", x, np.zeros(4, dtype=np.int64))
    xb, _ = open_source(DataSpec(str(path))).sample()
    assert torch.isnan(xb).sum() == 1


def test_npz_resize_only_when_asked(tmp_path):
    path = write_npz(tmp_path / "i.npz", np.zeros((4, 3, 10, 10), np.float32), np.zeros(4, int))
    assert open_source(DataSpec(str(path))).sample()[0].shape == (4, 3, 10, 10)
    src = open_source(DataSpec(str(path), resize=16))
    assert src.sample()[0].shape == (4, 3, 16, 16) and src.sample_shape == (3, 16, 16)
    flat = write_npz(tmp_path / "f.npz", np.zeros((4, 10), np.float32), np.zeros(4, int))
    with pytest.raises(UserError, match="resize"):
        open_source(DataSpec(str(flat), resize=16))


def test_npz_missing_key_lists_found(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, inputs=np.zeros((2, 2)), y=np.zeros(2))
    with pytest.raises(UserError) as exc:
        open_source(DataSpec(str(path)))
    msg = str(exc.value)
    assert str(path) in msg and "'x'" in msg and "inputs" in msg


def test_npz_missing_file_and_length_mismatch(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_source(DataSpec(str(tmp_path / "nope.npz")))
    path = write_npz(tmp_path / "m.npz", np.zeros((5, 2)), np.zeros(4))
    with pytest.raises(UserError, match="5 samples but y has 4"):
        open_source(DataSpec(str(path)))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"hello")
    with pytest.raises(UserError, match="cannot read"):
        open_source(DataSpec(str(junk)))


# ------------------------------------------------------------------------------ loader functions


def test_py_loader_list_of_batches(tmp_path):
    py = _write_py(
        tmp_path / "myloader.py",
        """
        import numpy as np
        import torch

        def data():
            return [(torch.full((4, 3), float(i)), torch.tensor([0, 1, 2, i])) for i in range(3)]

        def numpy_data():
            return [(np.ones((2, 3)), np.array([1, 0]))]
    """,
    )
    src = open_source(DataSpec(f"{py}:data"))
    assert src.sample_shape == (3,)
    assert src.num_classes == 3
    batches = list(src.batches(5))  # 3 batches, cycled
    assert [float(b[0][0, 0]) for b in batches] == [0.0, 1.0, 2.0, 0.0, 1.0]
    assert "myloader.py:data" in src.description
    x, y = open_source(DataSpec(f"{py}:numpy_data")).sample()
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
    assert y.dtype == torch.int64


def test_py_loader_generator_is_cached(tmp_path):
    py = _write_py(
        tmp_path / "gen.py",
        """
        import torch
        CALLS = []

        def data():
            CALLS.append(1)
            for i in range(2):
                yield torch.full((2, 5), float(i)), torch.tensor([i, i])
    """,
    )
    src = open_source(DataSpec(f"{py}:data"))
    batches = list(src.batches(5))
    assert [float(b[0][0, 0]) for b in batches] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert src.sample(4)[0].shape == (4, 5)


def test_py_loader_dataloader_and_dataset(tmp_path):
    py = _write_py(
        tmp_path / "dl.py",
        """
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def ds():
            return TensorDataset(torch.randn(10, 3), torch.arange(10) % 2)

        def loader():
            return DataLoader(ds(), batch_size=4)
    """,
    )
    src = open_source(DataSpec(f"{py}:loader"))
    assert [b[0].shape[0] for b in src.batches(4)] == [4, 4, 2, 4]
    src = open_source(DataSpec(f"{py}:ds", batch_size=5))  # a Dataset is batched for you
    assert [b[0].shape for b in src.batches(2)] == [(5, 3), (5, 3)]


def test_py_loader_imports_neighbours(tmp_path):
    (tmp_path / "helper_mod_nd.py").write_text("N = 3\n")
    py = _write_py(
        tmp_path / "uses_helper.py",
        """
        import torch
        from helper_mod_nd import N

        def data():
            return [(torch.zeros(N, 2), torch.zeros(N, dtype=torch.long))]
    """,
    )
    assert open_source(DataSpec(f"{py}:data")).sample()[0].shape == (3, 2)


def test_dotted_module_loader(tmp_path, monkeypatch):
    pkg = tmp_path / "nd_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write_py(
        pkg / "feeds.py",
        """
        import torch
        def data():
            return [(torch.ones(2, 2), torch.tensor([0, 1]))]
    """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    src = open_source(DataSpec("nd_test_pkg.feeds:data"))
    assert src.num_classes == 2
    with pytest.raises(UserError, match="cannot import module 'nd_test_pkg.nope'"):
        open_source(DataSpec("nd_test_pkg.nope:data"))


def test_py_loader_raising(tmp_path):
    py = _write_py(
        tmp_path / "boom.py",
        """
        def data():
            raise ValueError("no data today")

        def lazy():
            yield (1, 2)
            raise RuntimeError("disk gone")
    """,
    )
    with pytest.raises(UserError) as exc:
        open_source(DataSpec(f"{py}:data"))
    assert str(exc.value) == f"data loader {py}:data raised ValueError: no data today"
    with pytest.raises(UserError, match="raised RuntimeError while iterating.*disk gone"):
        open_source(DataSpec(f"{py}:lazy"))


def test_py_loader_errors(tmp_path):
    py = _write_py(
        tmp_path / "bad.py",
        """
        def triples():
            return [(1, 2, 3)]

        def number():
            return 5

        def empty():
            return []

        def strings():
            return [("a", "b")]
    """,
    )
    with pytest.raises(UserError, match="not found"):
        open_source(DataSpec(f"{tmp_path / 'missing.py'}:data"))
    with pytest.raises(UserError, match=r"has no function 'data' \(functions found: empty, "):
        open_source(DataSpec(f"{py}:data"))
    with pytest.raises(UserError, match="batch 0 is a tuple of length 3, expected an"):
        open_source(DataSpec(f"{py}:triples"))
    with pytest.raises(UserError, match="returned int, expected an iterable"):
        open_source(DataSpec(f"{py}:number"))
    with pytest.raises(UserError, match="yielded no batches"):
        open_source(DataSpec(f"{py}:empty"))
    with pytest.raises(UserError, match="type str"):
        open_source(DataSpec(f"{py}:strings"))
    broken = _write_py(tmp_path / "broken.py", "import nonexistent_module_nd\n")
    with pytest.raises(UserError, match="importing data loader .* raised ModuleNotFoundError"):
        open_source(DataSpec(f"{broken}:data"))


# ------------------------------------------------------------------------------ source strings


@pytest.mark.parametrize("source", ["cifar10", "data.csv", "", "foo:"])
def test_unknown_source_lists_forms(source):
    with pytest.raises(UserError) as exc:
        open_source(DataSpec(source))
    msg = str(exc.value)
    assert msg.startswith("unknown data source")
    for form in ("fashionmnist", "mnist", "synthetic", ".npz", ".py:fn", "module:fn"):
        assert form in msg


def test_py_without_function():
    with pytest.raises(UserError, match="names no function"):
        open_source(DataSpec("loader.py"))


def test_bad_batch_size():
    with pytest.raises(UserError, match="batch size"):
        open_source(DataSpec("synthetic", input_shape=(2,), batch_size=0))
