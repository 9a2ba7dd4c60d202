"""The static rules (meta ND0xx, graph ND1xx, params ND2xx) beyond what the snapshots pin: each
finding at the user's line (the line holding the construct, found in the source), its evidence,
its fix applied to a copy of the fixture (the patched model must build, run, and no longer
trigger the rule), the options, and the designs each rule must leave alone. Mostly the Python
API (netdoctor.check) for speed; `check_json` where the JSON or the exit code is the point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import HEALTHY, REPO, SICK, chdir, check_json, findings_of, line_of
from netdoctor.check import CheckOptions, check, check_loaded
from netdoctor.findings import Severity
from netdoctor.rules.engine import RuleSettings

MNIST = (1, 28, 28)
NEW_RULES = {"ND105", "ND106", "ND107", "ND108", "ND109", "ND110", "ND111", "ND201", "ND204"}


def run(target: str, shape=MNIST, select=("ALL",)):
    """Findings of one model: `target` is 'file.py:Class' (relative to the repo or absolute)."""
    options = CheckOptions(input_shape=shape, rules=RuleSettings.from_tables(select=select))
    with chdir(REPO):
        reports, _ = check(target, options)
    assert len(reports) == 1, [r.target for r in reports]
    return reports[0].findings


def of(findings, rule: str):
    return [f for f in findings if f.rule == rule]


def assert_fix_applies(
    finding, tmp_path: Path, cls: str, rule: str, shape=MNIST, gone: str | None = None
) -> Path:
    """Write the fix's patched file next to a copy of the fixture, re-check it: the finding is
    gone (all of `rule`, or the one naming module `gone`), the model builds and runs forward."""
    fix = finding.fix
    assert fix is not None and fix.kind == "diff", (rule, fix)
    assert fix.new_source and fix.patch.startswith("--- a/")
    original = Path(fix.path)
    copy = tmp_path / original.name
    shutil.copy(original, copy)
    copy.write_text(fix.new_source, encoding="utf-8")
    after = of(run(f"{copy}:{cls}", shape), rule)
    if gone is None:
        assert after == [], [f.message for f in after]
    else:
        assert all(f.module != gone for f in after), [f.module for f in after]
    from netdoctor.loading.target import load

    model = load(f"{copy}:{cls}").models[0].model
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    return copy


def code_line(path: Path, needle: str) -> int:
    """1-based line of the first occurrence of `needle` (may span lines) after the module
    docstring."""
    import ast

    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    doc_end = tree.body[0].end_lineno if tree.body and isinstance(tree.body[0], ast.Expr) else 0
    offset = sum(len(line) for line in text.splitlines(keepends=True)[:doc_end])
    return text[: text.index(needle, offset)].count("\n") + 1


def where(finding, path: Path, needle: str) -> None:
    assert finding.location is not None
    assert finding.location.path.endswith(f"fixtures/sick/{path.name}")
    assert finding.location.line == code_line(path, needle)


# ----------------------------------------------------------------------- healthy corpus


def test_healthy_corpus_got_signal_measurements():
    """ND204 had something to judge: the builds measured the init signal (regression guard for a
    silently skipped measurement)."""
    from netdoctor.graph.build import build_graph
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.loading.target import load

    loaded = load(str(HEALTHY / "resnet.py") + ":ResNet").models[0]
    graph = build_graph(loaded, InputSpec((3, 32, 32), "float32", None)).graph
    measured = [n for n in graph if "init_signal_rms" in n.attrs]
    assert len(measured) >= 20
    assert all(0.01 < n.attrs["init_signal_rms"] < 100 for n in measured)


# ----------------------------------------------------------------------- through the CLI (JSON)

ALEXNET = SICK / "alexnet.py"
CLI_MNIST = ("--input-shape", "1,28,28")


def rules_of(report: dict) -> list[str]:
    return [f["rule"] for f in findings_of(report)]


def test_alexnet_reports_deep_plain_stack_at_the_users_line():
    alexnet, result = check_json("fixtures/sick/alexnet.py:AlexNet", "--input-shape", "1,224,224")
    assert result.exit_code == 0
    (finding,) = findings_of(alexnet, "ND101")
    # 8 ReLU layers at PyTorch's default init drift ~265x from He's scale: fragile, trainable
    assert finding["severity"] == "info"
    assert 200 < 1 / finding["evidence"]["he_drift"] < 400
    assert finding["name"] == "deep-plain-stack"
    assert finding["location"]["path"].endswith("fixtures/sick/alexnet.py")
    assert finding["location"]["line"] == line_of(ALEXNET, "nn.Conv2d(")
    assert finding["module"] == "net.0"
    assert finding["evidence"]["depth"] == 8
    assert "8 weight layers" in finding["message"]
    fix = finding["fix"]
    assert fix["kind"] == "diff"
    assert "\n+            nn.BatchNorm2d(96)" in fix["patch"]
    assert fix["patch"].count("+            nn.BatchNorm2d(") == 5
    assert fix["patch"].count("+            nn.BatchNorm1d(4096)") == 2
    assert set(rules_of(alexnet)) == {"ND101"}
    assert alexnet["summary"]["fix_first"] is None  # an info finding is no priority


def test_a_plain_relu_stack_far_from_he_init_is_a_warning():
    """The 11-layer MLP at PyTorch's default init drifts ~10,000x from He's scale, past the
    5,000x within which plain ReLU stacks still train: a warning (a short probe of it does not
    learn until BatchNorm is added)."""
    report, _ = check_json("fixtures/sick/untraceable_plain.py:GatedDeepNet", *CLI_MNIST)
    (finding,) = findings_of(report, "ND101")
    assert finding["severity"] == "warning"
    assert 1 / finding["evidence"]["he_drift"] > 5000


def test_broken_residual_reports_the_dead_convolutions():
    report, _ = check_json("fixtures/sick/broken_residual.py:Net", *CLI_MNIST)
    dead = findings_of(report, "ND103")
    assert sorted(f["module"] for f in dead) == [
        "resi1.conv1",
        "resi1.conv2",
        "resi2.conv1",
        "resi2.conv2",
    ]
    assert rules_of(report) == ["ND103"] * 4  # nothing for conv1/conv2/fullconnect
    source = SICK / "broken_residual.py"
    lines = {f["module"].split(".")[1]: f["location"]["line"] for f in dead}
    assert lines == {
        "conv1": line_of(source, "self.conv1 = nn.Conv2d(channels"),
        "conv2": line_of(source, "self.conv2 = nn.Conv2d(channels"),
    }
    assert all(f["severity"] == "warning" for f in dead)


def test_sigmoid_lenet_is_a_saturating_chain_not_a_deep_stack():
    report, _ = check_json("fixtures/sick/lenet_sigmoid.py:LeNet", *CLI_MNIST)
    assert rules_of(report) == ["ND102"]
    (finding,) = findings_of(report)
    assert finding["evidence"]["length"] == 4
    assert finding["location"]["line"] == line_of(SICK / "lenet_sigmoid.py", "nn.Sigmoid()")


@pytest.mark.parametrize(
    "cls, attr, wrapper",
    [("ListMLP", "layers", "ModuleList"), ("DictHeads", "heads", "ModuleDict")],
)
def test_list_held_layers(cls, attr, wrapper):
    report, result = check_json(f"fixtures/sick/list_layers.py:{cls}", *CLI_MNIST)
    (finding,) = findings_of(report, "ND104")
    assert finding["severity"] == "error"
    assert attr in finding["module"]
    source = SICK / "list_layers.py"
    # At the assignment of the plain container (its first line or the first module it holds).
    start = line_of(source, f"self.{attr} = ")
    assert start <= finding["location"]["line"] <= start + 2
    assert finding["fix"]["kind"] == "diff"
    assert f"+        self.{attr} = nn.{wrapper}(" in finding["fix"]["patch"]
    assert result.exit_code == 1  # an error finding fails the check by default


HELD = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"A 784-128-10 MLP whose forward also runs the modules held in a plain dict.\"\"\"

    def __init__(self, kind="activations"):
        super().__init__()
        self.stem = nn.Linear(784, 128)
        self.head = nn.Linear(128, 10)
        if kind == "activations":
            self.extra = {"gelu": nn.GELU(), "tanh": nn.Tanh()}
        elif kind == "dropout":
            self.extra = {"gelu": nn.GELU(), "drop": nn.Dropout(0.1)}
        elif kind == "running_stats":
            self.extra = {"norm": nn.BatchNorm1d(128, affine=False)}
        elif kind == "mode_flag":
            self.extra = {"noise": Noise()}

    def forward(self, x):
        x = self.stem(torch.flatten(x, 1))
        for m in self.extra.values():
            x = m(x)
        return self.head(x)


class Noise(nn.Module):
    \"\"\"No state, but training-only noise: its behaviour depends on self.training.\"\"\"

    def forward(self, x):
        return x + torch.randn_like(x) * 0.01 if self.training else x
"""


