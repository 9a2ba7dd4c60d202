"""The static rules ND105-ND111, ND201 and ND204 on their fixtures, on the healthy corpus, and
their fixes applied to a copy of the fixture (the patched model must build, run, and no longer
trigger the rule). Uses the Python API (netdoctor.check) for speed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import HEALTHY, SICK, chdir

from netdoctor.check import CheckOptions, check, check_loaded
from netdoctor.findings import Severity

REPO = Path(__file__).resolve().parents[1]
MNIST = (1, 28, 28)
NEW_RULES = {"ND105", "ND106", "ND107", "ND108", "ND109", "ND110", "ND111", "ND201", "ND204"}


def run(target: str, shape=MNIST, select=("ALL",)):
    """Findings of one model: `target` is 'file.py:Class' (relative to the repo or absolute)."""
    with chdir(REPO):
        reports, _ = check(target, CheckOptions(input_shape=shape, select=list(select)))
    assert len(reports) == 1, [r.target for r in reports]
    return reports[0].findings


def of(findings, rule: str):
    return [f for f in findings if f.rule == rule]


def assert_fix_applies(finding, tmp_path: Path, cls: str, rule: str, shape=MNIST,
                       gone: str | None = None) -> Path:
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


@pytest.fixture(scope="module")
def healthy_reports():
    with chdir(REPO):
        reports, _ = check("fixtures/healthy", CheckOptions())
    return reports


def test_healthy_corpus_is_clean(healthy_reports):
    assert len(healthy_reports) == len(list(HEALTHY.glob("*.py")))
    loud = [(r.target, f.rule, f.message) for r in healthy_reports for f in r.findings
            if f.severity >= Severity.WARNING]
    assert loud == []
    mine = [(r.target, f.rule, f.message) for r in healthy_reports for f in r.findings
            if f.rule in NEW_RULES]
    assert mine == []


def test_healthy_corpus_got_signal_measurements(healthy_reports):
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


@pytest.mark.parametrize("cls, needle, module", [
    ("ReluLogitsNet", "            nn.ReLU(),\n        )", "net.4"),
    ("FunctionalReluLogits", "return F.relu(self.fc2(x))", "fc2"),
])
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


@pytest.mark.parametrize("cls, needle", [("DataFeatures", "self.backbone(x).data"),
                                         ("NoGradBackbone",
                                          "features = self.backbone(x)\n        return")])
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


@pytest.mark.parametrize("cls, needle, module", [
    ("DoubleReLU", "            nn.ReLU(),\n            nn.Linear(128", "net.3"),
    ("DoubleReLUFunctional", "x = F.relu(x)", None),
])
def test_nd111_redundant_activation(tmp_path, cls, needle, module):
    path = SICK / "double_relu.py"
    (f,) = of(run(f"{path}:{cls}"), "ND111")
    assert f.severity == Severity.INFO and f.module == module
    assert f.location.line == code_line(path, needle)
    assert_fix_applies(f, tmp_path, cls, "ND111")


# ----------------------------------------------------------------------- ND201 / ND204 (init)


@pytest.mark.parametrize("target, cls, needle", [
    ("mlp.py", "MLP", "nn.Linear(num_inputs"),
    ("bad_init.py", "TinyInitMLP", "nn.Linear(784, 256)"),
])
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


# ----------------------------------------------------------------------- ONNX


def test_output_rules_read_onnx_graphs(tmp_path):
    """The same IR from an ONNX file: ND105/ND106/ND107 fire there too, with snippet fixes."""
    pytest.importorskip("onnx")
    import importlib.util
    import warnings

    found = {}
    for file, cls, rule in [("softmax_output.py", "SoftmaxNet", "ND105"),
                            ("relu_logits.py", "ReluLogitsNet", "ND106"),
                            ("linear_collapse.py", "CollapsedMLP", "ND107")]:
        spec = importlib.util.spec_from_file_location(f"fx_{cls}", SICK / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = getattr(module, cls)().eval()
        onnx_path = tmp_path / f"{cls}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, torch.randn(1, *MNIST), str(onnx_path), dynamo=False)
            except Exception as e:  # exporter unavailable in this environment
                pytest.skip(f"torch.onnx.export failed: {e}")
        with chdir(tmp_path):
            (report,), _ = check(str(onnx_path), CheckOptions())
        found[rule] = of(report.findings, rule)
        assert found[rule] and found[rule][0].fix.kind == "snippet", (rule, report.findings)
