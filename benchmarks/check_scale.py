"""How `netdoctor check` scales with the model: wall time and peak memory of a check against the
plain build floor, for Llama-style language models of 125M to 70B parameters and a ResNet-50.

    python benchmarks/check_scale.py --markdown                 # every size that fits, 3 repeats
    python benchmarks/check_scale.py --only 125m,1b --repeats 5 --threads 1
    python benchmarks/check_scale.py --python ../zoo-venv/bin/python   # ResNet-50 from there
    python benchmarks/check_scale.py --list                     # the sizes and the guard, no runs
    python benchmarks/check_scale.py --try-all --timeout 3600   # also what is expected not to fit
    python benchmarks/check_scale.py --summary scale.json --markdown   # the table of a saved run

Not CI: the default sizes build models of up to 70B parameters. No test runs it in full;
tests/benchmarks/ tests its pure helpers, and the docs test runs `--only tiny` (a 2-layer Llama).

The models (CONFIGS below; `--only KEYS`, comma separated):

  * Llama-style, `LlamaForCausalLM(LlamaConfig(...))` from transformers with the published
    architecture of a model of each size: 125m (SmolLM-135M, the nearest published Llama-type
    config to 125M), 1b (Llama-3.2-1B), 7b (Llama-2-7B), 13b (Llama-2-13B), 70b (Llama-2-70B,
    grouped-query attention). Only the fields that set the architecture's shape and its cost
    are given (no rope scaling); the weights are the library's own random init. Checked on
    token ids of --seq-len (default 64): `--input-shape 64 --input-dtype long`.
    The parameter count is computed from the config without building (`llama_params`).
  * resnet50: torchvision's `resnet50()` where an interpreter imports torchvision, else timm's
    `create_model("resnet50")`; without either the row is skipped with a note. Checked at
    `--input-shape 3,224,224`.
  * tiny (not in the default set): a 2-layer, width-64 Llama, to try the script in seconds.

Each model is written as a small `model.py` (a `build()` function) into a work folder, and three
commands run on it, each in a fresh process, in turn (import, floor, check; then again, for
--repeats rounds), so that a change in the machine's load falls on all three alike:

  * import: the interpreter imports torch and the model's library (`model.py` without `build()`);
  * floor: the same, then builds the model (`build()`), and for ResNet-50 also traces it with
    torch.fx (what any check of it must do; fx cannot trace the Llama models, so their floor is
    the build alone);
  * check: `python -m netdoctor check model.py:build --input-shape ... --format json -o ...
    --fail-on never`; the report's findings are listed (rule and severity).

Wall seconds, CPU seconds and the peak resident memory (the child's ru_maxrss, from wait4) are
measured per process; the table shows the medians, and the ratios check / floor are the medians
of the ratios of each round. Every process runs with this checkout's src/ first on PYTHONPATH,
netdoctor byte-compiled first (as an installed copy is), --threads OpenMP/MKL threads when given,
no CUDA device, and no network for transformers.

The memory guard. Before a model runs, its fp32 weights (parameters x 4 bytes) are compared with the
memory available now (MemAvailable of /proc/meminfo, else psutil) less --margin-gb (default 4 GB:
the interpreter, torch, the library and the rest of the machine). When they do not fit, the floor is
reported as "cannot build (N GB of fp32 weights)" and not run; `check` is run only when it is
expected to fit: a model past netdoctor's sizing budget (`defer_params`) is checked on the meta
device, a few weights at a time, and needs DEFERRED_CHECK_BYTES; a smaller one its fp32 weights
(`needed_bytes`). --try-all runs them anyway. Whatever runs is held to a hard limit (--limit-gb,
default the memory available less 1 GB): the data segment of each process is capped with
setrlimit(RLIMIT_DATA) (an allocation beyond it fails in the process; RLIMIT_AS would also count the
libraries a CUDA build of torch maps and never touches), and a watchdog kills the process if its
resident memory still passes the limit; --timeout (default 1800 s) bounds every run. The machine
never swaps or runs out of memory: such a run is reported as "over the memory limit".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
GB = 1e9  # decimal gigabytes, for weights and memory alike

# What netdoctor itself imports at run time (pyproject's dependencies).
NETDOCTOR_DEPS = ("torch", "click", "rich", "libcst", "numpy")

# torchvision's resnet50() and timm's create_model("resnet50") have the same parameters.
RESNET50_PARAMS = 25_557_032


@dataclass(frozen=True)
class Config:
    """One model of the benchmark. `llama` holds LlamaConfig keyword arguments (kind "llama")."""

    key: str
    label: str
    kind: str  # "llama" | "resnet50"
    llama: Mapping[str, Any] = field(default_factory=dict)
    default: bool = True  # in the set run without --only

    @property
    def params(self) -> int:
        return llama_params(self.llama) if self.kind == "llama" else RESNET50_PARAMS


CONFIGS: tuple[Config, ...] = (
    Config(
        "125m",
        "Llama 125M (SmolLM-135M config)",
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
        ),
    ),
    Config(
        "1b",
        "Llama 1B (Llama-3.2-1B config)",
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
        ),
    ),
    Config(
        "7b",
        "Llama 7B (Llama-2-7B config)",
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    ),
    Config(
        "13b",
        "Llama 13B (Llama-2-13B config)",
        "llama",
        dict(
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    ),
    Config(
        "70b",
        "Llama 70B (Llama-2-70B config, GQA)",
        "llama",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    ),
    Config("resnet50", "ResNet-50", "resnet50"),
    Config(
        "tiny",
        "Llama tiny (2 layers, width 64)",
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        ),
        default=False,
    ),
)


# -- the parameter count and the memory guard (pure; tests/benchmarks/ tests them) --------------


def llama_params(cfg: Mapping[str, Any]) -> int:
    """The parameter count of LlamaForCausalLM(LlamaConfig(**cfg)), without building it.

    Embedding V x H; per layer the q and o projections (H x heads*d each), k and v (H x kv*d
    each, grouped-query attention when kv < heads), the gated MLP (3 x H x I), two RMSNorm
    weights (H); the final norm (H); the LM head (H x V) unless tied to the embedding. Biases
    where attention_bias / mlp_bias ask for them. Missing fields take LlamaConfig's defaults."""
    h = int(cfg.get("hidden_size", 4096))
    inter = int(cfg.get("intermediate_size", 11008))
    layers = int(cfg.get("num_hidden_layers", 32))
    heads = int(cfg.get("num_attention_heads", 32))
    kv = cfg.get("num_key_value_heads")
    kv = heads if kv is None else int(kv)
    vocab = int(cfg.get("vocab_size", 32000))
    d = cfg.get("head_dim")
    d = h // heads if d is None else int(d)
    attention = 2 * h * heads * d + 2 * h * kv * d
    if cfg.get("attention_bias", False):
        attention += heads * d + 2 * kv * d + h
    mlp = 3 * h * inter
    if cfg.get("mlp_bias", False):
        mlp += 2 * inter + h
    per_layer = attention + mlp + 2 * h
    head = 0 if cfg.get("tie_word_embeddings", False) else h * vocab
    return vocab * h + layers * per_layer + h + head