@pytest.mark.parametrize(
    "kind, lost",
    [
        ("activations", None),
        ("dropout", "never reaches Dropout, whose behaviour depends on the mode"),
        ("running_stats", "3 buffer(s) are missing from .to(device) and state_dict"),
        ("mode_flag", "never reaches Noise"),
    ],
)
def test_nd104_severity_follows_what_the_plain_container_loses(tmp_path, kind, lost):
    """Stateless, mode-free modules in a plain dict lose nothing (no finding); buffers or a
    train/eval dependence are lost, an error that names them."""
    path = tmp_path / "held.py"
    path.write_text(HELD, encoding="utf-8")
    from netdoctor.loading.target import load

    with chdir(REPO):
        loaded = load(f"{path}:Net", {"kind": kind}).models[0]
        found = of(check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings, "ND104")
    if lost is None:
        assert found == []
        return
    (f,) = found
    assert f.severity == Severity.ERROR
    assert lost in f.message and "without parameters" in f.message
    assert f.fix is not None and "nn.ModuleDict(" in (f.fix.patch or "")


def test_nd104_train_eval_dependence_is_read_off_the_class():
    from torch import nn

    from netdoctor.graph.torch_common import depends_on_mode

    mode_free = (nn.ReLU, nn.GELU, nn.Softmax, nn.Identity, nn.LayerNorm, nn.Linear)
    assert not any(depends_on_mode(c) for c in mode_free)
    modal = (nn.Dropout, nn.BatchNorm2d, nn.RReLU, nn.MultiheadAttention, nn.LSTM)
    assert all(depends_on_mode(c) for c in modal)

    class OwnTrain(nn.Module):
        def train(self, mode=True):
            return super().train(mode)

    assert depends_on_mode(OwnTrain)


@pytest.mark.parametrize(
    "extra, flagged",
    [
        (("-a", "momentum=0.99"), [0.99]),
        (("--kwargs", '{"momentum": 0}'), [0]),
        (("-a", "momentum=0"), [0]),
        (("-a", "momentum=None"), []),
    ],
)
def test_batchnorm_momentum(extra, flagged):
    report, _ = check_json("fixtures/sick/bn_momentum.py:KerasMomentumNet", *CLI_MNIST, *extra)
    found = findings_of(report, "ND203")
    assert rules_of(report) == ["ND203"] * len(found)
    if not flagged:
        assert found == []
        return
    assert sorted(f["module"] for f in found) == ["bn1", "bn2"]
    assert {f["evidence"]["momentum"] for f in found} == set(flagged)
    assert all("momentum=0.1" in f["fix"]["patch"] for f in found)


def test_untraceable_model_falls_back_and_still_finds_the_deep_stack():
    report, result = check_json("fixtures/sick/untraceable_plain.py:GatedDeepNet", *CLI_MNIST)
    (fallback,) = findings_of(report, "ND001")
    assert fallback["severity"] == "info"
    assert "control flow" in fallback["message"]
    (deep,) = findings_of(report, "ND101")
    assert deep["evidence"]["depth"] >= 10
    assert deep["location"]["line"] == line_of(SICK / "untraceable_plain.py", "nn.Linear(784")
    assert result.exit_code == 0


def test_forward_error_names_the_failing_layer():
    report, result = check_json("fixtures/sick/forward_error.py:ShapeBug", *CLI_MNIST)
    (finding,) = findings_of(report, "ND002")
    assert finding["severity"] == "error"
    assert finding["module"] == "fc"
    assert finding["location"]["path"].endswith("fixtures/sick/forward_error.py")
    assert finding["location"]["line"] == line_of(SICK / "forward_error.py", "nn.Linear(")
    assert "5408" in finding["message"] and "100" in finding["message"]
    assert "+        self.fc = nn.Linear(5408, num_classes)" in finding["fix"]["patch"]
    assert result.exit_code == 1


# ----------------------------------------------------------------------- ND105 softmax-output


def test_nd105_sequential_softmax(tmp_path):
    path = SICK / "softmax_output.py"
    (f,) = of(run(f"{path}:SoftmaxNet"), "ND105")
    assert f.severity == Severity.WARNING and f.module == "net.4"
    where(f, path, "nn.Softmax(dim=1)")
    assert "CrossEntropyLoss" in f.message and "1.46" in f.message
    assert f.fix.safe is False and "-            nn.Softmax(dim=1)," in f.fix.patch
    assert_fix_applies(f, tmp_path, "SoftmaxNet", "ND105")


