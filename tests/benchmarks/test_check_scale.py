"""The pure helpers of benchmarks/check_scale.py (the benchmark itself builds models of up to 70B
parameters and is not run here): the parameter count from a Llama config, the memory guard, and
what its tables make of a run. Nothing here builds more than a tiny model."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location(
    "check_scale", REPO / "benchmarks" / "check_scale.py"
)
assert _spec is not None and _spec.loader is not None
cs = importlib.util.module_from_spec(_spec)
sys.modules["check_scale"] = cs
_spec.loader.exec_module(cs)

GB = 10**9

TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=100,
)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_word_embeddings": True},
        {"num_key_value_heads": 2},  # grouped-query attention
        {"num_key_value_heads": 1, "head_dim": 16},  # heads x head_dim != hidden size
        {"attention_bias": True, "mlp_bias": True},
        {"num_key_value_heads": None},  # LlamaConfig's default: as many as the heads
    ],
    ids=["untied", "tied", "gqa", "head-dim", "biases", "kv-default"],
)
def test_llama_params_counts_what_transformers_builds(changes):
    transformers = pytest.importorskip("transformers")
    cfg = {**TINY, **changes}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    assert cs.llama_params(cfg) == sum(p.numel() for p in model.parameters())


def test_the_benchmark_sizes_are_the_published_counts():
    counts = {c.key: c.params for c in cs.CONFIGS}
    assert counts["125m"] == 134_515_008  # SmolLM-135M
    assert counts["1b"] == 1_235_814_400  # Llama-3.2-1B (tied embeddings)
    assert counts["7b"] == 6_738_415_616  # Llama-2-7B
    assert counts["13b"] == 13_015_864_320  # Llama-2-13B
    assert counts["70b"] == 68_976_648_192  # Llama-2-70B
    assert counts["resnet50"] == 25_557_032
    default = [c.key for c in cs.CONFIGS if c.default]
    assert default == ["125m", "1b", "7b", "13b", "70b", "resnet50"]


def test_a_model_file_builds_the_configured_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    tiny = next(c for c in cs.CONFIGS if c.key == "tiny")
    source = cs.model_source(tiny, "transformers")
    namespace: dict = {}
    exec(compile(source, "model.py", "exec"), namespace)
    model = namespace["build"]()
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == tiny.params
    resnet = next(c for c in cs.CONFIGS if c.key == "resnet50")
    for library in ("torchvision", "timm"):
        tree = ast.parse(cs.model_source(resnet, library))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "build" for n in tree.body)


def test_guard_runs_what_fits_and_names_what_does_not():
    seven_b = 6_738_415_616
    available, margin = 24 * GB, 4 * GB
    for what in ("floor", "check"):
        assert cs.guard(1_235_814_400, what, available, margin, False) == cs.Decision(
            True, False, ""
        )
    floor = cs.guard(seven_b, "floor", available, margin, False)
    assert floor == cs.Decision(False, False, "cannot build (27.0 GB of fp32 weights)")
    # check builds a model this large on the meta device: it runs where its goal fits
    assert cs.guard(seven_b, "check", available, margin, False) == cs.Decision(True, False, "")
    check = cs.guard(seven_b, "check", 6 * GB, margin, False)
    assert not check.run
    # the margin counts: 4.9 GB of weights fit 10 GB available, not 8 GB
    assert cs.guard(1_235_814_400, "floor", 10 * GB, margin, False).run
    assert not cs.guard(1_235_814_400, "floor", 8 * GB, margin, False).run


def test_try_all_runs_anyway_but_limited():
    decision = cs.guard(68_976_648_192, "floor", 24 * GB, 4 * GB, True)
    assert decision == cs.Decision(True, True, "")
    # memory unknown (no /proc/meminfo, no psutil): run, unlimited by the guard
    assert cs.guard(68_976_648_192, "floor", None, 4 * GB, False) == cs.Decision(True, False, "")


def test_needed_bytes_is_the_fp32_weights_unless_check_defers():
    assert cs.needed_bytes(1000, "floor") == cs.needed_bytes(1000, "check") == 4000
    large = cs.defer_params() + 1
    assert cs.needed_bytes(large, "floor") == 4 * large
    assert cs.needed_bytes(large, "check") == cs.DEFERRED_CHECK_BYTES
    with pytest.raises(ValueError):
        cs.needed_bytes(1000, "import")


def test_meminfo_available():
    text = "MemTotal:       24683772 kB\nMemFree:        17634640 kB\nMemAvailable:   23033940 kB\n"
    assert cs.meminfo_available(text) == 23033940 * 1024
    assert cs.meminfo_available("MemTotal: 1 kB\n") is None


def test_ratios_pair_the_rounds_and_skip_failed_ones():
    assert cs.median_ratio([2.0, 3.0, 4.0], [1.0, 1.0, 2.0]) == 2.0
    assert cs.median_ratio([2.0, None, 9.0], [1.0, 1.0, None]) == 2.0
    assert cs.median_ratio([None], [1.0]) is None


def run(wall, rss, status="ok", error=""):
    return {"status": status, "wall": wall, "cpu": wall, "rss": rss, "error": error, "detail": ""}


def test_table_rows():
    ok = cs.Row("1b", "Llama 1B", 1_235_814_400, 4.94, versions={"torch": "2.13.0"})
    ok.imports = [run(5.0, 0.6 * GB)]
    ok.floors = [run(10.0, 5 * GB), run(12.0, 5 * GB)]
    ok.checks = [run(25.0, 7.5 * GB), run(24.0, 7.5 * GB)]
    ok.findings = ["ND001 info"]
    skipped = cs.Row(
        "7b",
        "Llama 7B",
        6_738_415_616,
        26.95,
        floor_skipped="cannot build (27.0 GB of fp32 weights)",
        check_skipped="not run (expected not to fit: 27.0 GB)",
    )
    killed = cs.Row("13b", "Llama 13B", 13_015_864_320, 52.06)
    killed.floors = [run(None, 21 * GB, "memory", "an allocation was refused at the 21.0 GB limit")]
    rows = cs.table_rows([ok, skipped, killed])
    assert rows[0] == [
        "Llama 1B",
        "1.24B",
        "4.9 GB",
        "5.0 s / 0.60 GB",
        "11.0 s / 5.00 GB",
        "24.5 s / 7.50 GB",
        "2.25x",
        "1.50x",
        "ND001 info",
    ]
    assert rows[1][4] == "cannot build (27.0 GB of fp32 weights)"
    assert rows[1][6:] == ["-", "-", "-"]
    assert rows[2][4].startswith("over the memory limit: an allocation was refused")
    assert len(cs.markdown([ok, skipped, killed]).splitlines()) == 5


def test_report_findings():
    report = {"findings": [{"rule": "ND001", "severity": "info"}]}
    assert cs.report_findings(report) == ["ND001 info"]
    assert cs.report_findings([report, {"findings": []}]) == ["ND001 info"]
    assert cs.findings_text(["ND001 info", "ND204 warning", "ND204 warning"]) == (
        "ND001 info, ND204 warning x2"
    )
    assert cs.findings_text([]) == "none"