DEFERRED_CHECK_BYTES = 3 * 1024**3  # issue 18's goal for a deferred check, whatever the size


def defer_params() -> int:
    """Above this many parameters `check` builds on the meta device: where the float32 weights
    pass this checkout's netdoctor.loading.target.SIZING_BYTES."""
    sys.path.insert(0, str(SRC))
    try:
        from netdoctor.loading.target import SIZING_BYTES
    finally:
        sys.path.remove(str(SRC))
    return SIZING_BYTES // 4


def needed_bytes(params: int, what: str) -> int:
    """The memory a run is expected to need beyond the interpreter and its libraries: the fp32
    weights for the floor and for a check that builds the model; a check above defer_params()
    builds it on the meta device and holds a few weights at a time, so it is run whenever
    its goal (DEFERRED_CHECK_BYTES) fits."""
    if what not in ("floor", "check"):
        raise ValueError(f"unknown run {what!r}")
    if what == "check" and params > defer_params():
        return DEFERRED_CHECK_BYTES
    return params * 4


@dataclass(frozen=True)
class Decision:
    run: bool
    limited: bool  # run although expected not to fit (--try-all): the hard limit will decide
    reason: str  # the table's text when the run does not happen, else ""


def guard(params: int, what: str, available: int | None, margin: int, try_all: bool) -> Decision:
    """Whether to run `what` ("floor" or "check") on a model of `params` parameters, with
    `available` bytes of memory free now (None: unknown) and `margin` bytes kept for the
    interpreter, its libraries and the rest of the machine."""
    need = needed_bytes(params, what)
    if available is None or need <= available - margin:
        return Decision(True, False, "")
    if try_all:
        return Decision(True, True, "")
    if what == "floor":
        return Decision(False, False, f"cannot build ({gb_text(need)} of fp32 weights)")
    return Decision(False, False, f"not run (expected not to fit: {gb_text(need)})")