def test_nd105_functional_softmax_and_log_softmax(tmp_path):
    path = SICK / "softmax_output.py"
    (f,) = of(run(f"{path}:FunctionalSoftmaxNet"), "ND105")
    where(f, path, "return F.softmax(")
    assert "+        return self.fc2(x)" in f.fix.patch
    assert_fix_applies(f, tmp_path, "FunctionalSoftmaxNet", "ND105")
    (g,) = of(run(f"{path}:LogSoftmaxNet"), "ND105")
    assert g.severity == Severity.INFO and "NLLLoss" in g.message
    where(g, path, "return F.log_softmax(")


# ----------------------------------------------------------------------- ND106 activation-on-logits


@pytest.mark.parametrize(
    "cls, needle, module",
    [
        ("ReluLogitsNet", "            nn.ReLU(),\n        )", "net.4"),
        ("FunctionalReluLogits", "return F.relu(self.fc2(x))", "fc2"),
    ],
)
def test_nd106_relu_on_logits(tmp_path, cls, needle, module):
    path = SICK / "relu_logits.py"
    (f,) = of(run(f"{path}:{cls}"), "ND106")
    assert f.severity == Severity.WARNING and f.module == module
    assert f.location.path.endswith("fixtures/sick/relu_logits.py")
    assert f.location.line == code_line(path, needle)
    assert f.fix.safe is False
    assert_fix_applies(f, tmp_path, cls, "ND106")


# ----------------------------------------------------------------------- ND107 linear-collapse


def test_nd107_sequential_collapse(tmp_path):
    path = SICK / "linear_collapse.py"
    (f,) = of(run(f"{path}:CollapsedMLP"), "ND107")
    assert f.module == "net.1" and f.evidence["second"] == "net.3"
    assert f.evidence["between"] == ["dropout"]
    where(f, path, "nn.Linear(784, 256)")
    assert "+            nn.ReLU()," in f.fix.patch
    assert_fix_applies(f, tmp_path, "CollapsedMLP", "ND107")


def test_nd107_forward_collapse(tmp_path):
    path = SICK / "linear_collapse.py"
    (f,) = of(run(f"{path}:CollapsedCNN"), "ND107")
    assert f.module == "conv1" and f.evidence["second"] == "conv2"
    where(f, path, "self.conv1 = nn.Conv2d(")
    assert "+        x = self.conv2(torch.relu(self.conv1(x)))" in f.fix.patch
    assert_fix_applies(f, tmp_path, "CollapsedCNN", "ND107")


# ----------------------------------------------------------------------- ND108 detached-forward


def test_nd108_detach(tmp_path):
    path = SICK / "detached.py"
    (f,) = of(run(f"{path}:DetachedFeatures"), "ND108")
    assert f.severity == Severity.ERROR
    assert f.evidence["starved_modules"] == ["conv1", "conv2"]
    assert "conv1" in f.message and "conv2" in f.message
    where(f, path, ".detach()")
    assert f.fix.safe is True
    assert_fix_applies(f, tmp_path, "DetachedFeatures", "ND108")


@pytest.mark.parametrize(
    "cls, needle",
    [
        ("DataFeatures", "self.backbone(x).data"),
        ("NoGradBackbone", "features = self.backbone(x)\n        return"),
    ],
)
def test_nd108_data_and_no_grad(tmp_path, cls, needle):
    path = SICK / "detached_variants.py"
    (f,) = of(run(f"{path}:{cls}"), "ND108")
    assert f.evidence["starved_modules"] == ["backbone.1", "backbone.3"]
    assert f.module == "backbone"
    assert f.location.line == code_line(path, needle)
    assert_fix_applies(f, tmp_path, cls, "ND108")


def test_nd108_through_the_hook_fallback(tmp_path):
    path = SICK / "detached_variants.py"
    found = run(f"{path}:GatedDetach")
    assert of(found, "ND001")  # fx failed: the graph is the recorded forward
    (f,) = of(found, "ND108")
    assert f.evidence["starved_modules"] == ["backbone.1"]
    where(f, path, "features = features.detach()")
    assert_fix_applies(f, tmp_path, "GatedDetach", "ND108")


def test_hook_frontend_records_only_the_models_own_ops():
    """The recorder must not see netdoctor's own parameter summaries (detach/std/all of every
    weight) and must place functional ops on the user's line."""
    from netdoctor.graph import hook_frontend
    from netdoctor.loading.forward import example_input
    from netdoctor.loading.target import load

    loaded = load(str(SICK / "detached.py") + ":DetachedFeatures").models[0]
    graph = hook_frontend.build(loaded.model, loaded.provenance, example_input(MNIST))
    ops = [n.op for n in graph]
    assert ops.count("detach") == 1 and "std" not in ops and "all" not in ops
    (detach,) = graph.of_op("detach")
    assert detach.location.line == code_line(SICK / "detached.py", ".detach()")


NAMED_LIKE_TERMINALS = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"Submodules named like the recorded graph's own terminal nodes (`x`, `output`); a
    shape-dependent branch makes torch.fx fail, so the graph is the recorded forward.\"\"\"

    def __init__(self):
        super().__init__()
        self.x = nn.Linear(8, 8)
        self.x_1 = nn.Linear(8, 8)
        self.output = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[0] > 0:
            x = torch.relu(self.x(x))
        return self.output(torch.relu(self.x_1(x)))
