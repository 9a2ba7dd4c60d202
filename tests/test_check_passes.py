"""What a check runs: one pass of the traced graph on a single sample (the input runs, every node
gets its shape), one eager pass for the signal measurement, and nothing it does not need (the
speed of a pre-commit hook; the ratio itself is measured in benchmarks/check_speed.py)."""

from __future__ import annotations

import textwrap

from conftest import check_json, findings_of, run_python

EVAL_ONLY_BUG = textwrap.dedent('''\
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
    ''')

SQUEEZES = textwrap.dedent('''\
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
    ''')


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
