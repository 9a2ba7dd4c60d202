"""What a check runs: one eager forward (the signal measurement, which also shows that the input
runs) and a replay of the traced graph on what its layers returned there (every node's shape
without running the layers again), and nothing it does not need (the speed of a pre-commit hook;
the ratio itself is measured in benchmarks/check_speed.py)."""

from __future__ import annotations

import textwrap

import torch

from conftest import HEALTHY, check_json, findings_of, invoke, run_python
from netdoctor.check import CheckOptions, check_loaded
from netdoctor.graph.build import build_graph
from netdoctor.loading.shapes import InputSpec
from netdoctor.loading.target import load

EVAL_ONLY_BUG = textwrap.dedent("""\
    from torch import nn


    class EvalBug(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.fc(x)
            if self.training:  # traced in train mode: the traced graph never reaches head
                return x.sum(1, keepdim=True)
            return self.head(x)  # 4 features into an 8-input layer
    """)

SQUEEZES = textwrap.dedent("""\
    import torch
    from torch import nn


    class Squeezes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = self.bn(self.conv(x)).relu().mean((2, 3)).squeeze()
            return torch.softmax(self.head(x), dim=1)  # dim 1 exists only for a batch > 1
    """)


def test_a_forward_that_breaks_only_in_eval_mode_is_still_reported(tmp_path):
    (tmp_path / "m.py").write_text(EVAL_ONLY_BUG)
    report, result = check_json("m.py:EvalBug", "--input-shape", "4", cwd=tmp_path)
    (failure,) = findings_of(report, "ND002")
    assert failure["module"] == "head"
    assert result.exit_code == 1


def test_a_model_that_squeezes_a_batch_of_one_gets_shapes_and_no_false_failure(tmp_path):
    (tmp_path / "m.py").write_text(SQUEEZES)
    report, _ = check_json("m.py:Squeezes", "--input-shape", "1,8,8", cwd=tmp_path)
    assert findings_of(report, "ND002") == []
    (softmax,) = findings_of(report, "ND105")
    assert "3 classes" in softmax["message"] or softmax["evidence"].get("classes") == 3, softmax
    assert not any("shape propagation failed" in n for n in report["notes"])


def forward_calls(fn) -> dict[torch.nn.Module, int]:
    """How often each module ran while `fn()` ran."""
    calls: dict[torch.nn.Module, int] = {}

    def count(module, args, output):
        calls[module] = calls.get(module, 0) + 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        fn()
    finally:
        handle.remove()
    return calls


def test_a_check_runs_each_layer_of_a_traced_model_once():
    """The shapes come from replaying the traced graph on the eager forward's outputs: no
    layer's work is done a second time (ResNet-50 at 224x224 spends most of a check there)."""
    loaded = load(f"{HEALTHY / 'resnet.py'}:ResNet").models[0]
    reports = []
    calls = forward_calls(
        lambda: reports.append(check_loaded(loaded, CheckOptions(input_shape=(3, 32, 32))))
    )
    assert reports[0].findings == [] and reports[0].notes == []
    convs = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(calls.get(m) == 1 for m in convs), [calls.get(m) for m in convs]


def test_the_check_command_leaves_the_garbage_collector_as_it_found_it():
    """The command freezes torch's import-time objects out of the collector's full passes while
    it runs, and unfreezes them after: a caller that lives on collects as before."""
    import gc

    before = gc.get_freeze_count()
    result = invoke("check", f"{HEALTHY / 'lenet_relu.py'}:LeNet", "--input-shape", "1,28,28")
    assert result.exit_code == 0, result.output
    assert gc.get_freeze_count() == before


REPLAY_EDGES = textwrap.dedent("""\
    from torch import nn


    class ReplayEdges(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.aux = nn.Conv2d(4, 2, 1)
            self.lstm = nn.LSTM(8, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = self.conv(x)
            if self.training:  # traced in train mode, never called by the eager (eval) forward
                h = h + self.aux(h).mean(1, keepdim=True)
            seq, (last, _) = self.lstm(h.mean(1))  # 8 rows of 8 features
            return self.head(last[-1] + seq[:, -1])
    """)