"""


def test_hook_frontend_names_modules_called_like_its_terminal_nodes(tmp_path):
    """A module registered as `output` (or `x`) does not collide with the graph's output
    (input) node: it was `ValueError: duplicate node name 'output'`."""
    from netdoctor.graph import hook_frontend
    from netdoctor.loading.target import load

    path = tmp_path / "named.py"
    path.write_text(NAMED_LIKE_TERMINALS, encoding="utf-8")
    loaded = load(f"{path}:Net").models[0]
    graph = hook_frontend.build(loaded.model, loaded.provenance, torch.randn(2, 8))
    (out,) = graph.outputs
    assert [graph.node(i).module for i in out.inputs] == ["output"]
    assert {n.module for n in graph if n.op == "linear"} == {"x", "x_1", "output"}
    found = run(f"{path}:Net", shape=(8,))
    assert of(found, "ND001") and not of(found, "ND103")


# ----------------------------------------------------------------------- ND109-ND111 (info)


def test_nd109_bias_before_norm(tmp_path):
    path = SICK / "bias_before_bn.py"
    found = of(run(f"{path}:BiasBeforeBN"), "ND109")
    assert sorted(f.module for f in found) == ["conv1", "conv2", "fc1"]
    assert all(f.severity == Severity.INFO and f.fix.safe for f in found)
    by_module = {f.module: f for f in found}
    where(by_module["conv2"], path, "self.conv2 = nn.Conv2d(")
    where(by_module["fc1"], path, "self.fc1 = nn.Linear(")
    assert "bias=False" in by_module["fc1"].fix.patch
    assert_fix_applies(by_module["conv1"], tmp_path, "BiasBeforeBN", "ND109", gone="conv1")


def test_nd110_dropout_before_batchnorm():
    path = SICK / "dropout_bn.py"
    (f,) = of(run(f"{path}:DropoutBeforeBN"), "ND110")
    assert f.severity == Severity.INFO and f.module == "net.4"
    assert f.evidence["norm"] == "net.5"
    where(f, path, "nn.Dropout(0.5)")
    assert f.fix.kind == "snippet"


@pytest.mark.parametrize(
    "cls, needle, module",
    [
        ("DoubleReLU", "            nn.ReLU(),\n            nn.Linear(128", "net.3"),
        ("DoubleReLUFunctional", "x = F.relu(x)", None),
    ],
)
def test_nd111_redundant_activation(tmp_path, cls, needle, module):
    path = SICK / "double_relu.py"
    (f,) = of(run(f"{path}:{cls}"), "ND111")
    assert f.severity == Severity.INFO and f.module == module
    assert f.location.line == code_line(path, needle)
    assert_fix_applies(f, tmp_path, cls, "ND111")


# ----------------------------------------------------------------------- ND201 / ND204 (init)


@pytest.mark.parametrize(
    "target, cls, needle",
    [
        ("mlp.py", "MLP", "nn.Linear(num_inputs"),
        ("bad_init.py", "TinyInitMLP", "nn.Linear(784, 256)"),
    ],
)
def test_nd201_small_init(tmp_path, target, cls, needle):
    path = SICK / target
    found = run(f"{path}:{cls}")
    (f,) = of(found, "ND201")
    assert f.severity == Severity.WARNING and f.module == "net.1"
    where(f, path, needle)
    first = f.evidence["layers"][0]
    assert first["module"] == "net.1" and first["fan_in"] == 784
    assert first["expected"] == pytest.approx((2 / 784) ** 0.5)
    assert 4.5 < 1 / first["ratio"] < 5.5  # N(0, 0.01) is ~5x below He for 784 inputs
    assert "kaiming_normal_" in f.fix.patch
    copy = assert_fix_applies(f, tmp_path, cls, "ND201")
    assert of(run(f"{copy}:{cls}"), "ND204") == []


@pytest.mark.parametrize("cls, direction", [("DeepTanhMLP", "shrinks"), ("DeepReLUMLP", "grows")])
def test_nd204_signal_collapse(tmp_path, cls, direction):
    path = SICK / "bad_init.py"
    found = run(f"{path}:{cls}")
    (f,) = of(found, "ND204")
    assert direction in f.message
    ratio = f.evidence["end_ratio"]
    assert ratio < 1e-10 if direction == "shrinks" else ratio > 1e10
    assert f.location.path.endswith("fixtures/sick/bad_init.py")
    assert len(f.evidence["layers"]) == 19  # 20 Linear layers, the head left out
    assert of(found, "ND201")
    assert_fix_applies(f, tmp_path, cls, "ND204")


def test_signal_measurement_leaves_the_model_untouched():
    """The extra forward pass restores BatchNorm running statistics and train/eval flags."""
    from netdoctor.loading.target import load

    loaded = load(str(HEALTHY / "resnet.py") + ":ResNet").models[0]
    model = loaded.model
    model.train()
    model.layer1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    findings = check_loaded(loaded, CheckOptions(input_shape=(3, 32, 32))).findings
    assert [f for f in findings if f.rule in NEW_RULES] == []
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------- ND201 along a path

MLP_INIT = '''
import torch
from torch import nn


class Net(nn.Module):
    """784-256-256-10 ReLU MLP; `stds` draws each Linear's weight from N(0, std) (None: keep
    PyTorch's default); `norm` puts a BatchNorm1d after the first hidden layer."""

    def __init__(self, stds=(None, None, None), norm=False):
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(784, 256)]
        layers += [nn.BatchNorm1d(256)] if norm else []
        layers += [nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)]
        self.net = nn.Sequential(*layers)
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for m, std in zip(linears, stds):
            if std is not None:
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x)
'''


def _mlp(tmp_path: Path, **kwargs):
    path = tmp_path / "mlp_init.py"
    path.write_text(MLP_INIT, encoding="utf-8")
    from netdoctor.loading.target import load

    with chdir(REPO):
        loaded = load(f"{path}:Net", kwargs).models[0]
        return check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings


# He for 784 inputs is 0.0505, for 256 inputs 0.0884; LeCun for the 256-input head is 0.0625.
@pytest.mark.parametrize(
    "stds, norm, flagged, shrink",
    [
        ((0.0101, None, None), False, False, None),  # one hidden layer 5x below: harmless
        ((None, None, 0.001), False, False, None),  # a small logit layer alone: recommended
        ((None, None, 0.0), False, False, None),  # a zero logit layer
        ((0.0101, None, 0.0125), False, True, 25.0),  # 5x below, then a 5x smaller head
        ((0.0101, 0.0177, None), False, True, 25.0),  # two hidden layers 5x below each
        ((0.0101, 0.0177, None), True, False, None),  # a BatchNorm between the two cuts the path
        ((0.0101, 0.0177, 0.0125), True, False, None),  # after it a two-layer head: 25x, allowed
        ((0.0101, 0.0177, 0.0125), False, True, 125.0),  # three in series: 5 * 5 * 5
    ],
)
def test_nd201_judges_the_compound_shrink_along_a_path(tmp_path, stds, norm, flagged, shrink):
    found = of(_mlp(tmp_path, stds=stds, norm=norm), "ND201")
    assert bool(found) is flagged, [f.message for f in found]
    if flagged:
        (f,) = found
        assert f.evidence["shrink"] == pytest.approx(shrink, rel=0.1)
        assert f.evidence["max_shrink"] == 24.0
        assert f"shrink the signal {f.evidence['shrink']:.3g}x" in f.message
        assert f.module == f.evidence["layers"][0]["module"]


def test_nd201_still_judges_a_single_layer_above_its_scale(tmp_path):
    (f,) = of(_mlp(tmp_path, stds=(None, 0.5, None)), "ND201")  # N(0, 0.5): 5.7x above He
    assert f.module == "net.3" and f.evidence["layers"][0]["ratio"] > 5
    assert "amplifies" in f.message


def test_nd201_on_small_init_heads_of_widely_used_designs():
    """torchvision's N(0, 0.01) classifier and BERT's N(0, 0.02) pooler + classifier: one hidden
    layer a few times below its scale and a small logit layer, clean; the seed MLP is not."""
    bert = run(str(HEALTHY / "bert.py") + ":BertClassifier", shape=(16,), select=("ND201",))
    assert bert == []
    mobile = run(
        str(HEALTHY / "tv_init_classifier.py") + ":TVInitMobileNet",
        shape=(3, 32, 32),
        select=("ND201",),
    )
    assert mobile == []
    (seed,) = run(str(SICK / "mlp.py") + ":MLP", select=("ND201",))
    assert [layer["module"] for layer in seed.evidence["layers"]] == ["net.1", "net.3"]
    assert seed.evidence["layers"][1]["output_layer"] is True
    assert 27 < seed.evidence["shrink"] < 31  # 5.05x (He, 784 inputs) * 5.8x (LeCun, 300)


HEAD_AFTER_NORM = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"784-128, LayerNorm (gain `gain`), then `hidden` ReLU layers of width 64 and a 10-way
    output layer, all drawn from N(0, 0.02) (the head 8.8x below He, the output 6.3x below
    LeCun).\"\"\"

    def __init__(self, hidden=1, gain=1.0):
        super().__init__()
        self.body = nn.Linear(784, 64)
        self.norm = nn.LayerNorm(64)
        nn.init.constant_(self.norm.weight, gain)
        layers = []
        for _ in range(hidden):
            layers += [nn.Linear(64, 64), nn.ReLU()]
        self.head = nn.Sequential(*layers, nn.Linear(64, 10))
        for m in self.head:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, x):
        return self.head(self.norm(self.body(torch.flatten(x, 1))))
"""


@pytest.mark.parametrize(
    "hidden, gain, flagged",
    [
        (1, 1.0, False),  # pre_classifier + classifier after a LayerNorm: 57x, a head
        (2, 1.0, True),  # three small layers in series: the middle one gets two factors
        (1, 0.01, True),  # the LayerNorm's gain starts 100x small: its output is not unit scale
    ],
)
def test_nd201_small_head_right_after_a_normalization(tmp_path, hidden, gain, flagged):
    path = tmp_path / "head.py"
    path.write_text(HEAD_AFTER_NORM, encoding="utf-8")
    from netdoctor.loading.target import load

    with chdir(REPO):
        loaded = load(f"{path}:Net", {"hidden": hidden, "gain": gain}).models[0]
        found = of(check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings, "ND201")
    assert bool(found) is flagged, [f.message for f in found]
    if flagged:
        assert found[0].evidence["shrink"] > 24


def test_nd201_distilbert_style_head_is_clean_and_the_seed_mlp_is_not():
    distil = run(
        str(HEALTHY / "distil_head.py") + ":DistilHeadClassifier", shape=(16,), select=("ND201",)
    )
    assert distil == []
    (seed,) = run(str(SICK / "mlp.py") + ":MLP", select=("ND201",))  # two layers from the input
    assert seed.evidence["shrink"] > 24


# ----------------------------------------------------------------------- normalizer-free designs

WS_STACK = '''
import torch
import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    """A conv whose forward standardizes its weight the way `kind` says."""

    def __init__(self, cin, cout, kind):
        super().__init__(cin, cout, 3, padding=1)
        self.kind = kind

    def forward(self, x):
        w = self.weight
        if self.kind == "var_mean":  # NF-Nets' scaled WS
            var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (w - mean) * torch.rsqrt(var * w[0].numel() + 1e-4)
        elif self.kind == "batch_norm":  # timm's StdConv2d
            w = F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=1e-6).reshape_as(w)
        elif self.kind == "std":  # weight standardization (Qiao et al.)
            w = w - w.mean(dim=(1, 2, 3), keepdim=True)
            w = w / (w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    """Ten 3x3 convs with ReLU between, no normalization layer, no skip connection."""

    def __init__(self, kind="var_mean"):
        super().__init__()
        layers, cin = [], 1
        for _ in range(10):
            layers += [StdConv2d(cin, 16, kind), nn.ReLU()]
            cin = 16
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))
'''


@pytest.mark.parametrize(
    "kind, plain", [("plain", True), ("var_mean", False), ("batch_norm", False), ("std", False)]
)
def test_nd101_sees_weight_standardization_as_normalization(tmp_path, kind, plain):
    path = tmp_path / "ws_stack.py"
    path.write_text(WS_STACK, encoding="utf-8")
    from netdoctor.graph.build import build_graph
    from netdoctor.graph.walks import standardized_weight
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.loading.target import load

    with chdir(REPO):
        loaded = load(f"{path}:Net", {"kind": kind}).models[0]
        found = check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings
    assert bool(of(found, "ND101")) is plain, [f.message for f in found]
    graph = build_graph(loaded, InputSpec(MNIST, "float32", None)).graph
    convs = graph.of_op("conv")
    assert len(convs) == 10
    assert [standardized_weight(graph, c) for c in convs] == [not plain] * 10
    # The standardized convs are functional calls inside nn.Conv2d subclasses: their signal is
    # measured through the module that makes the call (ND204 follows them).
    assert all("init_signal_rms" in c.attrs for c in convs)


SKIP_GAIN = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=64, how="add"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.gain = nn.Parameter(torch.zeros(1))
        self.how = how

    def forward(self, x):
        f = self.fc2(torch.relu(self.fc1(x)))
        if self.how == "addcmul":
            return torch.addcmul(x, self.gain, f)
        if self.how == "lerp":
            return torch.lerp(x, f, self.gain)
        if self.how == "none":
            return torch.relu(f)
        return x + self.gain * f


class Net(nn.Module):
    """Eight two-layer blocks, no normalization; each block's residual branch (if any) is
    scaled by a gain that starts at zero (ReZero / SkipInit)."""

    def __init__(self, how="add"):
        super().__init__()
        self.inp = nn.Linear(784, 64)
        self.blocks = nn.Sequential(*[Block(64, how) for _ in range(8)])
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x.flatten(1))))
'''