def meminfo_available(text: str) -> int | None:
    """MemAvailable of a /proc/meminfo text, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * 1024 if parts[2:3] == ["kB"] else int(parts[1])
    return None


def available_memory() -> int | None:
    """The memory available to a new process now, in bytes (None when unknown)."""
    try:
        found = meminfo_available(Path("/proc/meminfo").read_text())
        if found is not None:
            return found
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def median_ratio(num: list[float | None], den: list[float | None]) -> float | None:
    """The median over rounds of num/den, from the rounds where both were measured."""
    ratios = [a / b for a, b in zip(num, den) if a is not None and b]
    return statistics.median(ratios) if ratios else None


# -- running one process -----------------------------------------------------------------------


@dataclass
class Run:
    status: str  # "ok" | "failed" | "timeout" | "memory"
    wall: float | None = None
    cpu: float | None = None
    rss: int | None = None  # peak resident bytes
    error: str = ""  # for the table
    detail: str = ""  # the last line of stderr of a failed run


def _rss_now(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _limit_data(limit: int | None):
    def apply() -> None:
        if limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    return apply


def run_measured(
    argv: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float | None,
    limit: int | None,
    log: Path,
) -> Run:
    """One fresh process: its wall and CPU seconds and its peak resident memory; killed past
    `timeout` seconds or `limit` resident bytes (and its data segment capped at `limit`)."""
    start = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=_limit_data(limit) if limit is not None else None,
        )
    killed: list[str] = []
    done = threading.Event()
    try:  # a pidfd names this process even once it is reaped: no other can get the signal
        pidfd: int | None = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        while not done.wait(0.05):
            over_time = timeout is not None and time.perf_counter() - start > timeout
            rss = _rss_now(proc.pid) if limit is not None else None
            over_memory = rss is not None and limit is not None and rss > limit
            if over_time or over_memory:
                killed.append("timeout" if over_time else "memory")
                try:
                    if pidfd is not None:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if pidfd is not None:
        os.close(pidfd)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    run = Run("ok", wall, usage.ru_utime + usage.ru_stime, rss)
    if killed:
        run.status = killed[0]
        run.error = f"killed after {wall:.0f} s (--timeout)"
        if killed[0] == "memory":
            run.error = f"killed at {rss / GB:.1f} GB resident (limit {(limit or 0) / GB:.1f} GB)"
    elif proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()
        last = tail[-1] if tail else f"exit {proc.returncode}"
        memory = any(s in last for s in ("MemoryError", "can't allocate memory", "std::bad_alloc"))
        if memory and limit is not None:
            run.status = "memory"
            run.error = (
                f"an allocation was refused at the {limit / GB:.1f} GB limit "
                f"(peak {rss / GB:.1f} GB, after {wall:.0f} s)"
            )
        else:
            run.status, run.error = "failed", last[:300]
        run.detail = last[:1000]
    return run


# -- the model files and the commands ---------------------------------------------------------

MODEL_HEADER = '"""Written by benchmarks/check_scale.py: {label}, built as a user builds it."""\n\n'

LLAMA_FILE = """from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = {config}


def build():
    return LlamaForCausalLM(LlamaConfig(**CONFIG))