REJECTS_ZEROS = textwrap.dedent("""\
    import torch
    from torch import nn


    class RejectsZeros(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv(x)
            torch._assert(h.abs().sum() > 0, "a dead feature map")
            return self.head(h.mean((2, 3)))
    """)


def _shapes(source: str, cls: str, shape: tuple[int, ...], tmp_path):
    path = tmp_path / "m.py"
    path.write_text(source)
    loaded = load(f"{path}:{cls}").models[0]
    outcomes = []
    calls = forward_calls(lambda: outcomes.append(build_graph(loaded, InputSpec(shape))))
    outcome = outcomes[0]
    assert outcome.forward_failure is None and outcome.notes == []
    assert outcome.graph.frontend == "fx"
    missing = [n.name for n in outcome.graph if n.shape is None and n.op not in ("output", "param")]
    return (
        outcome.graph,
        {name: calls.get(m, 0) for name, m in loaded.model.named_children()},
        missing,
    )


def test_the_replay_runs_a_layer_only_the_traced_graph_calls_and_stands_in_tuples(tmp_path):
    """A layer that only the traced (train-mode) graph calls runs in the replay; an LSTM's
    (output, (h, c)) is stood in like a tensor; every node gets its shape."""
    graph, calls, missing = _shapes(REPLAY_EDGES, "ReplayEdges", (1, 8, 8), tmp_path)
    assert missing == ["lstm", "getitem_1"]  # tuples: (output, (h, c)) and (h, c)
    assert calls == {"conv": 1, "aux": 1, "lstm": 1, "head": 1}
    (aux,) = [n for n in graph if n.module == "aux"]
    assert aux.shape[1:] == (2, 8, 8)
    (head,) = [n for n in graph if n.module == "head"]
    assert head.shape[1:] == (3,)


def test_a_functional_op_that_rejects_the_zeros_falls_back_to_running_the_graph(tmp_path):
    graph, calls, missing = _shapes(REJECTS_ZEROS, "RejectsZeros", (1, 8, 8), tmp_path)
    assert [n for n in missing if not n.startswith("_assert")] == []
    assert calls == {"conv": 2, "head": 2}  # the eager forward, then the traced graph
    (head,) = [n for n in graph if n.module == "head"]
    assert head.shape[1:] == (3,)


_IMPORTS = """
import sys
from netdoctor.cli import main
sys.argv = ["netdoctor", "check", "fixtures/healthy/lenet_relu.py:LeNet", "--input-shape",
            "1,28,28"]
try:
    main()
except SystemExit as e:
    assert e.code == 0, e.code
import types  # a lazily imported module that was never used is not a plain module yet
heavy = [m for m in ("sympy", "libcst", "multiprocessing.synchronize", "onnx")
         if type(sys.modules.get(m)) is types.ModuleType]
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
"""


def test_a_clean_check_imports_nothing_it_does_not_use():
    """sympy (fx's ShapeProp), libcst (fixes), multiprocessing locks (fx's progress bar) and onnx
    cost more to import than the rest of a check; a clean model needs none of them."""
    result = run_python(_IMPORTS)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stderr, result.stderr


def test_the_check_leaves_attributes_a_forward_assigns_as_they_were():
    """A forward that counts its calls (or caches a tensor) is traced and run by the check: the
    counter is the user's afterwards, not a torch.fx Proxy or netdoctor's call count."""
    import torch
    from torch import nn

    from netdoctor.check import CheckOptions, check_loaded
    from netdoctor.loading.provenance import Provenance
    from netdoctor.loading.target import LoadedModel

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += x.shape[0] == 2
            self.last = x.detach()
            return self.fc(x)

    model = Counting()
    check_loaded(LoadedModel("Counting", model, Provenance()), CheckOptions(input_shape=(4,)))
    assert model.calls == 0 and not hasattr(model, "last")
    model(torch.randn(2, 4))
    assert model.calls == 1