@pytest.mark.parametrize("how", ["add", "addcmul", "lerp", "none"])
def test_nd101_sees_residual_skips_through_a_gain(tmp_path, how):
    path = tmp_path / "skip_gain.py"
    path.write_text(SKIP_GAIN, encoding="utf-8")
    from netdoctor.loading.target import load

    with chdir(REPO):
        loaded = load(f"{path}:Net", {"how": how}).models[0]
        found = check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings
    assert bool(of(found, "ND101")) is (how == "none")


ZERO_GAIN = '''
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """A residual block whose branch is multiplied by a gain that starts at `gain`, with a
    squeeze-excitation after the gain (so at gain 0 it sees an all-zero map)."""

    def __init__(self, c=16, gain=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.se1 = nn.Conv2d(c, c // 2, 1)
        self.se2 = nn.Conv2d(c // 2, c, 1)
        self.gain = nn.Parameter(torch.full((), gain))

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(F.relu(x)))) * self.gain
        s = torch.sigmoid(self.se2(F.relu(self.se1(out.mean((2, 3), keepdim=True)))))
        return x + out * s


class Net(nn.Module):
    def __init__(self, gain=0.0, depth=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(16, gain) for _ in range(depth)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))
'''


@pytest.mark.parametrize("gain", [0.0, 1.0])
def test_nd204_follows_the_residual_stream_around_zero_gain_branches(tmp_path, gain):
    path = tmp_path / "zero_gain.py"
    path.write_text(ZERO_GAIN, encoding="utf-8")
    from netdoctor.graph.build import build_graph
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.loading.target import load
    from netdoctor.rules.params.nd204_signal_collapse import signal_chain

    with chdir(REPO):
        loaded = load(f"{path}:Net", {"gain": gain}).models[0]
        found = check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings
    assert of(found, "ND204") == []  # at gain 0 the SE layers measure 0: not the signal's path
    graph = build_graph(loaded, InputSpec(MNIST, "float32", None)).graph
    chain = [n.label for n in signal_chain(graph)]
    inside = [n for n in chain if n.startswith("blocks.")]
    if gain == 0.0:
        assert chain == ["stem"] and inside == []
    else:
        assert len(inside) == 3 * 4  # every branch layer carries signal to the output


