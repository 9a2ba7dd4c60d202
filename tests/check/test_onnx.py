"""`netdoctor check model.onnx`: the fixtures exported with torch.onnx.export (TorchScript
exporter, no downloads) and hand-built files (onnx.helper) give the same rule IDs as the PyTorch
source; corrupt files and external data outside the model's folder are refused with one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HEALTHY, SICK, chdir, invoke, run_cli

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from netdoctor.check import CheckOptions, check  # noqa: E402

EXPORTERS = ["torchscript", "dynamo"]


def export(
    target: str,
    path: Path,
    shape=(1, 28, 28),
    training: bool = False,
    vocab=None,
    exporter: str = "torchscript",
    **kwargs,
) -> Path:
    """Export one fixture model (file.py:Class) the way users do. Both exporters fold each
    BatchNorm into the conv before it: the TorchScript one (dynamo=False) in eval mode only
    (`training=True` keeps BatchNormalization nodes), the dynamo one (torch's default since 2.9,
    needs onnxscript) always."""
    from netdoctor.loading.target import load

    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    model = load(target, kwargs).models[0].model
    model.train(training)
    x = torch.randn(2, *shape) if vocab is None else torch.randint(0, vocab, (2, *shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if exporter == "dynamo":
                torch.onnx.export(model, (x,), str(path), dynamo=True)
            else:
                mode = (
                    torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
                )
                torch.onnx.export(model, x, str(path), dynamo=False, training=mode)
        except Exception as e:  # an exporter this torch build lacks
            pytest.skip(f"torch.onnx.export failed: {type(e).__name__}: {e}")
    return path


def findings(path: Path) -> list[dict]:
    result = invoke("check", path.name, "--format", "json", cwd=path.parent)
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)["findings"]


def rules(path: Path) -> list[str]:
    return [f["rule"] for f in findings(path)]


# ------------------------------------------------------------------- exports of the fixtures


def test_output_rules_read_onnx_graphs(tmp_path):
    """The same IR from an ONNX file: ND105/ND106/ND107 fire there too, with snippet fixes."""
    import importlib.util

    found = {}
    for file, cls, rule in [
        ("softmax_output.py", "SoftmaxNet", "ND105"),
        ("relu_logits.py", "ReluLogitsNet", "ND106"),
        ("linear_collapse.py", "CollapsedMLP", "ND107"),
    ]:
        spec = importlib.util.spec_from_file_location(f"fx_{cls}", SICK / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = getattr(module, cls)().eval()
        onnx_path = tmp_path / f"{cls}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, torch.randn(1, 1, 28, 28), str(onnx_path), dynamo=False)
            except Exception as e:  # exporter unavailable in this environment
                pytest.skip(f"torch.onnx.export failed: {e}")
        with chdir(tmp_path):
            (report,), _ = check(str(onnx_path), CheckOptions())
        found[rule] = [f for f in report.findings if f.rule == rule]
        assert found[rule] and found[rule][0].fix.kind == "snippet", (rule, report.findings)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_sigmoid_lenet_export_reports_the_saturating_chain_at_the_onnx_node(tmp_path, exporter):
    path = export(f"{SICK / 'lenet_sigmoid.py'}:LeNet", tmp_path / "lenet.onnx", exporter=exporter)
    (chain,) = [f for f in findings(path) if f["rule"] == "ND102"]
    assert "ND101" not in rules(path)
    names = {n.name for n in onnx.load(str(path)).graph.node}
    assert chain["module"] in names and "igmoid" in chain["module"]  # the ONNX node's name
    assert chain["location"] == {"path": "lenet.onnx", "line": None}
    assert chain["evidence"]["length"] == 4
    assert chain["fix"]["patch"].startswith("nn.ReLU(),")  # a snippet: there is no source


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_plain_deep_cnn_export_reports_the_deep_plain_stack(tmp_path, exporter):
    path = export(
        f"{SICK / 'plain_cnn20.py'}:PlainCNN20", tmp_path / "plain.onnx", exporter=exporter
    )
    (stack,) = [f for f in findings(path) if f["rule"] == "ND101"]
    assert stack["evidence"]["depth"] == 21


@pytest.mark.parametrize(
    "exporter, training", [("torchscript", False), ("torchscript", True), ("dynamo", False)]
)
def test_healthy_bn_cnn_export_is_clean(tmp_path, exporter, training):
    """Eval-mode export folds every BatchNorm into its conv: still no deep-plain-stack alarm (the
    folded norms are recognised, and a note says so)."""
    export(
        f"{HEALTHY / 'vgg_bn.py'}:VGG11BN",
        tmp_path / "vgg.onnx",
        (3, 32, 32),
        training=training,
        exporter=exporter,
    )
    result = invoke("check", "vgg.onnx", cwd=tmp_path)
    assert result.exit_code == 0 and "no problems found" in result.stdout, result.stdout
    assert ("8 conv/linear layer(s) carry a BatchNorm folded in" in result.stdout) is (not training)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("momentum, flagged", [(0.99, True), (0.1, False)])
def test_bn_momentum_survives_the_export(tmp_path, momentum, flagged, exporter):
    """TorchScript: PyTorch momentum 0.99 exports as ONNX momentum 0.01 (ONNX weights the running
    value) and ND203 judges the converted value. Dynamo: the BatchNorm is folded into the conv and
    its momentum read from the export's record of the original call."""
    path = export(
        f"{SICK / 'bn_momentum.py'}:KerasMomentumNet",
        tmp_path / "bn.onnx",
        training=True,
        momentum=momentum,
        exporter=exporter,
    )
    found = [f for f in findings(path) if f["rule"] == "ND203"]
    assert len(found) == (2 if flagged else 0), found
    if exporter == "torchscript":
        stored = {
            a.f
            for n in onnx.load(str(path)).graph.node
            if n.op_type == "BatchNormalization"
            for a in n.attribute
            if a.name == "momentum"
        }
        assert len(stored) == 1 and stored.pop() == pytest.approx(1 - momentum)
        if flagged:
            assert found[0]["evidence"] == {"momentum": 0.99, "onnx_momentum": pytest.approx(0.01)}
    elif flagged:
        assert found[0]["module"].startswith("bn1 (folded into ")
        assert found[0]["evidence"]["momentum"] == 0.99
    if flagged:  # the snippet names the PyTorch layer, not the ONNX op
        assert "nn.BatchNorm2d(" in found[0]["fix"]["patch"], found[0]["fix"]["patch"]


