"""ND205 tied-embedding-scale beyond its snapshots: the loss prediction it judges by, the ways a
tie is written, the factors on the logits it counts, the models it must leave alone (untied
embeddings, Hugging Face's tied models as built), its fix applied, and the same verdict on the
meta device as on the full build."""

from __future__ import annotations

import math
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, chdir
from netdoctor.check import CheckOptions, check, check_loaded
from netdoctor.rules.engine import RuleSettings
from netdoctor.rules.params.nd205_tied_embedding_scale import initial_cross_entropy

TOKENS = (16,)


def run(target: str, **options):
    opts = CheckOptions(input_shape=TOKENS, input_dtype="long", **options)
    with chdir(REPO):
        reports, _ = check(target, opts)
    assert len(reports) == 1
    return [f for f in reports[0].findings if f.rule == "ND205"]


def write(tmp_path: Path, body: str) -> str:
    """A model file `Net` whose forward ends in `body` (the logits from `x`, of width 64)."""
    path = tmp_path / "model.py"
    path.write_text(
        textwrap.dedent(
            """\
            import torch
            import torch.nn.functional as F
            from torch import nn


            class Net(nn.Module):
                def __init__(self, tied=True, std=None):
                    super().__init__()
                    self.tok = nn.Embedding(1000, 64)
                    self.mix = nn.Linear(64, 64)
                    self.norm = nn.LayerNorm(64)
                    self.head = nn.Linear(64, 1000, bias=False)
                    if tied:
                        self.head.weight = self.tok.weight
                    if std is not None:
                        nn.init.normal_(self.tok.weight, std=std)

                def forward(self, tokens):
                    x = self.tok(tokens)
                    x = self.norm(x + torch.relu(self.mix(x)))
                    return BODY
            """
        ).replace("BODY", body),
        encoding="utf-8",
    )
    return f"{path}:Net"


@pytest.mark.parametrize(
    "s, classes, rel",
    [
        (0.5, 4096, 0.01),
        (1.81, 32000, 0.01),  # Hugging Face's 0.02 at width 8192
        (math.sqrt(math.log(1000)), 1000, 0.02),  # the thresholds
        (math.sqrt(math.log(32000)), 32000, 0.02),
        (8.0, 1000, 0.15),  # far above: the largest logit dominates, 10-13% high at finite V
        (27.7, 50257, 0.15),
    ],
)
def test_the_predicted_initial_loss_is_the_measured_one(s, classes, rel):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, classes, generator=g) * s
    measured = float(torch.logsumexp(z, dim=1).mean())  # minus E[z_target] = 0
    assert initial_cross_entropy(s, classes) == pytest.approx(measured, rel=rel)
    assert initial_cross_entropy(s, classes) >= measured * 0.99  # never an underestimate


@pytest.mark.parametrize(
    "body",
    [
        "self.head(x)",  # the module tie
        "F.linear(x, self.tok.weight)",  # derived from the weight: the pass measures no call
        "x @ self.tok.weight.T",
        "torch.matmul(x, self.tok.weight.t())",
    ],
)
def test_every_way_of_writing_the_tie_is_seen(tmp_path, body):
    (finding,) = run(write(tmp_path, body))
    assert finding.module == "tok"
    ev = finding.evidence
    assert ev["vocab"] == 1000 and ev["width"] == 64
    assert ev["logit_rms"] == pytest.approx(8.0, rel=0.1)  # sqrt(64) x std 1
    assert ev["expected_loss"] > 1.5 * math.log(1000)


@pytest.mark.parametrize(
    "body, kwargs",
    [
        ("self.head(x)", {"tied": False}),  # the head keeps nn.Linear's small init
        ("self.head(x)", {"std": 0.02}),  # GPT-2's
        ("self.head(x)", {"std": 64**-0.5}),  # tensor2tensor's: logits of RMS 1
        ("self.head(x * 64 ** -0.5)", {}),  # T5's: measured in the head's output
        ("self.head(x) * 0.125", {}),  # a logit scale (Cohere's), counted on the way out
    ],
)
def test_the_published_schemes_are_left_alone(tmp_path, body, kwargs):
    target = write(tmp_path, body)
    assert run(target, kwargs=kwargs) == []