def test_nd204_zero_init_branches_in_widely_used_designs():
    """The zero-initialised last BatchNorm of timm's / torchvision's ResNets (here with
    squeeze-excitation after it), Fixup's zero conv, ReZero's zero gain: their branches are left
    out of the signal chain; the residual stream is what ND204 follows."""
    from netdoctor.graph.build import build_graph
    from netdoctor.graph.init_values import live_at_init
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.loading.target import load
    from netdoctor.rules.params.nd204_signal_collapse import signal_chain

    loaded = load(str(HEALTHY / "se_resnet.py") + ":SEResNet").models[0]
    graph = build_graph(loaded, InputSpec((3, 32, 32), "float32", None)).graph
    chain = [n.label for n in signal_chain(graph)]
    assert chain == ["stem.0", "layers.2.downsample.0", "layers.4.downsample.0"]
    live = live_at_init(graph)
    assert not any(n.module and ".se." in n.module and n.name in live for n in graph)
    # A zero output layer is not a branch: a collapsing body behind it is still found.
    deep = load(str(SICK / "bad_init.py") + ":DeepTanhMLP").models[0]
    torch.nn.init.zeros_(deep.model.net[-1].weight)
    torch.nn.init.zeros_(deep.model.net[-1].bias)
    with chdir(REPO):
        found = check_loaded(deep, CheckOptions(input_shape=MNIST)).findings
    assert of(found, "ND204")


def built(target: str, shape=MNIST, **kwargs):
    """A fixture model and its graph, with the init signal measured (what ND204 reads)."""
    from netdoctor.graph.build import build_graph
    from netdoctor.loading.shapes import InputSpec
    from netdoctor.loading.target import load

    with chdir(REPO):
        loaded = load(target, kwargs).models[0]
        return loaded, build_graph(loaded, InputSpec(shape, "float32", None)).graph


@pytest.mark.parametrize("frontend", ["fx", "hooks"])
def test_nd204_leaves_out_layers_that_do_not_see_the_input(monkeypatch, frontend):
    """A projection of a table of relative positions (ConViT) and the first class-attention
    query, read from a class token that has not attended to anything yet (CaiT, XCiT), compute
    the same value for every image: they are not on the signal's path. The keys, the values and
    the later queries are."""
    from netdoctor.graph import fx_frontend
    from netdoctor.rules.params.nd204_signal_collapse import signal_chain

    if frontend == "hooks":

        def untraceable(model):
            raise TypeError("left to the recorded forward pass in this test")

        monkeypatch.setattr(fx_frontend, "trace", untraceable)
    shape = (3, 32, 32)
    _, graph = built(str(HEALTHY / "positional_attention.py:PositionalAttentionNet"), shape)
    assert graph.frontend == frontend
    chain = [n.label for n in signal_chain(graph)]
    assert "blocks.0.attn.qk" in chain and "blocks.3.fc1" in chain
    assert not [c for c in chain if "pos_proj" in c]
    (pos,) = [n for n in graph.of_op("linear") if n.module == "blocks.0.attn.pos_proj"]
    assert pos.attrs["init_signal_rms"] < 1e-6 * pos.attrs["init_rms"]  # float rounding only

    _, graph = built(str(HEALTHY / "class_attention.py:ClassAttentionNet"), shape)
    assert graph.frontend == frontend
    chain = [n.label for n in signal_chain(graph)]
    assert "class_blocks.0.attn.q" not in chain
    assert {"class_blocks.0.attn.k", "class_blocks.1.attn.q"} <= set(chain)


DEAD = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"Linear+ReLU layers whose second bias is so negative that no ReLU after it ever fires:
    every layer after it sees the same (zero) input for every sample: the signal died.\"\"\"

    def __init__(self, bias=-100.0):
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(784, 128), nn.ReLU()]
        for _ in range(4):
            layers += [nn.Linear(128, 128), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(128, 10))
        nn.init.constant_(self.net[3].bias, bias)

    def forward(self, x):
        return self.net(x)
"""


def test_nd204_still_finds_a_signal_that_died(tmp_path):
    """A layer that sees the same input for every sample is left out only when a value that does
    not depend on the input was concatenated in (a class token); a signal that died on the way
    (every ReLU off) is a collapse, and is reported."""
    path = tmp_path / "dead.py"
    path.write_text(DEAD, encoding="utf-8")
    (f,) = of(run(f"{path}:Net"), "ND204")
    assert "shrinks" in f.message and f.module == "net.5"


ZERO_GAIN_WS = """
import torch
import torch.nn.functional as F
from torch import nn


