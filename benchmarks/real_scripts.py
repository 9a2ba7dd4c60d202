"""`netdoctor run` on real training scripts that no one here wrote: pytorch/examples and nanoGPT.

    python benchmarks/real_scripts.py --examples ../examples --nanogpt ../nanoGPT \\
        --python /path/to/venv-with-torchvision/bin/python --json real.json
    python benchmarks/real_scripts.py --examples DIR --nanogpt DIR --only mnist,regression
    python benchmarks/real_scripts.py --summary real.json --markdown   # the table of a saved run

Not CI: it needs a checkout of github.com/pytorch/examples and of github.com/karpathy/nanoGPT
(given with --examples and --nanogpt; their code is never copied here), and torchvision and
matplotlib for some of the examples. No test needs it; tests/benchmarks/ tests its pure helpers.

Each script runs unchanged, on CPU, with its smallest honest arguments (one epoch, fewer
iterations, or the script's own small setting; SCRIPTS below has them), twice:

  * plain  `PY SCRIPT ARGS`
  * run    `PY -m netdoctor run --format json -o REPORT.json SCRIPT ARGS`

with the same interpreter, the same working folder (emptied and set up again before each run),
the same environment (this checkout's src/ first on PYTHONPATH, --threads OpenMP/MKL threads,
PYTHONHASHSEED=0, no CUDA device, the Agg matplotlib backend, no bytecode written into the
checkouts) and a --timeout per run. The interpreter is the first of this one and the --python
ones that imports what the script needs (torchvision, matplotlib, numpy) and netdoctor's own
dependencies; the table names it.

Data is made offline in the work folder (--work, default a new temporary folder, kept), no
download at run time:

  * MNIST in torchvision's raw IDX layout (data/MNIST/raw/{train,t10k}-{images-idx3,
    labels-idx1}-ubyte, what torchvision's MNIST class checks and reads; no processed/ folder,
    which only its legacy loader reads) from scikit-learn's bundled digits: 1797 images of 8x8,
    0..16, scaled to 0..255, each pixel made 3x3 (24x24) and padded by 2 to 28x28, as MNIST
    centres its digits; the first 1500 train, the last 297 test.
  * Wikitext-2 for word_language_model, shortened: train.txt from the head of the checkout's
    valid.txt (the checkout may lack its large train.txt), valid.txt and test.txt from two
    slices of its test.txt (--words sets the train size).
  * nanoGPT's shakespeare_char (train.bin, val.bin, meta.pkl, as its data/shakespeare_char/
    prepare.py writes them: sorted characters, 90/10 split, uint16) from a text of the examples
    checkout (word_language_model's wikitext-2 test.txt, else its READMEs).

Compared per script: the exit code; stdout, exactly (the report goes to the -o file; any
`netdoctor:` line is left out of the run's stdout first): identical, or "timing only" when the
two are identical once the timing text is masked (ms/batch, time ...ms, mfu), or different, and
then a second plain run says whether the script itself is deterministic (an unseeded script
differs from itself); stderr the same way (netdoctor's own `netdoctor:` announcements left out
and listed); the final loss-like number each printed (the last number after the word "loss");
and netdoctor's report: steps measured, backward passes, the optimizers it saw, every finding
(rule, severity, the message's start) and its notes. stdout and stderr of every run
are kept in WORK/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# What netdoctor itself imports at run time (pyproject's dependencies).
NETDOCTOR_DEPS = ("torch", "click", "rich", "libcst", "numpy")


@dataclass(frozen=True)
class Script:
    """One training script of a checkout, as the benchmark runs it.

    `args` may use {data} (the work folder's data/), {examples} and {nanogpt} (the checkouts).
    `setup` are scripts of the checkout run in the working folder before each run (same
    interpreter); `links` are (name in the working folder, target) symbolic links; `dirs` are
    folders the script expects in its working folder."""

    name: str
    checkout: str  # "examples" | "nanogpt"
    path: str  # the script, relative to its checkout
    args: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # modules beyond torch that the script imports
    setup: tuple[str, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    dirs: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # set for both runs (and the setup)
    why: str = ""  # what the arguments shorten, and why


SCRIPTS: tuple[Script, ...] = (
    Script(
        "mnist",
        "examples",
        "mnist/main.py",
        ("--epochs", "1", "--no-accel"),
        needs=("torchvision",),
        why="1 epoch of 14; Adadelta, StepLR per epoch",
    ),
    Script(
        "mnist_rnn",
        "examples",
        "mnist_rnn/main.py",
        ("--epochs", "1"),
        needs=("torchvision",),
        why="1 epoch of 14; CPU is its default",
    ),
    Script(
        "vae",
        "examples",
        "vae/main.py",
        ("--epochs", "1", "--no-accel"),
        needs=("torchvision",),
        dirs=("results",),
        why="1 epoch of 10; Adam on a reduction='sum' loss",
    ),
    Script(
        "dcgan",
        "examples",
        "dcgan/main.py",
        ("--dataset", "fake", "--niter", "1", "--manualSeed", "1", "--outf", "."),
        needs=("torchvision",),
        why="1 epoch of 25 over FakeData (1000 images, 16 batches); the seed fixed (else random)",
    ),
    Script(
        "word_language_model_lstm",
        "examples",
        "word_language_model/main.py",
        (
            "--data",
            "{data}/wikitext-2",
            "--model",
            "LSTM",
            "--epochs",
            "1",
            "--log-interval",
            "10",
        ),
        why="1 epoch of 40 on a shortened corpus; manual SGD (p.data.add_), torch.save(model)",
    ),
    Script(
        "word_language_model_transformer",
        "examples",
        "word_language_model/main.py",
        (
            "--data",
            "{data}/wikitext-2",
            "--model",
            "Transformer",
            "--lr",
            "5",
            "--epochs",
            "1",
            "--log-interval",
            "10",
        ),
        why="its README's Transformer recipe, 1 epoch of 6 on a shortened corpus; manual SGD",
    ),
    Script(
        "time_sequence_prediction",
        "examples",
        "time_sequence_prediction/train.py",
        ("--steps", "2"),
        needs=("matplotlib", "numpy"),
        setup=("time_sequence_prediction/generate_sine_wave.py",),
        # its torch.load of a numpy array fails under torch>=2.6's weights_only default, with
        # or without netdoctor; torch's own switch restores the old default
        env=(("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1"),),
        why="2 LBFGS steps of 15 (each up to 20 closure evaluations); its data generated first; "
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (its torch.load of a numpy array needs it since torch "
        "2.6)",
    ),
    Script(
        "regression",
        "examples",
        "regression/main.py",
        why="as it is: trains until the loss is below 1e-3; manual SGD; unseeded",
    ),
    Script(
        "siamese_network",
        "examples",
        "siamese_network/main.py",
        ("--epochs", "1", "--no-accel"),
        needs=("torchvision",),
        why="1 epoch of 14; its pairs come from Python's unseeded random",
    ),
    Script(
        "nanogpt_shakespeare_char",
        "nanogpt",
        "train.py",
        (
            "{nanogpt}/config/train_shakespeare_char.py",
            "--device=cpu",
            "--compile=False",
            "--eval_iters=20",
            "--log_interval=1",
            "--block_size=64",
            "--batch_size=12",
            "--n_layer=4",
            "--n_head=4",
            "--n_embd=128",
            "--max_iters=200",
            "--lr_decay_iters=200",
            "--dropout=0.0",
            "--eval_interval=100",
        ),
        needs=("numpy",),
        # train.py reads configurator.py and data/<dataset>/ from its working folder
        links=(("configurator.py", "{nanogpt}/configurator.py"), ("data", "{data}")),
        why="its README's CPU recipe with 200 iterations of 2000, evaluated every 100 (so it "
        "saves checkpoints)",
    ),
)


# -- offline data -----------------------------------------------------------------------------


def idx_bytes(array: Any) -> bytes:
    """An unsigned-byte array in the IDX format of MNIST: magic 0x0000 08 <ndim>, each dimension
    as a big-endian int32, then the bytes, row-major."""
    import numpy as np

    a = np.ascontiguousarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"IDX here holds unsigned bytes only, not {a.dtype}")
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, not {a.ndim}")
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + a.tobytes()


def read_idx(data: bytes) -> Any:
    """The array an IDX file of unsigned bytes holds (the inverse of idx_bytes)."""
    import numpy as np

    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim :]
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def digits_as_mnist(images: Any) -> Any:
    """8x8 digits with values 0..16 as 28x28 uint8 images the way MNIST draws them: scaled to
    0..255, each pixel 3x3 (24x24), padded by 2 on every side (centred)."""
    import numpy as np

    scaled = np.rint(np.clip(np.asarray(images, dtype=np.float64), 0, 16) * (255.0 / 16.0))
    big = np.kron(scaled.astype(np.uint8), np.ones((1, 3, 3), dtype=np.uint8))
    return np.pad(big, ((0, 0), (2, 2), (2, 2)))


def write_mnist(root: Path, train_count: int = 1500) -> dict[str, int]:
    """torchvision's MNIST raw layout under root/MNIST/raw, from scikit-learn's digits."""
    import numpy as np
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    images = digits_as_mnist(digits.images)
    labels = np.asarray(digits.target, dtype=np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    parts = {
        "train": (images[:train_count], labels[:train_count]),
        "t10k": (images[train_count:], labels[train_count:]),
    }
    for prefix, (x, y) in parts.items():
        for name, array in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            (raw / name).write_bytes(idx_bytes(array))
    return {"train": train_count, "test": len(images) - train_count}


def take_words(lines: list[str], words: int) -> tuple[list[str], list[str]]:
    """The first lines holding about `words` words (whole lines), and the rest."""
    count = 0
    for i, line in enumerate(lines):
        if count >= words:
            return lines[:i], lines[i:]
        count += len(line.split()) + 1  # word_language_model adds <eos> per line
    return lines, []


def write_wikitext(examples: Path, out: Path, words: int) -> dict[str, int]:
    """A shortened wikitext-2 for word_language_model: train from the head of valid.txt, valid
    and test from two slices of test.txt (words/4 words each)."""
    src = examples / "word_language_model" / "data" / "wikitext-2"
    valid = (src / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    test = (src / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    train_lines, _ = take_words(valid, words)
    valid_lines, rest = take_words(test, words // 4)
    test_lines, _ = take_words(rest, words // 4)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, lines in (("train", train_lines), ("valid", valid_lines), ("test", test_lines)):
        (out / f"{name}.txt").write_text("".join(lines), encoding="utf-8")
        sizes[name] = sum(len(line.split()) + 1 for line in lines)
    return sizes


def char_dataset(text: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """train.bin, val.bin and meta.pkl's dict as nanoGPT's shakespeare_char/prepare.py makes
    them from `text`: sorted characters, the first 90% train, ids as uint16."""
    import numpy as np

    chars = sorted(set(text))
    if len(chars) > 65535:
        raise ValueError("more characters than uint16 ids")
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    n = len(text)
    train = np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16)
    val = np.array([stoi[c] for c in text[int(n * 0.9) :]], dtype=np.uint16)
    return train.tobytes(), val.tobytes(), {"vocab_size": len(chars), "itos": itos, "stoi": stoi}


def nanogpt_text(examples: Path) -> tuple[str, str]:
    """(where from, text): word_language_model's wikitext-2 test.txt, else the checkout's
    READMEs (of the nanoGPT checkout when no examples checkout is given)."""
    wiki = examples / "word_language_model" / "data" / "wikitext-2" / "test.txt"
    if wiki.is_file():
        return str(wiki.relative_to(examples)), wiki.read_text(encoding="utf-8")
    readmes = sorted(examples.rglob("README.md"))
    return "every README.md", "".join(p.read_text(encoding="utf-8") for p in readmes)


def write_shakespeare_char(examples: Path, out: Path) -> dict[str, Any]:
    source, text = nanogpt_text(examples)
    train, val, meta = char_dataset(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.bin").write_bytes(train)
    (out / "val.bin").write_bytes(val)
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return {"source": source, "chars": len(text), "vocab_size": meta["vocab_size"]}


def make_data(work: Path, examples: Path | None, nanogpt: Path | None, words: int) -> dict:
    data = work / "data"
    info: dict[str, Any] = {}
    if examples is not None:
        info["mnist"] = write_mnist(data)
        info["wikitext-2"] = write_wikitext(examples, data / "wikitext-2", words)
    if nanogpt is not None:
        text_from = examples if examples is not None else nanogpt
        info["shakespeare_char"] = write_shakespeare_char(text_from, data / "shakespeare_char")
    return info


# -- comparing the outputs --------------------------------------------------------------------

TIMING = (
    re.compile(r"ms/batch\s+[\d.]+"),
    re.compile(r"\btime:?\s+[\d.]+\s*m?s\b"),
    re.compile(r"\bmfu\s+-?[\d.]+%"),
    re.compile(r"\b\d+(?:\.\d+)?\s*ms\b"),
    re.compile(r"\b(?:took|elapsed)\s+[\d.]+\s*m?s\b"),
)
LOSS = re.compile(
    r"loss[\w ]{0,12}?[:=]?\s*\(?\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)",
    re.IGNORECASE,
)


def mask_timing(text: str) -> str:
    for pattern in TIMING:
        text = pattern.sub("<time>", text)
    return text


def own_lines(stdout: str) -> str:
    """The script's stdout under `netdoctor run`, less any line netdoctor printed there."""
    return "".join(
        line for line in stdout.splitlines(keepends=True) if not line.startswith("netdoctor:")
    )


def final_loss(stdout: str) -> tuple[float | None, str]:
    """The last number printed after the word 'loss', and its line."""
    last: tuple[float | None, str] = (None, "")
    for line in stdout.splitlines():
        matches = list(LOSS.finditer(line))
        if matches:
            last = (float(matches[-1].group(1)), line.strip())
    return last


def line_at(text: str, n: int) -> str:
    lines = text.splitlines()
    return lines[n - 1] if 0 < n <= len(lines) else "<end>"


def first_difference(a: str, b: str) -> tuple[int, str, str] | None:
    for n in range(1, max(a.count("\n"), b.count("\n")) + 2):
        x, y = line_at(a, n), line_at(b, n)
        if x != y:
            return n, x, y
    return None


def compare_stdout(plain: str, run: str) -> str:
    """identical | timing only | differs."""
    if plain == run:
        return "identical"
    if mask_timing(plain) == mask_timing(run):
        return "timing only"
    return "differs"


def error_line(stderr: str) -> str:
    """The exception a traceback ended with (its last 'SomethingError: ...' line), or ''."""
    found = ""
    for line in stderr.splitlines():
        if re.match(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b", line):
            found = line.strip()
    return found


# -- running ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    rc: int | None  # None: timed out
    seconds: float
    stdout: str
    stderr: str


@dataclass
class Result:
    name: str
    command: list[str]
    why: str
    python: str = ""
    torch: str = ""
    skipped: str = ""
    plain_rc: int | None = None
    run_rc: int | None = None
    plain_seconds: float = 0.0
    run_seconds: float = 0.0
    stdout: str = ""  # identical | timing only | differs | differs (unseeded)
    first_diff: list[Any] | None = None
    stderr: str = ""  # the same comparison, netdoctor's own `netdoctor:` lines left out
    stderr_diff: list[Any] | None = None
    plain_deterministic: bool | None = None  # two plain runs compared (only when run differs)
    plain_loss: float | None = None
    run_loss: float | None = None
    loss_line: str = ""  # the plain run's line the final loss came from
    run_loss_line: str = ""
    plain_error: str = ""
    run_error: str = ""
    announced: list[str] = field(default_factory=list)  # netdoctor's stderr lines
    report: bool = False
    steps: int | None = None
    backward_calls: int | None = None
    optimizers: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONHASHSEED="0",
        CUDA_VISIBLE_DEVICES="",
        MPLBACKEND="Agg",
        PYTHONDONTWRITEBYTECODE="1",
        WANDB_MODE="disabled",
    )
    return env


_IMPORTABLE: dict[tuple[str, str], bool] = {}


def importable(python: str, module: str, env: dict[str, str]) -> bool:
    key = (python, module)
    if key not in _IMPORTABLE:
        probe = f"import importlib.util as u, sys; sys.exit(u.find_spec({module!r}) is None)"
        done = subprocess.run([python, "-c", probe], env=env, capture_output=True)
        _IMPORTABLE[key] = done.returncode == 0
    return _IMPORTABLE[key]


def pick_python(candidates: list[str], needs: tuple[str, ...], env: dict[str, str]) -> str | None:
    for python in candidates:
        if all(importable(python, m, env) for m in (*NETDOCTOR_DEPS, *needs)):
            return python
    return None


def torch_version(python: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def fill(arg: str, places: dict[str, Path]) -> str:
    return arg.format(**{k: str(v) for k, v in places.items()})


def prepare(cwd: Path, script: Script, places: dict[str, Path], python: str, env: dict) -> None:
    """An empty working folder with the script's links, folders and generated data."""
    if cwd.exists():
        shutil.rmtree(cwd)
    cwd.mkdir(parents=True)
    for name, target in script.links:
        (cwd / name).symlink_to(fill(target, places))
    for name in script.dirs:
        (cwd / name).mkdir(parents=True, exist_ok=True)
    for rel in script.setup:
        subprocess.run(
            [python, str(places[script.checkout] / rel)],
            cwd=cwd,
            env=env,
            check=True,
            capture_output=True,
        )


def execute(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Outcome:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:

        def text(x: bytes | str | None) -> str:
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

        return Outcome(None, time.perf_counter() - start, text(e.stdout), text(e.stderr))
    return Outcome(done.returncode, time.perf_counter() - start, done.stdout, done.stderr)


def read_report(path: Path, result: Result) -> None:
    if not path.is_file():
        return
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return
    result.report = True
    run = report.get("measurements", {}).get("run", {})
    result.steps = run.get("steps")
    result.backward_calls = run.get("backward_calls")
    result.optimizers = [f"{o.get('class')} x{o.get('steps')}" for o in run.get("optimizers", [])]
    for f in report.get("findings", []):
        location = f.get("location") or {}
        where = f"{Path(location['path']).name}:{location.get('line')}" if location else ""
        result.findings.append(
            {
                "rule": f["rule"],
                "name": f["name"],
                "severity": f["severity"],
                "message": f["message"],
                "where": where,
                "module": f.get("module"),
            }
        )
    result.notes = list(report.get("notes", []))


def run_script(
    script: Script,
    places: dict[str, Path],
    work: Path,
    candidates: list[str],
    env: dict[str, str],
    timeout: float,
) -> Result:
    target = places[script.checkout] / script.path
    args = [fill(a, places) for a in script.args]
    result = Result(script.name, [str(target), *args], script.why)
    if not target.is_file():
        result.skipped = f"{target} not found"
        return result
    python = pick_python(candidates, script.needs, env)
    if python is None:
        wanted = ", ".join((*NETDOCTOR_DEPS, *script.needs))
        result.skipped = f"no interpreter imports {wanted}"
        return result
    result.python = python
    result.torch = torch_version(python, env)
    env = {**env, **dict(script.env)}
    cwd = work / script.name  # the examples read MNIST from ../data: the work folder's data/
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report_path = work / "reports" / f"{script.name}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.unlink(missing_ok=True)

    def once(mode: str) -> Outcome:
        prepare(cwd, script, places, python, env)
        if mode == "run":
            prefix = [python, "-m", "netdoctor", "run", "--format", "json", "-o", str(report_path)]
        else:
            prefix = [python]
        out = execute([*prefix, str(target), *args], cwd, env, timeout)
        (logs / f"{script.name}.{mode}.stdout").write_text(out.stdout, encoding="utf-8")
        (logs / f"{script.name}.{mode}.stderr").write_text(out.stderr, encoding="utf-8")
        return out

    plain = once("plain")
    run = once("run")
    run_stdout = own_lines(run.stdout)
    result.plain_rc, result.run_rc = plain.rc, run.rc
    result.plain_seconds, result.run_seconds = round(plain.seconds, 1), round(run.seconds, 1)
    result.stdout = compare_stdout(plain.stdout, run_stdout)
    diff = first_difference(plain.stdout, run_stdout)
    if result.stdout == "differs":  # the first difference that is not timing text
        masked = first_difference(mask_timing(plain.stdout), mask_timing(run_stdout))
        if masked is not None:
            n = masked[0]
            diff = (n, line_at(plain.stdout, n), line_at(run_stdout, n))
    result.first_diff = list(diff) if diff else None
    if result.stdout == "differs":
        again = once("plain2")
        result.plain_deterministic = compare_stdout(plain.stdout, again.stdout) != "differs"
        if not result.plain_deterministic:
            result.stdout = "differs (unseeded)"
    run_stderr = own_lines(run.stderr)
    result.stderr = compare_stdout(plain.stderr, run_stderr)
    if result.stderr != "identical":
        diff = first_difference(mask_timing(plain.stderr), mask_timing(run_stderr))
        if diff is not None:
            n = diff[0]
            result.stderr_diff = [n, line_at(plain.stderr, n), line_at(run_stderr, n)]
    result.plain_loss, result.loss_line = final_loss(plain.stdout)
    result.run_loss, result.run_loss_line = final_loss(run_stdout)
    result.plain_error, result.run_error = error_line(plain.stderr), error_line(run.stderr)
    result.announced = [line for line in run.stderr.splitlines() if line.startswith("netdoctor:")]
    read_report(report_path, result)
    return result


# -- the table --------------------------------------------------------------------------------


def fmt_rc(rc: int | None) -> str:
    return "timeout" if rc is None else str(rc)


def fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def python_label(r: Result) -> str:
    if not r.python:
        return "-"
    return f"{r.python} (torch {r.torch})"


def other_loss_line(r: Result) -> bool:
    """Whether the two final losses come from different lines (a run that stopped early)."""
    number = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
    plain, run = (number.sub("#", mask_timing(t)) for t in (r.loss_line, r.run_loss_line))
    return plain != run


def findings_cell(r: Result, long: bool = False) -> str:
    if not r.report:
        return "no report"
    if not r.findings:
        return "none"
    parts = []
    for f in r.findings:
        text = f"{f['rule']} {f['name']} [{f['severity']}]"
        if long:
            text += f" {f['where'] or '-'}: {f['message'][:110]}..."
        parts.append(text)
    return "; ".join(parts)


def rows(results: list[Result]) -> list[list[str]]:
    out = []
    for r in results:
        if r.skipped:
            out.append([r.name, "-", "skipped", r.skipped, "-", "-", "-", "-"])
            continue
        exits = f"{fmt_rc(r.plain_rc)} / {fmt_rc(r.run_rc)}"
        if r.run_error and r.run_error != r.plain_error:
            exits += f" ({r.run_error[:80]})"
        out.append(
            [
                r.name,
                python_label(r),
                exits,
                r.stdout,
                r.stderr or "-",
                f"{fmt_loss(r.plain_loss)} / {fmt_loss(r.run_loss)}"
                + (" (another line)" if other_loss_line(r) else ""),
                "-" if r.steps is None else str(r.steps),
                findings_cell(r),
            ]
        )
    return out


HEADER = ["script", "interpreter", "exit plain / run", "stdout", "stderr", "final loss plain / run"]
HEADER += ["steps", "findings"]


def markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines.append("")
    for r in results:
        if r.skipped:
            continue
        shown = " ".join(Path(c).name if "/" in c else c for c in r.command)
        lines.append(
            f"**{r.name}** (`{shown}`; {r.why}; {r.plain_seconds} s plain, "
            f"{r.run_seconds} s under run)"
        )
        if r.first_diff:
            n, a, b = r.first_diff
            lines.append(f"- first stdout difference, line {n}: `{a.strip()}` / `{b.strip()}`")
        if other_loss_line(r):
            lines.append(
                f"- the final losses come from different lines: `{r.loss_line}` / "
                f"`{r.run_loss_line}`"
            )
        if r.stderr_diff:
            n, a, b = r.stderr_diff
            lines.append(
                f"- stderr: {r.stderr}, first at line {n}: `{a.strip()[:160]}` / "
                f"`{b.strip()[:160]}`"
            )
        if r.plain_deterministic is False:
            lines.append("- two plain runs differ as well: the script is not deterministic")
        if r.run_error and r.run_error != r.plain_error:
            lines.append(f"- under run it failed with `{r.run_error}`")
        elif r.plain_error:
            lines.append(f"- both failed: `{r.plain_error}`")
        if r.optimizers or r.backward_calls is not None:
            lines.append(
                f"- optimizers seen: {', '.join(r.optimizers) or 'none'}; "
                f"backward passes {r.backward_calls}"
            )
        for line in r.announced:
            lines.append(f"- announced on stderr: `{line[:200]}`")
        for f in r.findings:
            lines.append(
                f"- {f['rule']} {f['name']} [{f['severity']}] {f['where'] or '(no line)'}: "
                f"{f['message'][:160]}..."
            )
        for note in r.notes:
            lines.append(f"- note: {note}")
        lines.append("")
    return "\n".join(lines)


def text_table(results: list[Result]) -> str:
    table = [HEADER, *rows(results)]
    widths = [min(max(len(row[i]) for row in table), 60) for i in range(len(HEADER) - 1)]
    out = []
    for row in table:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)]
        out.append("  ".join([*cells, row[-1]]))
    return "\n".join(out)


def with_extra_args(scripts: list[Script], extra: list[str]) -> list[Script]:
    """`scripts` with each `NAME=ARG` of `extra` appended to script NAME's arguments."""
    added: dict[str, list[str]] = {}
    names = {s.name for s in scripts}
    for item in extra:
        name, sep, arg = item.partition("=")
        if not sep or not arg or name not in names:
            raise ValueError(f"--arg {item!r}: expected NAME=ARG with NAME one of the scripts run")
        added.setdefault(name, []).append(arg)
    return [replace(s, args=(*s.args, *added[s.name])) if s.name in added else s for s in scripts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=Path, help="a checkout of github.com/pytorch/examples")
    p.add_argument("--nanogpt", type=Path, help="a checkout of github.com/karpathy/nanoGPT")
    p.add_argument(
        "--python",
        action="append",
        default=[],
        help="another interpreter to try for scripts this one cannot import (torchvision, ...); "
        "repeatable, in order",
    )
    p.add_argument("--only", action="append", default=[], help="script names, comma separated")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    p.add_argument("--threads", type=int, default=1, help="OpenMP/MKL threads per run")
    p.add_argument("--words", type=int, default=40000, help="words of word_language_model train")
    p.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print the markdown table")
    p.add_argument("--summary", type=Path, help="only print the table of a saved --json")
    p.add_argument("--list", action="store_true", help="list the scripts and their arguments")
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="NAME=ARG",
        help="append ARG to script NAME's arguments (repeatable), e.g. "
        "nanogpt_shakespeare_char=--learning_rate=0.1 for a mutation",
    )
    a = p.parse_args(argv)

    if a.list:
        for s in SCRIPTS:
            print(f"{s.name:34} {s.checkout}/{s.path} {' '.join(s.args)}")
        return 0
    if a.summary:
        saved = json.loads(a.summary.read_text(encoding="utf-8"))
        results = [Result(**r) for r in saved["results"]]
        print(markdown(results) if a.markdown else text_table(results))
        return 0
    if a.examples is None and a.nanogpt is None:
        p.error("give --examples DIR and/or --nanogpt DIR (or --summary FILE)")

    only = {n.strip() for group in a.only for n in group.split(",") if n.strip()}
    unknown = only - {s.name for s in SCRIPTS}
    if unknown:
        p.error(f"unknown script(s): {', '.join(sorted(unknown))}")
    chosen = [s for s in SCRIPTS if not only or s.name in only]
    try:
        chosen = with_extra_args(chosen, a.arg)
    except ValueError as e:
        p.error(str(e))
    examples = a.examples.resolve() if a.examples else None
    nanogpt = a.nanogpt.resolve() if a.nanogpt else None
    chosen = [s for s in chosen if (examples if s.checkout == "examples" else nanogpt)]

    work = (a.work or Path(tempfile.mkdtemp(prefix="netdoctor-real-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", file=sys.stderr)
    data_info = make_data(work, examples, nanogpt, a.words)
    print(f"data: {json.dumps(data_info)}", file=sys.stderr)
    places = {"data": work / "data"}
    if examples:
        places["examples"] = examples
    if nanogpt:
        places["nanogpt"] = nanogpt
    env = environment(a.threads)
    candidates = [sys.executable, *a.python]

    results = []
    for script in chosen:
        print(f"{script.name} ...", file=sys.stderr, flush=True)
        r = run_script(script, places, work, candidates, env, a.timeout)
        results.append(r)
        print("  " + " | ".join(rows([r])[0][1:]), file=sys.stderr, flush=True)

    print(markdown(results) if a.markdown else text_table(results))
    if a.json:
        checkouts = {}
        for key in ("examples", "nanogpt"):
            if key in places:
                head = subprocess.run(
                    ["git", "-C", str(places[key]), "rev-parse", "HEAD"],
                    capture_output=True,
                    text=True,
                )
                checkouts[key] = {"path": str(places[key]), "commit": head.stdout.strip()}
        a.json.write_text(
            json.dumps(
                {
                    "checkouts": checkouts,
                    "data": data_info,
                    "threads": a.threads,
                    "timeout": a.timeout,
                    "results": [asdict(r) for r in results],
                },
                indent=1,
            ),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
