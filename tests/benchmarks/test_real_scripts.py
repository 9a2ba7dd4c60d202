"""The pure helpers of benchmarks/real_scripts.py (the benchmark itself needs checkouts of
pytorch/examples and nanoGPT and is not run here): the IDX writer, the digits made MNIST-like,
nanoGPT's character data, and how outputs are compared."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location(
    "real_scripts", REPO / "benchmarks" / "real_scripts.py"
)
assert _spec is not None and _spec.loader is not None
rs = importlib.util.module_from_spec(_spec)
sys.modules["real_scripts"] = rs
_spec.loader.exec_module(rs)


def test_idx_header_and_round_trip() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = rs.idx_bytes(images)
    # magic 0x00000803 (unsigned bytes, 3 dimensions), then 2, 3, 4 as big-endian int32
    assert data[:16] == bytes.fromhex("00000803000000020000000300000004")
    assert data[16:] == images.tobytes()
    assert np.array_equal(rs.read_idx(data), images)

    labels = np.array([7, 0, 9], dtype=np.uint8)
    data = rs.idx_bytes(labels)
    assert data[:8] == bytes.fromhex("0000080100000003")
    assert np.array_equal(rs.read_idx(data), labels)


def test_idx_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="unsigned bytes"):
        rs.idx_bytes(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="not an IDX"):
        rs.read_idx(b"\x00\x00\x0d\x01")


def test_idx_reads_as_torchvision_reads_it() -> None:
    """torchvision's MNIST reader, where it is installed (not in CI)."""
    mnist = pytest.importorskip("torchvision.datasets.mnist")
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train-images-idx3-ubyte"
        path.write_bytes(rs.idx_bytes(images))
        assert np.array_equal(mnist.read_image_file(str(path)).numpy(), images)


def test_digits_as_mnist() -> None:
    digits = np.zeros((2, 8, 8))
    digits[0, 0, 0] = 16
    digits[1, 7, 7] = 8
    out = rs.digits_as_mnist(digits)
    assert out.shape == (2, 28, 28) and out.dtype == np.uint8
    assert (out[0, 2:5, 2:5] == 255).all() and out[0].sum() == 9 * 255  # one pixel, 3x3
    assert (out[1, 23:26, 23:26] == 128).all() and out[1].sum() == 9 * 128
    assert out[:, :2].sum() == out[:, -2:].sum() == out[:, :, :2].sum() == 0  # 2 px border


def test_char_dataset_as_prepare_writes_it() -> None:
    text = "hello world, hello data\n" * 5
    train, val, meta = rs.char_dataset(text)
    chars = sorted(set(text))
    assert meta["vocab_size"] == len(chars)
    assert meta["itos"] == dict(enumerate(chars))
    assert meta["stoi"] == {c: i for i, c in enumerate(chars)}
    ids = np.frombuffer(train + val, dtype=np.uint16)
    assert "".join(meta["itos"][int(i)] for i in ids) == text
    assert len(train) // 2 == int(len(text) * 0.9)
    pickle.dumps(meta)  # meta.pkl


def test_take_words() -> None:
    lines = ["a b c\n", "d e\n", "f\n"]
    head, rest = rs.take_words(lines, 4)  # a line counts its words and its <eos>
    assert head == ["a b c\n"] and rest == ["d e\n", "f\n"]
    assert rs.take_words(lines, 100) == (lines, [])


def test_final_loss() -> None:
    out = "\n".join(
        [
            "Train Epoch: 1 [0/1500 (0%)]\tLoss: 2.301",
            "Test set: Average loss: 0.6166, Accuracy: 1200/297",
            "[0/1][15/16] Loss_D: 0.0021 Loss_G: 9.4119 D(x): 0.9993",
            "| End of training | test loss  5.23 | test ppl   187.00",
            "iter 200: loss 2.3245, time 190.12ms, mfu 0.01%",
            "accuracy 97%",
        ]
    )
    assert rs.final_loss(out) == (2.3245, "iter 200: loss 2.3245, time 190.12ms, mfu 0.01%")
    assert rs.final_loss("[0/1] Loss_D: 0.0021 Loss_G: 9.4119 D(x): 0.9")[0] == 9.4119
    assert rs.final_loss("test loss: 1.7e-04")[0] == pytest.approx(1.7e-4)
    assert rs.final_loss("Loss: 0.000714 after 399 batches")[0] == 0.000714
    assert rs.final_loss("no number here") == (None, "")


def test_compare_stdout_timing_only() -> None:
    text = "| 10/57 | ms/batch {} | loss 8.71\niter 1: loss 4.7, time {}ms, mfu {}%\n"
    a = text.format("438.20", "2563.52", "-100.00")
    b = text.format("404.58", "2381.44", "3.10")
    assert rs.compare_stdout(a, a) == "identical"
    assert rs.compare_stdout(a, b) == "timing only"
    assert rs.compare_stdout(a, b.replace("8.71", "8.72")) == "differs"
    end = "| end of epoch 1 | time: {}s | valid loss 6.90"
    assert rs.compare_stdout(end.format("25.01"), end.format("3.2")) == "timing only"


def test_own_lines_and_error_line() -> None:
    assert rs.own_lines("a\nnetdoctor: step 3: ND501\nb\n") == "a\nb\n"
    stderr = (
        "Traceback (most recent call last):\n  File 'x.py', line 1\n"
        "AttributeError: Can't pickle local object 'f.<locals>.hook'\n"
    )
    assert rs.error_line(stderr) == "AttributeError: Can't pickle local object 'f.<locals>.hook'"
    assert rs.error_line("UserWarning: something\n") == ""
    assert rs.first_difference("a\nb\n", "a\n") == (2, "b", "<end>")
    assert rs.first_difference("a\n", "a\n") is None


def test_summary_table_of_a_saved_run(tmp_path, capsys) -> None:
    import json

    result = rs.Result(
        "regression",
        ["main.py"],
        "as it is",
        python="python",
        torch="2.13.0",
        plain_rc=0,
        run_rc=0,
        stdout="identical",
        plain_loss=0.001,
        run_loss=0.001,
        report=True,
        steps=0,
        notes=["no optimizer step was seen"],
    )
    saved = tmp_path / "real.json"
    saved.write_text(json.dumps({"results": [rs.asdict(result)]}))
    assert rs.main(["--summary", str(saved), "--markdown"]) == 0
    out = capsys.readouterr().out
    row = "| regression | python (torch 2.13.0) | 0 / 0 | identical | - | 0.001 / 0.001 | 0 | none"
    assert row in out
    assert "- note: no optimizer step was seen" in out


def test_extra_args_append_to_the_named_script_only() -> None:
    scripts = [s for s in rs.SCRIPTS if s.name in ("regression", "nanogpt_shakespeare_char")]
    out = rs.with_extra_args(scripts, ["nanogpt_shakespeare_char=--learning_rate=0.1"])
    by_name = {s.name: s for s in out}
    assert by_name["nanogpt_shakespeare_char"].args[-1] == "--learning_rate=0.1"
    assert by_name["regression"].args == next(s for s in scripts if s.name == "regression").args
    with pytest.raises(ValueError):
        rs.with_extra_args(scripts, ["mnist=--epochs=2"])  # not among the scripts run
    with pytest.raises(ValueError):
        rs.with_extra_args(scripts, ["regression"])