class StdConv2d(nn.Conv2d):
    \"\"\"A conv whose forward standardizes each filter and scales it by a learned gain, as `kind`
    says.\"\"\"

    def __init__(self, cin, cout, kind, gain=1.0):
        super().__init__(cin, cout, 3, padding=1)
        nn.init.zeros_(self.bias)
        self.kind = kind
        self.gain = nn.Parameter(torch.full((cout,), gain))

    def forward(self, x):
        w, c = self.weight, self.out_channels
        if self.kind == "batch_norm":  # the gain as F.batch_norm's scale (timm's ScaledStdConv2d)
            w = F.batch_norm(w.reshape(1, c, -1), None, None, weight=self.gain, training=True,
                             momentum=0.0).reshape_as(w)
        elif self.kind == "torch.batch_norm":  # the builtin: (input, weight, bias, mean, var, ...)
            w = torch.batch_norm(w.reshape(1, c, -1), self.gain, None, None, None, True, 0.0,
                                 1e-5, False).reshape_as(w)
        elif self.kind == "group_norm":
            w = F.group_norm(w.reshape(1, c, -1), c, self.gain).reshape_as(w)
        else:  # "mul": standardized, then multiplied by the gain
            var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (w - mean) * torch.rsqrt(var + 1e-5) * self.gain.view(-1, 1, 1, 1)
        return F.conv2d(x, w / w[0].numel() ** 0.5, self.bias, self.stride, self.padding)


class Block(nn.Module):
    def __init__(self, c, kind, gain):
        super().__init__()
        self.conv1 = StdConv2d(c, c, kind)
        self.conv2 = StdConv2d(c, c, kind, gain)  # the last conv: its gain starts at `gain`
        self.se = nn.Conv2d(c, c, 1)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(F.relu(x))))
        return x + out * torch.sigmoid(self.se(out.mean(dim=(2, 3), keepdim=True)))


class Net(nn.Module):
    def __init__(self, kind="batch_norm", gain=0.0):
        super().__init__()
        self.stem = StdConv2d(1, 16, kind)
        self.blocks = nn.Sequential(*[Block(16, kind, gain) for _ in range(3)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))
"""


@pytest.mark.parametrize("kind", ["batch_norm", "torch.batch_norm", "group_norm", "mul"])
def test_nd204_a_standardized_conv_with_a_zero_gain_starts_its_branch_at_zero(tmp_path, kind):
    """timm's NF-ResNets and NFNets start each residual branch at zero through the gain of its
    last weight-standardized conv: the conv's weight, its output and the squeeze-excitation
    after it are zero at init, and the signal travels on the shortcuts. At gain 1 the branch
    carries signal and is walked."""
    from netdoctor.graph.init_values import zero_at_init
    from netdoctor.rules.params.nd204_signal_collapse import signal_chain

    path = tmp_path / "zero_gain_ws.py"
    path.write_text(ZERO_GAIN_WS, encoding="utf-8")
    for gain in (0.0, 1.0):
        loaded, graph = built(f"{path}:Net", kind=kind, gain=gain)
        convs = graph.of_op("conv")
        last = [c for c in convs if (c.attrs.get("scope") or "").endswith("conv2")]
        assert len(last) == 3
        chain = {n.name for n in signal_chain(graph)}
        zero = zero_at_init(graph)
        if gain == 0.0:
            assert all(c.attrs["init_signal_rms"] == 0 for c in last)
            assert all(c.name in zero and c.name not in chain for c in last)
            assert not [
                n for n in graph if n.module and n.module.endswith(".se") and n.name in chain
            ]
        else:
            assert not [c for c in last if c.name in zero or c.name not in chain]
        with chdir(REPO):
            found = check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings
        assert of(found, "ND204") == []


GAINED_TANH = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"A per-feature gain that starts at 1e-5 on the input, then ten Linear+tanh layers
    (PyTorch's init, or N(0, std) when `std` is given).\"\"\"

    def __init__(self, std=None, learned=True):
        super().__init__()
        self.gain = nn.Parameter(torch.full((784,), 1e-5), requires_grad=learned)
        layers = [nn.Flatten()]
        for i in range(10):
            layers += [nn.Linear(784 if i == 0 else 256, 256), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(256, 10))
        if std is not None:
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)

    def forward(self, x):
        return self.net(x * self.gain.view(1, 1, 28, 28))
"""


@pytest.mark.parametrize(
    "kwargs, fires",
    [
        ({}, False),  # the learned gain scales everything after it by 1e-5 on purpose
        ({"learned": False}, True),  # a frozen 1e-5 stays: the signal is 1e-5 for good
        ({"std": 0.001}, True),  # a collapse behind the gain is still a collapse
    ],
)
def test_nd204_judges_the_signal_net_of_learned_gains(tmp_path, kwargs, fires):
    path = tmp_path / "gained.py"
    path.write_text(GAINED_TANH, encoding="utf-8")
    from netdoctor.loading.target import load

    with chdir(REPO):
        loaded = load(f"{path}:Net", kwargs).models[0]
        found = of(check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings, "ND204")
    assert bool(found) is fires, [f.message for f in found]
    if found and kwargs.get("learned", True):
        assert "net of the learned gains" in found[0].message
        assert found[0].evidence["layers"][0]["gain_scale"] == pytest.approx(1e-5)


def test_nd204_layerscale_blocks_without_a_shortcut():
    """MobileNetV4-style blocks: a LayerScale of 1e-5 ends every block; where there is no
    shortcut it scales the whole signal until the next BatchNorm (the block after reads 1e-5 of
    the signal), and the ratio ND204 judges is net of it."""
    from netdoctor.rules.params.nd204_signal_collapse import gain_scales, signal_ratios

    _, graph = built(str(HEALTHY / "layerscale_cnn.py:LayerScaleCNN"), (3, 32, 32))
    _, chain, ratios = signal_ratios(graph)
    scales = dict(zip([n.label for n in chain], gain_scales(graph, chain)))
    assert scales["blocks.1.expand.0"] == pytest.approx(1e-5)  # after a block without shortcut
    assert scales["blocks.0.expand.0"] == 1.0  # the stem's output
    # A BatchNorm divides by sqrt(var + eps): 1e-5 comes out at 1e-5 / sqrt(1e-5), ~3e-3
    assert scales["blocks.1.depthwise.0"] == pytest.approx(10**-2.5, rel=1e-3)
    assert 0.5 < scales["blocks.1.project.0"] < 1.0
    assert min(ratios) > 0.05 and max(ratios) < 2.0
    raw = chain[[n.label for n in chain].index("blocks.1.expand.0")].attrs["init_signal_rms"]
    assert raw < 1e-4  # what the rule read before it knew the gains


GATED = """
import torch
from torch import nn


class Block(nn.Module):
    \"\"\"A branch that multiplies data by data (q * h(gate * context)), N(0, 0.01) init: its
    output is ~1e-6 of its input. Pre-norm residual, or neither norm nor shortcut.\"\"\"

    def __init__(self, dim, residual):
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(dim) if residual else nn.Identity()
        self.f = nn.Linear(dim, 3 * dim)
        self.h = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, ctx, gate = self.f(self.norm(x)).chunk(3, dim=-1)
        out = self.proj(q * self.h(gate * ctx))
        return x + out if self.residual else out


class Net(nn.Module):
    def __init__(self, residual=True, depth=4, dim=64):
        super().__init__()
        self.embed = nn.Linear(784, dim)
        self.blocks = nn.Sequential(*[Block(dim, residual) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x.flatten(1))))
"""


