"""The command line as a process: usage errors are one line on stderr with exit code 2 and never
a traceback; --debug shows it; `--help`, `rules` and `explain` never import torch."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, invoke, run_cli, run_python, start_cli
from netdoctor.catalogue import RULES

MODELS = textwrap.dedent("""\
    import torch
    from torch import nn

    VALUE = 3


    def make_number():
        return 3


    def make_model():
        return Net()


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)


    class Needs(nn.Module):
        def __init__(self, channels, depth=2):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3)

        def forward(self, x):
            return self.conv(x)
    """)

SYNTAX_ERROR = "import torch\nfrom torch import nn\n\nclass Net(nn.Module)\n    pass\n"
RAISES = "import torch\nraise RuntimeError('no GPU here')\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "models.py").write_text(MODELS)
    (d / "broken.py").write_text(SYNTAX_ERROR)
    (d / "raises.py").write_text(RAISES)
    (d / "notes.txt").write_text("not python\n")
    return d


# name -> (arguments, words the one-line message must contain). These run as real processes.
BAD_INPUT = {
    "missing file": (["check", "nope.py:Net"], ["nope.py", "no such file"]),
    "syntax error": (["check", "broken.py:Net"], ["broken.py:4", "syntax error"]),
    "unknown class": (["check", "models.py:Nett"], ["'Nett'", "Net", "Needs"]),
    "constructor arguments": (["check", "models.py:Needs"], ["Needs", "channels", "-a channels="]),
    "not a module (int)": (
        ["check", "models.py:VALUE"],
        ["VALUE", "is an int", "not an nn.Module"],
    ),
    "function returning int": (
        ["check", "models.py:make_number"],
        ["make_number", "int", "not an nn.Module"],
    ),
    "bad input shape": (
        ["check", "models.py:Net", "--input-shape", "1,a,28"],
        ["input shape", "1,a,28"],
    ),
    "bad kwargs json": (
        ["check", "models.py:Net", "--kwargs", "{channels: 3}"],
        ["--kwargs", "JSON"],
    ),
    "bad seed": (
        ["check", "models.py:Net", "--seed", "abc"],
        ["--seed must be an integer from 0 to 4294967295", "'abc'"],
    ),
}

# More of the same, checked in process (same code path, cheaper).
BAD_INPUT_IN_PROCESS = {
    "missing folder": (["check", "nowhere/"], ["nowhere", "no such file or directory"]),
    "import raises": (["check", "raises.py:Net"], ["raises.py", "RuntimeError", "no GPU here"]),
    "not a python file": (["check", "notes.txt"], ["notes.txt", "not a Python file"]),
    "zero input shape": (["check", "models.py:Net", "--input-shape", "0,28"], ["input shape"]),
    "kwargs not an object": (
        ["check", "models.py:Net", "--kwargs", "[3]"],
        ["--kwargs", "JSON object"],
    ),
    "bad -a": (["check", "models.py:Net", "-a", "channels"], ["-a", "key=value"]),
    "wrong constructor argument": (["check", "models.py:Net", "-a", "width=3"], ["Net", "width"]),
    "kwargs for a folder": (["check", ".", "-a", "width=3"], ["-a", "file.py:ClassName"]),
    "no target": (["check"], ["no target"]),
    "unknown rule": (["explain", "ND999"], ["ND999"]),
    "unknown --config": (
        ["check", "models.py:Net", "--config", "missing.toml"],
        ["missing.toml", "not found"],
    ),
    "--add-ignore with --fix": (
        ["check", "models.py:Net", "--add-ignore", "--fix"],
        ["--add-ignore", "--fix", "one of the two"],
    ),
    "probe with a bad seed": (
        ["probe", "models.py:Net", "--data", "synthetic", "--seed", "1.5"],
        ["--seed must be an integer", "'1.5'"],
    ),
}


def _assert_one_line_error(code: int, out: str, err: str, words: list[str]) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("netdoctor: error: ")
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert out == ""


@pytest.fixture(scope="module")
def bad_runs(workdir) -> dict[str, tuple[int, str, str]]:
    """Every bad-input command as its own process, all started at once (they are independent)."""
    procs = {name: start_cli(*args, cwd=workdir) for name, (args, _) in BAD_INPUT.items()}
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[name] = (proc.returncode, out, err)
    return runs


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(bad_runs, name):
    _assert_one_line_error(*bad_runs[name], BAD_INPUT[name][1])


@pytest.mark.parametrize("name", list(BAD_INPUT_IN_PROCESS))
def test_more_bad_input(workdir, name):
    args, words = BAD_INPUT_IN_PROCESS[name]
    result = invoke(*args, cwd=workdir)
    _assert_one_line_error(result.exit_code, result.stdout, result.stderr, words)


def test_debug_shows_the_traceback(workdir):
    result = run_cli("--debug", "check", "models.py:VALUE", cwd=workdir)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "UserError" in result.stderr


def test_exit_codes_seen_by_the_shell():
    clean = start_cli("check", "fixtures/healthy/lenet_relu.py:LeNet", "--input-shape", "1,28,28")
    error = start_cli(
        "check", "fixtures/sick/forward_error.py:ShapeBug", "--input-shape", "1,28,28"
    )
    clean_out, clean_err = clean.communicate(timeout=180)
    error_out, _ = error.communicate(timeout=180)
    assert clean.returncode == 0, clean_err
    assert "no problems found" in clean_out
    assert error.returncode == 1
    assert "ND002" in error_out


def test_callable_returning_a_module_is_a_target(workdir):
    result = invoke(
        "check", "models.py:make_model", "--input-shape", "4", "--format", "json", cwd=workdir
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["target"] == "models.py:make_model"


def test_constructor_arguments_are_passed(workdir):
    result = invoke(
        "check",
        "models.py:Needs",
        "-a",
        "channels=3",
        "--input-shape",
        "3,8,8",
        "--format",
        "json",
        cwd=workdir,
    )
    assert result.exit_code == 0, result.stderr
    result = invoke(
        "check",
        "models.py:Needs",
        "--kwargs",
        '{"channels": 3, "depth": 1}',
        "--input-shape",
        "3,8,8",
        cwd=workdir,
    )
    assert result.exit_code == 0, result.stderr


# ------------------------------------------------------------------------ torch-free commands

_PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\nTORCH-IMPORTED=%s\\n" % ("torch" in sys.modules)))
from netdoctor.cli import main
sys.argv = ["netdoctor", *{args!r}]
main()
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["rules"],
        ["rules", "--format", "json"],
        ["explain", "ND101"],
        ["--version"],
        ["run", "--help"],
    ],
)
def test_fast_commands_do_not_import_torch(args):
    result = run_python(_PROBE.format(args=args))
    assert result.returncode == 0, result.stderr
    assert "TORCH-IMPORTED=False" in result.stderr, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("shape", ["1,a,28", "0,28,28", ","])
def test_a_bad_input_shape_fails_before_torch_is_imported(shape):
    result = run_python(
        _PROBE.format(args=["check", "fixtures/sick/mlp.py:MLP", "--input-shape", shape])
    )
    assert result.returncode == 2
    assert "netdoctor: error: input shape must be" in result.stderr
    assert "TORCH-IMPORTED=False" in result.stderr and "Traceback" not in result.stderr


def test_rules_lists_the_catalogue():
    result = invoke("rules")
    assert result.exit_code == 0
    for rid, info in RULES.items():
        assert rid in result.stdout and info.name in result.stdout
    data = json.loads(invoke("rules", "--format", "json").stdout)
    assert [r["id"] for r in data] == list(RULES)
    assert {r["severity"] for r in data} == {"error", "warning", "info"}


def test_help_mentions_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("check", "probe", "run", "rules", "explain"):
        assert command in result.stdout


def test_module_entry_point_matches_console_script():
    result = run_cli("--version")
    assert result.returncode == 0 and "netdoctor" in result.stdout
    assert (REPO / "src" / "netdoctor" / "__main__.py").is_file()


PID_MODEL = """\
import os
from pathlib import Path

from torch import nn


class Net{n}(nn.Module):
    def __init__(self):
        super().__init__()
        with open(Path(__file__).parent / "pids.txt", "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)
"""


def test_a_folder_of_models_is_checked_in_one_process(tmp_path):
    """One torch import for the whole folder: every model is built in the same process."""
    for n in range(4):
        (tmp_path / f"model{n}.py").write_text(PID_MODEL.format(n=n))
    result = run_cli("check", ".", "--input-shape", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 targets: no problems found" in result.stdout
    pids = (tmp_path / "pids.txt").read_text().split()
    assert len(pids) == 4 and len(set(pids)) == 1