@pytest.mark.parametrize("std, reported", [(0.4, False), (0.6, True)])
def test_the_threshold_is_the_freezing_point(tmp_path, std, reported):
    """sqrt(2 ln 1000) = 3.72: logits of RMS 3.2 (std 0.4 x sqrt(64)) pass, 4.8 do not."""
    found = run(write(tmp_path, "self.head(x)"), kwargs={"std": std})
    assert bool(found) == reported
    if found:
        assert found[0].evidence["expected_loss"] > 2 * math.log(1000)


def test_a_factor_that_is_not_constant_is_not_guessed(tmp_path):
    """Logits multiplied by a learned scale: the product is unknown statically, and the rule
    says nothing rather than judge the head's output alone."""
    target = write(tmp_path, "self.head(x) * self.norm.weight.mean()")
    assert run(target) == []


def test_the_fix_applies_and_clears_the_finding(tmp_path):
    copy = tmp_path / "tied_embedding.py"
    shutil.copy(REPO / "fixtures/sick/tied_embedding.py", copy)
    (finding,) = run(f"{copy}:TiedEmbeddingLM")
    fix = finding.fix
    assert fix is not None and fix.kind == "diff" and fix.new_source
    assert "nn.init.normal_(self.tok.weight, std=64 ** -0.5)" in fix.patch
    copy.write_text(fix.new_source, encoding="utf-8")
    assert run(f"{copy}:TiedEmbeddingLM") == []
    assert finding.location is not None and finding.location.line == 45  # self.tok = ...


def test_the_option_and_the_severity_are_the_users():
    target = "fixtures/sick/tied_embedding.py:TiedEmbeddingLM"
    loose = RuleSettings.from_tables(tables={"ND205": {"tolerance": 10.0}})
    assert run(target, rules=loose) == []  # predicted 30 < 11 x ln(1000)
    quiet = RuleSettings.from_tables(tables={"ND205": {"severity": "info"}})
    (finding,) = run(target, rules=quiet)
    assert finding.severity.label == "info"


@pytest.mark.slow
def test_hugging_face_tied_models_as_built_are_clean_and_an_n01_embedding_is_not():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=1000, n_positions=64,
        initializer_range=0.02 * math.sqrt(768 / 64),  # GPT-2 small's gain at width 64
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _nd205(model) == []
    nn.init.normal_(model.transformer.wte.weight, std=1.0)
    (finding,) = _nd205(model)
    assert finding.module == "transformer.wte"
    assert finding.evidence["output_layer"] == "lm_head"


def _nd205(model: nn.Module):
    from netdoctor.loading.provenance import Provenance
    from netdoctor.loading.target import LoadedModel

    loaded = LoadedModel("hf", model, Provenance(), None)
    report = check_loaded(loaded, CheckOptions(input_shape=TOKENS, input_dtype="long"))
    return [f for f in report.findings if f.rule == "ND205"]


@pytest.mark.slow
def test_the_meta_device_build_gives_the_same_verdict():
    from netdoctor.loading.target import load

    with chdir(REPO):
        for folder in ("fixtures/sick/tied_embedding.py", "fixtures/healthy/tied_lm.py"):
            full = {m.target: m for m in load(folder, defer=False).models}
            meta = {m.target: m for m in load(folder, defer=True).models}
            for target, loaded in meta.items():
                assert loaded.deferred is not None
                got = [
                    (f.rule, f.module, f.evidence["measured"])
                    for f in check_loaded(loaded, CheckOptions()).findings
                ]
                want = [
                    (f.rule, f.module, f.evidence["measured"])
                    for f in check_loaded(full[target], CheckOptions()).findings
                ]
                assert got == want, target
                assert bool(got) == ("sick" in folder)