@pytest.mark.parametrize("residual", [True, False])
def test_nd204_a_small_branch_is_no_collapse_when_the_stream_carries_the_signal(tmp_path, residual):
    """Each block's branch measures ~1e-6 of the input at its last layer. Added to a residual
    stream, the next block reads the stream in full: the small value does not carry on into
    depth. Without a shortcut (or a normalization) every later layer reads it: a collapse,
    reported."""
    path = tmp_path / "gated.py"
    path.write_text(GATED, encoding="utf-8")
    from netdoctor.rules.params.nd204_signal_collapse import signal_ratios

    loaded, graph = built(f"{path}:Net", residual=residual)
    _, chain, ratios = signal_ratios(graph)
    small = dict(zip([n.label for n in chain], ratios))["blocks.0.proj"]
    assert small < 1e-5  # the branch alone crosses the threshold either way
    with chdir(REPO):
        found = of(check_loaded(loaded, CheckOptions(input_shape=MNIST)).findings, "ND204")
    assert bool(found) is not residual, [f.message for f in found]
    if found:
        assert found[0].module == "blocks.0.proj" and "shrinks" in found[0].message


@pytest.mark.parametrize("frontend", ["fx", "hooks"])
def test_nd204_gated_branches_fixture(monkeypatch, frontend):
    """Focal modulation and talking-heads attention (healthy/gated_branches.py): their branch
    layers measure below 1e-5 of the input, the layers after each branch do not."""
    from netdoctor.graph import fx_frontend
    from netdoctor.rules.params.nd204_signal_collapse import signal_ratios

    if frontend == "hooks":

        def untraceable(model):
            raise TypeError("left to the recorded forward pass in this test")

        monkeypatch.setattr(fx_frontend, "trace", untraceable)
    loaded, graph = built(str(HEALTHY / "gated_branches.py:GatedBranchNet"), (3, 32, 32))
    assert graph.frontend == frontend
    _, chain, ratios = signal_ratios(graph)
    ratio = dict(zip([n.label for n in chain], ratios))
    assert ratio["conv_blocks.0.modulation.proj"] < 1e-5
    assert ratio["blocks.0.attn.mix_weights"] < 1e-5
    assert ratio["blocks.1.fc1"] > 1e-2
    with chdir(REPO):
        found = check_loaded(loaded, CheckOptions(input_shape=(3, 32, 32))).findings
    assert of(found, "ND204") == []


ZEROS_BRANCH = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"A residual branch that returns zeros shaped like its query where its kernel is missing
    (as an attention with a device-only kernel does on the CPU).\"\"\"

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(784, 64)
        self.q = nn.Linear(64, 64)
        self.out = nn.Linear(64, 64)
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        x = self.embed(x.flatten(1))
        context = torch.zeros_like(self.q(x).float()).requires_grad_()
        x = x + self.out(context.to(x.dtype))
        return self.head(torch.relu(self.fc(x)))
"""


def test_nd204_a_branch_of_zeros_is_not_on_the_signal_path(tmp_path):
    from netdoctor.graph.init_values import zero_at_init
    from netdoctor.rules.params.nd204_signal_collapse import signal_chain

    path = tmp_path / "zeros_branch.py"
    path.write_text(ZEROS_BRANCH, encoding="utf-8")
    _, graph = built(f"{path}:Net")
    (out,) = [n for n in graph.of_op("linear") if n.module == "out"]
    assert out.attrs["init_signal_rms"] == 0 and out.name in zero_at_init(graph)
    assert [n.label for n in signal_chain(graph)] == ["embed", "fc"]


# ----------------------------------------------------------------------- verdicts over seeds

# The fixtures closest to ND201's and ND204's thresholds (benchmarks/init_margins.py; the rule
# docs list the ranges): (target, input shape, dtype, rule, expected verdict).
BORDERLINE = [
    ("healthy/bert.py:BertClassifier", (16,), "long", "ND201", False),  # 4.5x (+ a head) vs 24x
    ("sick/mlp.py:MLP", MNIST, "float32", "ND201", True),  # 29x vs 24x
    ("sick/untraceable_plain.py:GatedDeepNet", MNIST, "float32", "ND204", False),  # 1/12000
    ("sick/sigmoid_mlp.py:SigmoidMLP", MNIST, "float32", "ND204", True),  # 1e-7
]


@pytest.mark.parametrize(
    "target, shape, dtype, rule, fires", BORDERLINE, ids=[b[0].split(":")[1] for b in BORDERLINE]
)
def test_weight_dependent_verdicts_hold_for_every_seed(target, shape, dtype, rule, fires):
    from netdoctor.loading.target import load

    verdicts, weights = set(), set()
    for seed in range(5):  # what `check --seed N` builds and measures
        loaded = load(str(REPO / "fixtures" / target), seed=seed).models[0]
        weights.add(float(next(loaded.model.parameters()).detach().flatten()[:16].sum()))
        with chdir(REPO):
            options = CheckOptions(
                input_shape=shape,
                input_dtype=dtype,
                rules=RuleSettings.from_tables(select=[rule]),
                seed=seed,
            )
            findings = check_loaded(loaded, options).findings
        verdicts.add(bool(of(findings, rule)))
    assert len(weights) == 5, "the seeds did not change the model's weights"
    assert verdicts == {fires}


def test_nd201_tells_a_models_own_normalization_module_by_what_it_does():
    """A user-defined leaf module is a normalization when its output does not change as its
    input is scaled (an RMSNorm or LayerNorm written out by hand); a gain (layer scale), an
    activation or a projection is not, and a path through it is judged as before."""
    import torch
    from torch import nn

    from netdoctor.graph.hook_frontend import normalizes

    class OwnRMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    class OwnLayerNorm(OwnRMSNorm):
        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return super().forward(x)

    class Gain(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((dim,), 0.1))

        def forward(self, x):
            return x * self.gamma

    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    x = torch.randn(4, 8, 16)
    for mod, expected in [
        (OwnRMSNorm(16), True),
        (OwnLayerNorm(16), True),
        (Gain(16), False),
        (Swish(), False),
        (nn.LayerNorm(16), False),  # torch.nn's own: the graph names it layernorm already
    ]:
        assert normalizes(mod, (x,), mod(x)) is expected, type(mod).__name__
    own_norm = run(
        str(HEALTHY / "own_norm_head.py") + ":OwnNormClassifier",
        shape=(16,),
        select=("ND201",),
    )
    assert own_norm == []