DYNAMO_HEALTHY = [
    "alexnet_bn.py",
    "vgg_bn.py",
    "resnet.py",
    "mobilenet_v2.py",
    "densenet.py",
    "convnext.py",
]


@pytest.mark.parametrize("filename", DYNAMO_HEALTHY)
def test_healthy_bn_models_exported_by_dynamo_have_no_warning(tmp_path, filename):
    """The dynamo exporter (torch's default) folds BatchNorm into Conv and Gemm: the normalized
    models of the corpus must still be quiet."""
    from netdoctor.loading.shapes import infer
    from netdoctor.loading.target import load

    (loaded,) = load(str(HEALTHY / filename)).models
    spec = infer(loaded.model)[0]
    path = export(str(HEALTHY / filename), tmp_path / "m.onnx", spec.shape, exporter="dynamo")
    loud = [(f["rule"], f["message"]) for f in findings(path) if f["severity"] != "info"]
    assert loud == []


def test_every_healthy_fixture_exported_has_no_warning(tmp_path):
    """The healthy corpus, exported in eval mode (BatchNorm folded), stays quiet on ONNX too."""
    from netdoctor.loading.shapes import infer
    from netdoctor.loading.target import load

    loud, exported = [], 0
    for loaded in load(str(HEALTHY)).models:
        spec = infer(loaded.model)[0]
        vocab = (spec.vocab or 2) if spec.dtype == "long" else None  # token ids
        name = loaded.target.replace("/", "_").replace(":", "_") + ".onnx"
        export(
            f"{HEALTHY / loaded.target.split('/')[-1]}", tmp_path / name, spec.shape, vocab=vocab
        )
        exported += 1
        with chdir(tmp_path):
            (report,), _ = check(name, CheckOptions())
        loud += [(name, f.rule, f.message) for f in report.findings if f.severity.label != "info"]
    assert exported == len(list(HEALTHY.glob("*.py"))) and not loud


# ------------------------------------------------------------------ hand-built ONNX graphs


def _init(name: str, array: np.ndarray):
    return numpy_helper.from_array(array.astype(np.float32), name)


def deep_gemm_model(depth: int, activation: str = "Relu", width: int = 16):
    """input -> (Gemm -> activation) x depth, weights at PyTorch's default scale."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        w = rng.uniform(-1, 1, (width, width)) / np.sqrt(width)
        inits += [_init(f"w{i}", w), _init(f"b{i}", np.zeros(width))]
        nodes.append(
            helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}", transB=1)
        )
        x = f"h{i}"
        if i < depth - 1:
            nodes.append(helper.make_node(activation, [x], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_hand_built_graph_gets_the_same_rule_ids(tmp_path):
    onnx.save(deep_gemm_model(9, "Sigmoid"), str(tmp_path / "deep.onnx"))
    found = set(rules(tmp_path / "deep.onnx"))
    assert {"ND101", "ND102"} <= found


def test_layers_inside_an_if_branch_are_checked(tmp_path):
    """If/Loop bodies join the graph: a sigmoid chain inside a branch is found."""
    body = deep_gemm_model(6, "Sigmoid").graph
    branch = helper.make_graph(
        list(body.node),
        "then",
        [],
        [helper.make_tensor_value_info(body.output[0].name, TensorProto.FLOAT, [1, 16])],
        list(body.initializer),
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, 16])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other, name="gate"),
    ]
    graph = helper.make_graph(
        nodes,
        "gated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [_init("zero", np.zeros(()))],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
        str(tmp_path / "gated.onnx"),
    )
    (chain,) = [f for f in findings(tmp_path / "gated.onnx") if f["rule"] == "ND102"]
    assert chain["module"].startswith("gate/")


# ------------------------------------------------------------------------- bad files


def test_corrupt_file_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    result = run_cli("check", tmp_path / "broken.onnx")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a readable ONNX model" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_truncated_export_is_refused(tmp_path):
    onnx.save(deep_gemm_model(3), str(tmp_path / "m.onnx"))
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 2])
    result = invoke("check", "m.onnx", cwd=tmp_path)
    assert result.exit_code == 2 and result.stderr.startswith("netdoctor: error: m.onnx")


def _with_external_weight(location: str):
    model = deep_gemm_model(2)
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "1024")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return model


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1024)
    onnx.save(_with_external_weight(location), str(folder / "m.onnx"))
    result = invoke("check", folder / "m.onnx")
    assert result.exit_code == 2
    assert (
        "outside the model's folder" in result.stderr or "refers to external data" in result.stderr
    ), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_external_data_next_to_the_model_is_read(tmp_path):
    model = deep_gemm_model(9)
    from onnx.external_data_helper import convert_model_to_external_data

    convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert (tmp_path / "weights.bin").stat().st_size > 0
    assert "ND101" in rules(tmp_path / "m.onnx")