"""

RESNET_FILES = {
    "torchvision": "from torchvision.models import resnet50\n\n\ndef build():\n"
    "    return resnet50()\n",
    "timm": 'import timm\n\n\ndef build():\n    return timm.create_model("resnet50")\n',
}

# The import and floor processes: `python -c FLOOR model.py import|build|trace`.
FLOOR = """
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("model", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if sys.argv[2] != "import":
    model = module.build()
if sys.argv[2] == "trace":
    import torch.fx

    torch.fx.symbolic_trace(model)
"""


def model_source(config: Config, library: str) -> str:
    """The model.py of a configuration (`library`: where ResNet-50 comes from)."""
    head = MODEL_HEADER.format(label=config.label)
    if config.kind == "llama":
        return head + LLAMA_FILE.format(config=dict(config.llama))
    return head + RESNET_FILES[library]


def check_argv(python: str, config: Config, seq_len: int, report: Path) -> list[str]:
    shape = ["--input-shape", str(seq_len), "--input-dtype", "long"]
    if config.kind == "resnet50":
        shape = ["--input-shape", "3,224,224"]
    return [
        python,
        "-m",
        "netdoctor",
        "check",
        "model.py:build",
        *shape,
        "--format",
        "json",
        "-o",
        str(report),
        "--fail-on",
        "never",
    ]


def environment(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    env.update(
        PYTHONHASHSEED="0",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        NO_COLOR="1",
    )
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


_IMPORTABLE: dict[tuple[str, str], bool] = {}


def importable(python: str, module: str, env: dict[str, str]) -> bool:
    key = (python, module)
    if key not in _IMPORTABLE:
        probe = f"import importlib.util as u, sys; sys.exit(u.find_spec({module!r}) is None)"
        try:
            done = subprocess.run([python, "-c", probe], env=env, capture_output=True)
        except OSError:  # no such interpreter
            _IMPORTABLE[key] = False
        else:
            _IMPORTABLE[key] = done.returncode == 0
    return _IMPORTABLE[key]


def pick(config: Config, candidates: list[str], env: dict[str, str]) -> tuple[str, str] | None:
    """(interpreter, library) for a configuration: the first interpreter that imports
    netdoctor's dependencies and the model's library (ResNet-50: torchvision, else timm)."""
    libraries = ("transformers",) if config.kind == "llama" else ("torchvision", "timm")
    for library in libraries:
        for python in candidates:
            if all(importable(python, m, env) for m in (*NETDOCTOR_DEPS, library)):
                return python, library
    return None


def versions(python: str, library: str, env: dict[str, str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        f"names = ['torch', {library!r}]\n"
        "out = {n: m.version(n) for n in names}\n"
        "out['python'] = platform.python_version()\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


# -- one configuration ---------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    params: int
    weights_gb: float
    python: str = ""
    library: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    skipped: str = ""  # why the whole row did not run
    floor_skipped: str = ""
    check_skipped: str = ""
    floor_what: str = ""  # "build" | "build + fx trace"
    available_gb: float | None = None
    limit_gb: float | None = None
    imports: list[dict[str, Any]] = field(default_factory=list)
    floors: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


def default_repeats(params: int) -> int:
    return 3 if params < 3e9 else 1


def run_config(config: Config, a: argparse.Namespace, candidates: list[str], env, work: Path):
    params = config.params
    row = Row(config.key, config.label, params, round(needed_bytes(params, "floor") / GB, 2))
    chosen = pick(config, candidates, env)
    if chosen is None:
        wanted = "transformers" if config.kind == "llama" else "torchvision or timm"
        row.skipped = f"no interpreter imports {wanted} (give one with --python)"
        return row
    python, library = chosen
    row.python, row.library = python, library
    row.versions = versions(python, library, env)
    available = available_memory()
    margin = int(a.margin_gb * GB)
    floor = guard(params, "floor", available, margin, a.try_all)
    check = guard(params, "check", available, margin, a.try_all)
    row.floor_skipped, row.check_skipped = floor.reason, check.reason
    row.available_gb = round(available / GB, 1) if available is not None else None
    if a.limit_gb is not None:
        limit: int | None = int(a.limit_gb * GB)
    else:
        limit = available - int(GB) if available is not None else None
    row.limit_gb = round(limit / GB, 1) if limit is not None else None

    folder = work / config.key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(model_source(config, library), encoding="utf-8")
    trace = config.kind == "resnet50"
    row.floor_what = "build + fx trace" if trace else "build"
    floor_argv = [python, "-c", FLOOR, "model.py", "trace" if trace else "build"]
    import_argv = [python, "-c", FLOOR, "model.py", "import"]
    report = folder / "report.json"
    repeats = a.repeats or default_repeats(params)
    if not (floor.run or check.run):
        return row  # nothing of this model runs: its import alone says nothing about it
    # warm the file cache (torch, the library, netdoctor) before anything is measured
    run_measured(import_argv, folder, env, a.timeout, limit, folder / "warm.log")
    for i in range(repeats):
        runs = []
        if a.import_only:
            runs.append(("import", import_argv, row.imports))
        if floor.run:
            runs.append(("floor", floor_argv, row.floors))
        if check.run:
            runs.append(("check", check_argv(python, config, a.seq_len, report), row.checks))
        for name, argv, out in runs:
            if report.exists() and name == "check":
                report.unlink()
            r = run_measured(argv, folder, env, a.timeout, limit, folder / f"{name}{i}.log")
            out.append(asdict(r))
            shown = f"{r.wall:.1f} s, {(r.rss or 0) / GB:.2f} GB" if r.status == "ok" else r.error
            print(f"  {config.key} round {i + 1}/{repeats} {name}: {shown}", file=sys.stderr)
            if name == "check" and r.status == "ok" and report.exists():
                row.findings = report_findings(json.loads(report.read_text(encoding="utf-8")))
    return row


def report_findings(report: Any) -> list[str]:
    """'ND001 info' for each finding of a check --format json report (one report or a list)."""
    reports = report if isinstance(report, list) else [report]
    return [f"{f['rule']} {f['severity']}" for r in reports for f in r.get("findings", [])]


# -- the tables ---------------------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r["status"] == "ok"]
    return statistics.median(values) if values else None


def cell(runs: list[dict[str, Any]], skipped: str) -> str:
    """'12.1 s / 4.52 GB', or why it was not run or did not finish."""
    if skipped:
        return skipped
    if not runs:
        return "-"
    wall, rss = _median(runs, "wall"), _median(runs, "rss")
    if wall is None or rss is None:
        failed = next(r for r in runs if r["status"] != "ok")
        kind = {"memory": "over the memory limit", "timeout": "timed out"}
        return f"{kind.get(failed['status'], 'failed')}: {failed['error']}"
    return f"{wall:.1f} s / {rss / GB:.2f} GB"


def ratio(row: Row, key: str) -> str:
    def ok(runs: list[dict[str, Any]]) -> list[float | None]:
        return [r[key] if r["status"] == "ok" else None for r in runs]

    found = median_ratio(ok(row.checks), ok(row.floors))
    return "-" if found is None else f"{found:.2f}x"


def gb_text(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / GB:.2f} GB"


def params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def findings_text(findings: list[str]) -> str:
    counts: dict[str, int] = {}
    for f in findings:
        counts[f] = counts.get(f, 0) + 1
    return ", ".join(f if n == 1 else f"{f} x{n}" for f, n in counts.items()) or "none"


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        head = [r.label, params_text(r.params), gb_text(needed_bytes(r.params, "floor"))]
        if r.skipped:
            out.append([*head, "-", r.skipped, "-", "-", "-", "-"])
            continue
        imports = cell(r.imports, "")
        floor = cell(r.floors, r.floor_skipped)
        check = cell(r.checks, r.check_skipped)
        checked = any(c["status"] == "ok" for c in r.checks)
        findings = findings_text(r.findings) if checked else "-"
        out.append([*head, imports, floor, check, ratio(r, "wall"), ratio(r, "rss"), findings])
    return out


HEADER = [
    "model",
    "params",
    "fp32 weights",
    "import only",
    "floor (wall / peak RSS)",
    "check (wall / peak RSS)",
    "check / floor wall",
    "check / floor RSS",
    "findings",
]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def text_table(rows: list[Row]) -> str:
    table = [HEADER, *table_rows(rows)]
    widths = [min(max(len(row[i]) for row in table), 44) for i in range(len(HEADER) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths)), row[-1]]) for row in table
    )


def describe(rows: list[Row], info: dict[str, Any]) -> str:
    """What ran where: the machine, the interpreters and their versions, the settings."""
    lines = [
        f"machine: {info['cpus']} CPUs, {info['memory_gb']} GB memory "
        f"({info['available_gb']} GB available at the start), load {info['load']}; "
        f"threads: {info['threads'] or 'torch default'}; repeats: {info['repeats']}; "
        f"sequence length {info['seq_len']}"
    ]
    for r in rows:
        if r.versions:
            shown = ", ".join(f"{k} {v}" for k, v in r.versions.items())
            how = f"floor = import + {r.floor_what}"
            lines.append(f"{r.key}: {shown} ({how}; {len(r.checks)} check runs)")
    return "\n".join(lines)


def machine(a: argparse.Namespace) -> dict[str, Any]:
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    available = available_memory()
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(total / GB, 1) if total else None,
        "available_gb": round(available / GB, 1) if available else None,
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "platform": platform.platform(),
        "threads": a.threads,
        "repeats": a.repeats or "3 below 3B parameters, else 1",
        "seq_len": a.seq_len,
        "margin_gb": a.margin_gb,
        "try_all": a.try_all,
        "timeout": a.timeout,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    keys = [c.key for c in CONFIGS]
    p.add_argument("--only", action="append", default=[], help=f"comma separated: {keys}")
    p.add_argument(
        "--python",
        action="append",
        default=[],
        help="another interpreter to try for models this one cannot build (ResNet-50 needs "
        "torchvision or timm); repeatable, in order",
    )
    p.add_argument("--repeats", type=int, help="rounds per model (default 3 below 3B, else 1)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS/MKL_NUM_THREADS for every run")
    p.add_argument("--seq-len", type=int, default=64, help="token ids per sample (Llama)")
    p.add_argument(
        "--no-import-only",
        dest="import_only",
        action="store_false",
        help="leave out the import-only process",
    )
    p.add_argument(
        "--margin-gb",
        type=float,
        default=4.0,
        help="memory kept free by the guard beyond the fp32 weights (default 4)",
    )
    p.add_argument(
        "--try-all",
        action="store_true",
        help="run what the guard expects not to fit too (under --limit-gb and --timeout)",
    )
    p.add_argument(
        "--limit-gb",
        type=float,
        help="hard memory limit of each run (default: available memory less 1 GB)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (1800)")
    p.add_argument("--work", type=Path, help="work folder, kept (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print the markdown table")
    p.add_argument("--summary", type=Path, help="only print the tables of a saved --json")
    p.add_argument("--list", action="store_true", help="the models and the guard; run nothing")
    a = p.parse_args(argv)

    if a.summary:
        saved = json.loads(a.summary.read_text(encoding="utf-8"))
        rows = [Row(**r) for r in saved["rows"]]
        print(describe(rows, saved["machine"]))
        print(markdown(rows) if a.markdown else text_table(rows))
        return 0
    only = {k.strip() for group in a.only for k in group.split(",") if k.strip()}
    unknown = only - set(keys)
    if unknown:
        p.error(f"unknown model(s): {', '.join(sorted(unknown))}; known: {', '.join(keys)}")
    chosen = [c for c in CONFIGS if (c.key in only if only else c.default)]

    if a.list:
        available = available_memory()
        shown = f"{available / GB:.1f} GB" if available is not None else "unknown"
        print(f"memory available now: {shown}; guard margin {a.margin_gb} GB")
        for c in chosen:
            d = guard(c.params, "floor", available, int(a.margin_gb * GB), a.try_all)
            verdict = d.reason or ("runs (limited)" if d.limited else "runs")
            print(f"{c.key:9} {c.label:38} {c.params:>14,} params  {verdict}")
        return 0

    env = environment(a.threads)
    candidates = [sys.executable, *a.python]
    for python in dict.fromkeys(candidates):  # netdoctor byte-compiled, as installed
        try:
            subprocess.run(
                [python, "-m", "compileall", "-q", str(SRC / "netdoctor")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            pass  # no such interpreter: pick() passes it over
    info = machine(a)
    keep = a.work is not None
    work = (a.work or Path(tempfile.mkdtemp(prefix="netdoctor-scale-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for config in chosen:
            print(f"{config.key} ({config.params:,} parameters) ...", file=sys.stderr, flush=True)
            rows.append(run_config(config, a, candidates, env, work))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(describe(rows, info))
    print(markdown(rows) if a.markdown else text_table(rows))
    if a.json:
        a.json.write_text(
            json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=1),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
