"""Every command shown in the docs runs: the pages of docs/ and the README.

How a page shows a command (CONTRIBUTING.md, "Commands in the docs are tested"):

* A command is a line starting with `$ ` in a ```console block (a line ending in `\\` continues
  it); the lines after it, up to the next `$ `, are its output, abridged where they show `...`.
* The line just before the block may hold a marker, `<!-- doc-test: exit=1 slow -->`:
  `exit=` the expected exit code of each command (one value for all, or one per command,
  comma separated; default 0), `slow` to mark the block's test slow.
* `<!-- doc-test: file=NAME -->` before a python, toml or yaml block: the tests write the block
  to NAME in the working folder before running any command that comes after it on the page.
* Outside ```console blocks, docs/ holds no shell commands: no ```bash/```sh blocks, no `$ `
  lines. A synopsis with placeholders goes in a ```text block without a prompt.

Each block runs in a fresh working folder that looks like a checkout: a copy of fixtures/, a
`models/` folder (two sick fixtures and a healthy LeNet) committed to a git repository, and
benchmarks/ linked. The built-in data sets come from `tests/datagen.py` (no download). A block
of plain `netdoctor ...` commands runs in this process (`invoke`); any other block runs as one
bash session (so `cd` and files carry from one command to the next), with `netdoctor`, `python`
and `torchrun` meaning this interpreter and this checkout.

Each `NDxxx name [severity]` that a block's output shows must appear in the real output (not
checked for `probe`, whose findings can depend on the machine's speed through its time budget).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, invoke

DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

# Commands that cannot run in a test, with the reason: they are shown, never run.
SKIP = {
    "pip install torch==2.13.0": "installs packages (a fresh machine: .ci/run does this)",
    "pip install -e .": "installs packages (a fresh machine: .ci/run does this)",
    'pip install -e ".[test]"': "installs packages (a fresh machine: .ci/run does this)",
    "python -m pytest": "the test suite itself (it would run this test again)",
}

# Benchmarks run for minutes to hours; the tests run each in a reduced form (its own flags,
# appended: argparse takes the last value), so the script keeps working.
REDUCED = {
    "python benchmarks/check_speed.py": "--only ratio --pairs 1",
    "python benchmarks/check_scale.py": "--only tiny --repeats 1 --no-import-only",
    "python benchmarks/run_overhead.py --models transformer-fp16": (
        "--rounds 1 --whole 0 --steps 4 --warmup 1"
    ),
    "python benchmarks/run_overhead.py --models transformer-bf16": (
        "--rounds 1 --whole 0 --steps 4 --warmup 1"
    ),
    "python benchmarks/run_overhead.py": (
        "--models resnet18 --rounds 1 --whole 0 --steps 10 --warmup 2"
    ),
    "python benchmarks/probe_overhead.py": "--steps 5 --repeat 1 --skip-cli --batch-size 8",
    "python benchmarks/probe_budget.py": "--only inferred --budget 20",
    "python benchmarks/synthetic_calibration.py": "lenet_relu --threads 1",
    "python benchmarks/init_margins.py": "--seeds 1 -k lenet_relu",
    "python benchmarks/init_training.py": "--seeds 1 -k mlp2",
}

# Commands known to fail today, with the reason: a strict xfail, so that the fix shows.
BROKEN: dict[str, str] = {}

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:(?P<body>.*?)-->\s*$")
SHOWN_FINDING = re.compile(r"\bND\d{3} [a-z0-9-]+ \[(?:error|warning|info)\]")
SHELL_SYNTAX = re.compile(r"[|&;<>$`*()]|^cd\b")
ALLOWED_LANGS = {"console", "python", "toml", "yaml", "text", "json", "diff"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # the block's lines, without the fence's indentation
    marker: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[str]:
        out: list[str] = []
        continued = False
        for line in self.text.splitlines():
            if continued:
                out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
            elif line.startswith("$ "):
                out.append(line[2:].strip())
            else:
                continue
            continued = out[-1].endswith("\\")
        return out

    def expected_exits(self) -> list[int]:
        commands = self.commands()
        codes = [int(c) for c in self.marker.get("exit", "0").split(",")]
        if len(codes) == 1:
            codes *= len(commands)
        assert len(codes) == len(commands), (
            f"{self.id}: exit= lists {len(codes)} codes for {len(commands)} commands"
        )
        return codes


def parse_marker(line: str) -> dict[str, str]:
    m = MARKER.match(line)
    if not m:
        return {}
    marker = {}
    for word in m.group("body").split():
        key, _, value = word.partition("=")
        marker[key] = value
    return marker


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group("indent")), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        found.append(
            Block(page, start + 1, m.group("lang"), "\n".join(body) + "\n", parse_marker(previous))
        )
        i += 1
    return found


def console_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks_of(page) if b.lang == "console"]


def params():
    out = []
    for block in console_blocks():
        marks = []
        if "slow" in block.marker:
            marks.append(pytest.mark.slow)
        for prefix, reason in BROKEN.items():
            if any(c.startswith(prefix) for c in block.commands()):
                marks.append(pytest.mark.xfail(reason=reason, strict=True))
        out.append(pytest.param(block, id=block.id, marks=marks))
    return out


# ------------------------------------------------------------------------------- the folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """FashionMNIST and MNIST in the torchvision raw layout, generated (no download)."""
    from datagen import write_idx_dataset

    root = tmp_path_factory.mktemp("doc-data")
    for name in ("FashionMNIST", "MNIST"):
        write_idx_dataset(root, name, n_train=1024, n_test=64, images="templates")
    return root


@pytest.fixture(scope="session")
def shims(tmp_path_factory) -> Path:
    """`netdoctor`, `python` and `torchrun` for the shell: this interpreter, this checkout."""
    folder = tmp_path_factory.mktemp("doc-bin")
    for name, line in (
        ("netdoctor", f'exec "{sys.executable}" -m netdoctor "$@"'),
        ("python", f'exec "{sys.executable}" "$@"'),
        ("torchrun", f'exec "{sys.executable}" -m torch.distributed.run "$@"'),
    ):
        path = folder / name
        path.write_text(f"#!/bin/sh\n{line}\n", encoding="utf-8")
        path.chmod(0o755)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_folder(root: Path, block: Block) -> Path:
    """A checkout-like working folder, with the page's file= blocks written up to `block`."""
    shutil.copytree(
        REPO / "fixtures", root / "fixtures", ignore=shutil.ignore_patterns("__pycache__")
    )
    models = root / "models"
    models.mkdir()
    for name in ("zero_init.py", "mlp.py"):
        shutil.copy(REPO / "fixtures" / "sick" / name, models / name)
    shutil.copy(REPO / "fixtures" / "healthy" / "lenet_relu.py", models / "lenet.py")
    (root / "benchmarks").symlink_to(REPO / "benchmarks", target_is_directory=True)
    git = ["git", "-c", "user.name=doc", "-c", "user.email=doc@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "checkout"]):
        subprocess.run([*git, *args], cwd=root, check=True, capture_output=True)
    for earlier in blocks_of(block.page):
        if earlier.line >= block.line:
            break
        if "file" in earlier.marker:
            target = root / earlier.marker["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(earlier.text, encoding="utf-8")
    return root


def reduced(command: str) -> str:
    for prefix, extra in REDUCED.items():
        if command.startswith(prefix):
            return f"{command} {extra}"
    return command


def in_process(commands: list[str]) -> bool:
    return all(c.startswith("netdoctor ") and not SHELL_SYNTAX.search(c) for c in commands)


def run_in_shell(commands: list[str], folder: Path, shims: Path) -> tuple[list[int], str]:
    """The commands as one bash session in `folder`: (exit code of each, all output)."""
    rc_file = folder.parent / "exit-codes"
    lines = ["cd " + shlex.quote(str(folder))]
    for command in commands:
        lines += [reduced(command), f'echo $? >> "{rc_file}"']
    env = dict(os.environ)
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        NO_COLOR="1",
        COLUMNS="100",
        GLOO_SOCKET_IFNAME="lo",
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(free_port()),
    )
    proc = subprocess.run(
        ["bash", "-c", "\n".join(lines)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    codes = [int(c) for c in rc_file.read_text().split()] if rc_file.exists() else []
    return codes, proc.stdout + proc.stderr


# -------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("block", params())
def test_doc_commands_run(block, tmp_path, data_dir, shims, monkeypatch):
    commands = block.commands()
    assert commands, f"{block.id}: a console block without a `$ ` command"
    skipped = [c for c in commands if c in SKIP]
    assert not skipped, f"{block.id}: {skipped} cannot run here; show it in a text block"
    expected = block.expected_exits()
    monkeypatch.setenv("NETDOCTOR_DATA_DIR", str(data_dir))
    folder = make_folder(tmp_path / "work", block)

    if in_process(commands):
        codes, output = [], ""
        for command in commands:
            result = invoke(*shlex.split(command)[1:], cwd=folder)
            codes.append(result.exit_code)
            output += result.stdout + result.stderr
    else:
        codes, output = run_in_shell(commands, folder, shims)
    assert codes == expected, f"{block.id}: exit codes {codes}, documented {expected}\n{output}"

    if not any(c.startswith("netdoctor probe") for c in commands):
        missing = [f for f in SHOWN_FINDING.findall(block.text) if f not in output]
        assert not missing, f"{block.id}: shown but not in the output: {missing}\n{output}"


def test_the_readme_fresh_machine_commands_run(data_dir, tmp_path, monkeypatch):
    """The README's first block, as written, minus what SKIP lists: every `&&`-joined part must
    exit 0, or the chain would stop there."""
    (first,) = [b for b in blocks_of(REPO / "README.md")[:1] if b.lang == "bash"]
    parts = [
        part.strip()
        for line in first.text.splitlines()
        if line.strip() and not line.startswith("#")
        for part in line.split(" && ")
    ]
    ran = [p for p in parts if p not in SKIP]
    assert [p for p in parts if p in SKIP] == [
        "pip install torch==2.13.0",
        "pip install -e .",
        "pip install torch==2.13.0",
        'pip install -e ".[test]"',
        "python -m pytest",
    ]
    assert [p.split()[:2] for p in ran] == [["netdoctor", "check"], ["netdoctor", "probe"]]
    monkeypatch.setenv("NETDOCTOR_DATA_DIR", str(data_dir))
    for part in ran:
        result = invoke(*shlex.split(part)[1:])
        assert result.exit_code == 0, f"{part}: exit {result.exit_code}\n{result.stderr}"


def test_the_readme_is_newcomer_sized():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README does not link docs/{page.name}"
    assert "(rules/)" in text and "(CONTRIBUTING.md)" in text


@pytest.mark.parametrize("page", [*PAGES, REPO / "CONTRIBUTING.md"], ids=lambda p: p.name)
def test_no_untested_shell_commands(page):
    for block in blocks_of(page):
        if page.name in ("README.md", "CONTRIBUTING.md") and block.lang == "bash":
            continue  # the README's fresh-machine block: the test above
        assert block.lang in ALLOWED_LANGS, f"{block.id}: ```{block.lang} (use console)"
        if block.lang != "console":
            prompts = [line for line in block.text.splitlines() if line.startswith("$ ")]
            assert not prompts, f"{block.id}: commands outside a console block: {prompts}"
        if "file" in block.marker:
            assert block.lang in ("python", "toml", "yaml"), f"{block.id}: file= on {block.lang}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", [*PAGES, REPO / "CONTRIBUTING.md"], ids=lambda p: p.name)
def test_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    text_outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text_outside_code):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: broken link {target}"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: no anchor {target}"


@pytest.mark.parametrize(
    "block",
    [
        b
        for page in [*PAGES, REPO / "CONTRIBUTING.md"]
        for b in blocks_of(page)
        if b.lang in ("python", "toml")
    ],
    ids=lambda b: b.id,
)
def test_python_compiles_and_toml_loads(block, tmp_path, monkeypatch):
    if block.lang == "python":
        code = compile(block.text, block.id, "exec")
        if "\nRULE = Rule(" in block.text:  # CONTRIBUTING's example rule module: it loads
            from netdoctor.rules.base import Rule
            from netdoctor.rules.registry import rule

            module = types.ModuleType("example_rule")  # dataclasses look their module up
            monkeypatch.setitem(sys.modules, module.__name__, module)
            exec(code, module.__dict__)
            example = module.RULE
            assert isinstance(example, Rule)
            real = rule(example.id)
            assert (example.name, example.severity, example.stage) == (
                real.name,
                real.severity,
                real.stage,
            )
            assert set(example.options.keys()) == set(real.options.keys())
        return
    from netdoctor.cli.probe import PROBE_KEYS
    from netdoctor.cli.run import RUN_KEYS
    from netdoctor.config import load_config

    path = tmp_path / "pyproject.toml"
    path.write_text(block.text, encoding="utf-8")
    config = load_config(str(path))  # unknown keys, rules and options raise
    assert config.path is not None, f"{block.id}: no [tool.netdoctor] table"
    assert set(config.probe) <= PROBE_KEYS, f"{block.id}: {set(config.probe) - PROBE_KEYS}"
    assert set(config.run) <= RUN_KEYS, f"{block.id}: {set(config.run) - RUN_KEYS}"
